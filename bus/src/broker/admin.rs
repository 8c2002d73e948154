//! The admin role: topics, a group's positions and counters, resets, and
//! reading a queue back.
//!
//! # Contract
//!
//! * [`Admin::ensure_topic`] is idempotent: the same configuration again is
//!   `Ok`; another queue count for an existing topic is
//!   [`Error::TopicConflict`].
//! * Positions are counted in the backend's offsets: `committed` is the
//!   first offset not acked in order, `max` the next offset to be written,
//!   `lag` what the group has still to ack.
//! * [`Admin::reset_offsets`] moves a group's position, also while it runs
//!   (a running subscription picks it up at once); deliveries in flight
//!   finish.
//! * Reading ([`Admin::read_queue`], [`Admin::positions`]) never changes a
//!   position.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::Message;
use crate::topic::TopicConfig;

/// Topics, positions, resets, stats and reads.
#[async_trait]
pub trait Admin: Send + Sync {
    /// Creates the topic if it does not exist; returns its configuration.
    ///
    /// # Errors
    ///
    /// Invalid configuration, [`Error::TopicConflict`] if it exists with
    /// another queue count, or a storage error.
    async fn ensure_topic(&self, config: TopicConfig) -> Result<TopicConfig, Error>;

    /// The group's committed position and lag in each queue of the topic.
    ///
    /// # Errors
    ///
    /// A storage error, or an unknown topic as [`Error::InvalidConfig`].
    async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error>;

    /// Counters of the running subscription of `group` to `topic` (zero if
    /// none runs in this process).
    async fn group_stats(&self, group: &str, topic: &str) -> GroupStats;

    /// The topics that exist (system topics included), with their queue
    /// counts, by name.
    async fn topics(&self) -> Vec<TopicConfig>;

    /// Every consumer group with a position stored in the backend, with
    /// the topic it is in, sorted by group then topic. A group subscribed
    /// a moment ago may not have stored a position yet (the `Bus` adds the
    /// groups subscribed through it).
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn groups(&self) -> Result<Vec<GroupTopic>, Error>;

    /// What each queue of `topic` holds, and the topic's size.
    ///
    /// # Errors
    ///
    /// An unknown topic as [`Error::InvalidConfig`], or a storage error.
    async fn topic_stats(&self, topic: &str) -> Result<TopicStats, Error>;

    /// Reads up to `max` stored messages of one queue from offset `from`.
    ///
    /// # Errors
    ///
    /// An unknown topic or queue as [`Error::InvalidConfig`], or a storage
    /// error.
    async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error>;

    /// Moves `group`'s position in every queue of `topic` (a running
    /// subscription picks it up at once); returns the new positions.
    /// Deliveries in flight finish; messages acked out of order are
    /// forgotten (they come again if the new position is before them).
    ///
    /// # Errors
    ///
    /// An unknown topic, or a storage error.
    async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error>;
}

/// Where to move a consumer group's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first stored message of each queue (replay everything).
    Earliest,
    /// The end of each queue (skip the backlog).
    Latest,
    /// The first message of each queue published at or after this instant
    /// (to the millisecond).
    Time(std::time::SystemTime),
}

/// A consumer group's position in one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePosition {
    /// The queue.
    pub queue: u32,
    /// The committed offset: every message below it is acked.
    pub committed: u64,
    /// The end of the queue (the next offset to be written).
    pub max: u64,
    /// Messages not yet acked (`max - committed`, less those acked out of order).
    pub lag: u64,
}

/// A consumer group and a topic it has a position in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupTopic {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
}

/// What one queue of a topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// The queue.
    pub queue: u32,
    /// The offset of the first stored message (`end` if none is stored).
    pub first: u64,
    /// The next offset to be written.
    pub end: u64,
    /// Messages stored (retention and purges make it less than
    /// `end - first` where offsets have holes; on NATS offsets are stream
    /// sequences shared by the topic's queues).
    pub messages: u64,
}

/// What a topic holds: per queue, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStats {
    /// Each queue, by number.
    pub queues: Vec<QueueStats>,
    /// Bytes the topic's messages take in the backend (records with their
    /// framing; the newest records of an embedded queue are counted by
    /// their record size).
    pub bytes: u64,
}

impl TopicStats {
    /// Messages stored in every queue.
    pub fn messages(&self) -> u64 {
        self.queues.iter().map(|q| q.messages).sum()
    }
}

/// Counters of one subscription since it started (in this process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupStats {
    /// Deliveries handed out (including redeliveries).
    pub delivered: u64,
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries nacked (to be retried).
    pub retried: u64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries currently unsettled.
    pub in_flight: u64,
    /// Failed deliveries waiting (durably) for their next attempt.
    pub scheduled_retries: u64,
    /// Messages skipped because the subscription's filter rejected them.
    pub filtered: u64,
    /// Messages the group never received because retention removed them
    /// first (its position pointed into removed data).
    pub expired: u64,
}
