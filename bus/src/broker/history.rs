//! Message trace: what happened to one message, in order.
//!
//! A topic configured with [`TopicConfig::trace`](crate::TopicConfig::trace)
//! records one [`TraceEvent`] per step of each message's life; the events
//! are kept as long as the message is (retention removes both), and read by
//! message id.
//!
//! The history role is optional ([`Broker::history`](crate::Broker::history)):
//! a backend that keeps no index by id or key and no event log offers none
//! of it.
//!
//! # Contract
//!
//! * A query finds what is stored now: a message removed by retention is
//!   `None` (or absent from a key query), never an error.
//! * Dead-letter queues are searched too; a dead letter is a copy with an id
//!   of its own.
//! * [`History::enforce_retention`] removes what the topics' retention says
//!   is due, as the backend's own schedule would, and reports it.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::{Message, MessageId};

/// Query by id or key, message traces, and on-demand retention.
#[async_trait]
pub trait History: Send + Sync {
    /// Finds a stored message by id, in any topic (dead-letter queues
    /// included; a dead letter is a copy with its own id). `None` if it is
    /// not stored (never was, or removed by retention).
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn query_id(&self, id: MessageId) -> Result<Option<Arc<Message>>, Error>;

    /// Up to `max` stored messages of `topic` carrying `key` among their
    /// keys, oldest first.
    ///
    /// # Errors
    ///
    /// An unknown topic, a storage error.
    async fn query_key(
        &self,
        topic: &str,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error>;

    /// The lifecycle of a stored message; `None` if it is not stored.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn trace(&self, id: MessageId) -> Result<Option<MessageTrace>, Error>;

    /// Runs a retention pass now (the backend also runs them on its own
    /// schedule) and reports what it removed.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn enforce_retention(&self) -> Result<RetentionReport, Error>;
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TraceKind {
    /// Stored in its queue (the publish was acknowledged).
    Published,
    /// Handed to a consumer group's subscriber (`attempt` says which try).
    Delivered,
    /// Acknowledged by the group's handler.
    Acked,
    /// Failed; retried later (`detail`: the delay and the error).
    Retried,
    /// Moved to the group's dead-letter queue (`detail`: the reason).
    DeadLettered,
    /// Sent back to the group from its dead-letter queue.
    Resent,
    /// Skipped by the group's filter (never delivered to it).
    Filtered,
}

impl TraceKind {
    /// A stable one-byte code (the stored form).
    pub fn code(self) -> u8 {
        match self {
            TraceKind::Published => 1,
            TraceKind::Delivered => 2,
            TraceKind::Acked => 3,
            TraceKind::Retried => 4,
            TraceKind::DeadLettered => 5,
            TraceKind::Resent => 6,
            TraceKind::Filtered => 7,
        }
    }

    /// The kind of a stored code.
    pub fn from_code(code: u8) -> Option<TraceKind> {
        Some(match code {
            1 => TraceKind::Published,
            2 => TraceKind::Delivered,
            3 => TraceKind::Acked,
            4 => TraceKind::Retried,
            5 => TraceKind::DeadLettered,
            6 => TraceKind::Resent,
            7 => TraceKind::Filtered,
            _ => return None,
        })
    }
}

/// One step of a message's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// When it happened (millisecond precision).
    pub at: SystemTime,
    /// What happened.
    pub kind: TraceKind,
    /// The consumer group concerned (`None` for [`TraceKind::Published`]).
    pub group: Option<String>,
    /// The delivery attempt concerned (0 where none is).
    pub attempt: u32,
    /// The error, reason or delay, where there is one.
    pub detail: Option<String>,
}

impl TraceEvent {
    /// An event happening now (on the system clock).
    pub fn now(kind: TraceKind, group: Option<&str>, attempt: u32, detail: Option<String>) -> Self {
        TraceEvent::at_ms(crate::time::now_ms(), kind, group, attempt, detail)
    }

    /// An event that happened at `at_ms` (Unix ms, as it is stored: a
    /// broker passes its clock's now).
    pub fn at_ms(
        at_ms: u64,
        kind: TraceKind,
        group: Option<&str>,
        attempt: u32,
        detail: Option<String>,
    ) -> Self {
        TraceEvent {
            at: crate::time::from_unix_ms(at_ms),
            kind,
            group: group.map(str::to_string),
            attempt,
            detail,
        }
    }
}

/// A message's trace: where it is stored and what happened to it, oldest
/// event first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTrace {
    /// The message.
    pub id: MessageId,
    /// Its topic.
    pub topic: String,
    /// Its queue.
    pub queue: u32,
    /// Its offset in the queue.
    pub offset: u64,
    /// Whether its topic records traces; if not, `events` is empty.
    pub traced: bool,
    /// The events, in the order they were recorded.
    pub events: Vec<TraceEvent>,
}

impl MessageTrace {
    /// The kinds of the events, in order (handy in tests and logs).
    pub fn kinds(&self) -> Vec<TraceKind> {
        self.events.iter().map(|e| e.kind).collect()
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionReport {
    /// Messages removed.
    pub messages: u64,
    /// Stored bytes of the removed messages (before the store's own
    /// overhead; the store reuses the space for new writes).
    pub bytes: u64,
    /// Queues that lost messages.
    pub queues: u32,
}
