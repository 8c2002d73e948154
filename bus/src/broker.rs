//! The `Broker` seam: what a storage/transport backend must offer.
//!
//! Everything above the seam — typed events, handler actors, the subscriber
//! supervisor, the retry policy — is written once against this trait. Below
//! it sit the embedded broker (actix actors over sled) and, later, NATS
//! JetStream.
//!
//! # Contract
//!
//! * `publish` resolves only once every message of the batch is stored with
//!   the asked [`Durability`]; the receipts are in the order of the input.
//!   On error none of the batch is acknowledged (some may be stored: at-least-once).
//! * A subscription delivers [`DeliveryBatch`]es; each [`RawDelivery`] must be
//!   settled exactly once through the subscription's [`Settler`]. A delivery
//!   that is never settled stays in flight (and is delivered again after a
//!   restart).
//! * The backend never decides the retry policy: it redelivers a `Nack` after
//!   the delay it is given, and counts attempts.
//! * Positions are opaque outside their backend ([`SettleToken`]).
//!
//! # Backpressure
//!
//! A backend keeps at most `max_in_flight` unsettled deliveries per
//! subscription; the backlog stays in the store.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::dlq::{DeadLetter, Resend, ResendReport};
use crate::error::Error;
use crate::filter::Filter;
use crate::message::{Durability, Message, MessageId, OutgoingMessage, SendReceipt};
use crate::topic::TopicConfig;
use crate::trace::{MessageTrace, RetentionReport};
use crate::transaction::{
    HalfMessage, StateBatch, TransactionChecker, TransactionConfig, TransactionOutcome,
};

/// What a backend does natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Messages survive a process restart.
    pub durable: bool,
    /// `Durability::Flushed` is honoured with a real sync to stable storage.
    pub fsync: bool,
    /// Offsets are dense per queue and positions can be read back.
    pub dense_offsets: bool,
}

impl Capabilities {
    /// A capability set (for backend authors; fields are non-exhaustive).
    pub fn new(durable: bool, fsync: bool, dense_offsets: bool) -> Self {
        Capabilities {
            durable,
            fsync,
            dense_offsets,
        }
    }
}

/// Where a consumer group with no committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// At the end of each queue: only messages published after the
    /// subscription (RocketMQ's default for a new group).
    #[default]
    Latest,
    /// At the first stored message of each queue.
    Earliest,
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

/// What a subscriber asks of the backend.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Where a group with no committed offset starts.
    pub start: StartFrom,
    /// The most unsettled deliveries at once for this subscription.
    pub max_in_flight: usize,
    /// Which messages the group wants; the others are skipped (its
    /// position moves past them).
    pub filter: Filter,
    /// Concurrent (default) or FIFO per message group.
    pub ordering: Ordering,
}

/// How a subscription orders its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Any order, as many at once as the in-flight limits allow (RocketMQ's
    /// concurrent consumer). A failed message is retried later while the
    /// next ones go on.
    #[default]
    Concurrent,
    /// Per message group ([`Publish::message_group`](crate::Publish::message_group)):
    /// one message of a group in flight at a time, in publish order; a
    /// failed message is retried in place and only its own group waits;
    /// different groups are handled in parallel. Messages without a group
    /// are ordered per queue.
    Fifo,
}

/// An opaque handle naming one delivery, returned with its [`Settlement`].
///
/// Backends put what they need in the two words; nothing above the seam
/// looks inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SettleToken([u64; 2]);

impl SettleToken {
    /// A token from a backend's two words.
    pub fn new(a: u64, b: u64) -> Self {
        SettleToken([a, b])
    }
    /// The backend's two words.
    pub fn parts(self) -> (u64, u64) {
        (self.0[0], self.0[1])
    }
}

/// One delivery of a stored message to a subscription.
#[derive(Debug, Clone)]
pub struct RawDelivery {
    /// The stored message (shared, never copied).
    pub message: Arc<Message>,
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub attempt: u32,
    /// Settle with this.
    pub token: SettleToken,
}

/// Deliveries travel in batches: one cross-thread message per batch.
pub type DeliveryBatch = Vec<RawDelivery>;

/// The outcome of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: never deliver again to this group.
    Ack,
    /// Failed: deliver again after `delay`, as the next attempt.
    Nack {
        /// How long the message stays invisible.
        delay: Duration,
        /// What went wrong (kept with the retry, and with the dead letter
        /// if it comes to that).
        error: String,
    },
    /// Give up now: move the message to the group's dead-letter queue.
    DeadLetter {
        /// Why (kept with the dead letter).
        reason: String,
    },
}

/// Takes settlements back to the backend, in batches. Cheap to call; never
/// blocks.
pub trait Settler: Send + Sync + fmt::Debug {
    /// Settles each delivery named by its token.
    fn settle(&self, batch: Vec<(SettleToken, Settlement)>);
}

/// A running subscription as the backend hands it over.
#[derive(Debug)]
pub struct BrokerSubscription {
    /// Delivery batches; closed when the subscription ends.
    pub deliveries: mpsc::UnboundedReceiver<DeliveryBatch>,
    /// Where settlements go.
    pub settler: Arc<dyn Settler>,
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

/// A storage/transport backend.
///
/// # Contract
///
/// * `publish` resolves only once every message of the batch is stored with
///   the asked [`Durability`]; receipts are in the order of the input. On
///   error none of the batch is acknowledged (some may be stored:
///   at-least-once).
/// * A subscription delivers [`DeliveryBatch`]es; each [`RawDelivery`] is
///   settled exactly once through the subscription's [`Settler`]. A delivery
///   never settled stays in flight, and is delivered again after a restart.
/// * The backend never decides the retry policy: it redelivers a `Nack`
///   after the delay it is given, and counts attempts.
/// * At most `max_in_flight` deliveries are unsettled per subscription; the
///   backlog stays in the store.
/// * Positions are opaque outside their backend ([`SettleToken`]).
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// What this backend does natively.
    fn capabilities(&self) -> Capabilities;

    /// Creates the topic if it does not exist; returns its configuration.
    ///
    /// # Errors
    ///
    /// Invalid configuration, [`Error::TopicConflict`] if it exists with
    /// another queue count, or a storage error.
    async fn ensure_topic(&self, config: TopicConfig) -> Result<TopicConfig, Error>;

    /// Stores a batch (auto-creating unknown user topics with defaults) and
    /// returns one receipt per message, in order, once `durability` holds.
    ///
    /// # Errors
    ///
    /// Validation errors (nothing stored), [`Error::Closed`], or a storage
    /// error.
    async fn publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error>;

    /// As [`Broker::publish`], but returns [`Error::Busy`] at once, storing
    /// nothing, when the backend would have to wait for room.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`], or as [`Broker::publish`].
    async fn try_publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error>;

    /// Starts delivering to a consumer group.
    ///
    /// # Errors
    ///
    /// Invalid names, [`Error::AlreadySubscribed`], or a storage error.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<BrokerSubscription, Error>;

    /// Stops a subscription, persisting its offsets. Deliveries not settled
    /// by then are delivered again to the next subscription of the group.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn unsubscribe(&self, group: &str, topic: &str) -> Result<(), Error>;

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

    /// One page of `group`'s dead letters, oldest first, from DLQ offset
    /// `from`.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error>;

    /// How many dead letters `group` holds.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn dead_letter_count(&self, group: &str) -> Result<u64, Error>;

    /// Sends dead letters back to `group` only, as attempt 1, each at most
    /// once; one report per message.
    ///
    /// # Errors
    ///
    /// A storage error reading the dead-letter queue.
    async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error>;

    /// Deletes every dead letter of `group`; returns how many.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error>;

    /// Finds a stored message by id, in any topic (dead-letter queues
    /// included; a dead letter is a copy with its own id). `None` if it is
    /// not stored (never was, or removed by retention).
    ///
    /// # Errors
    ///
    /// A storage error, or [`Error::Unsupported`].
    async fn query_id(&self, id: MessageId) -> Result<Option<Arc<Message>>, Error>;

    /// Up to `max` stored messages of `topic` carrying `key` among their
    /// keys, oldest first.
    ///
    /// # Errors
    ///
    /// An unknown topic, a storage error, or [`Error::Unsupported`].
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
    /// A storage error, or [`Error::Unsupported`].
    async fn trace(&self, id: MessageId) -> Result<Option<MessageTrace>, Error>;

    /// Runs a retention pass now (the backend also runs them on its own
    /// schedule) and reports what it removed.
    ///
    /// # Errors
    ///
    /// A storage error, or [`Error::Unsupported`].
    async fn enforce_retention(&self) -> Result<RetentionReport, Error>;

    /// Stores a half message for `message.topic`: durable, invisible to
    /// consumers until [`Broker::end_transaction`] commits it (or the
    /// topic's checker does). Its first check comes after the check
    /// immunity of the checker registered for the topic (default 6 s).
    ///
    /// # Errors
    ///
    /// As [`Broker::publish`]; a delayed transactional message is
    /// [`Error::Unsupported`].
    async fn publish_half(
        &self,
        message: OutgoingMessage,
        durability: Durability,
    ) -> Result<HalfMessage, Error>;

    /// Ends a transaction: `Commit` stores the message in its topic (same
    /// id; the receipt is returned), `Rollback` discards it, `Unknown`
    /// leaves it to the checker. Ending an already resolved transaction
    /// does nothing and returns `None`.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn end_transaction(
        &self,
        half: &HalfMessage,
        outcome: TransactionOutcome,
    ) -> Result<Option<SendReceipt>, Error>;

    /// Registers the checker of `topic`'s half messages (replacing any).
    ///
    /// # Errors
    ///
    /// An invalid topic name, or [`Error::Unsupported`].
    fn register_checker(
        &self,
        topic: &str,
        checker: Arc<dyn TransactionChecker>,
        config: TransactionConfig,
    ) -> Result<(), Error>;

    /// The local outbox: stores `message` and applies `state` to the
    /// application's state in the same store, atomically (after a crash,
    /// both or neither).
    ///
    /// # Errors
    ///
    /// As [`Broker::publish`]; [`Error::Unsupported`] on a backend that
    /// keeps no application state.
    async fn publish_with_state(
        &self,
        message: OutgoingMessage,
        durability: Durability,
        state: StateBatch,
    ) -> Result<SendReceipt, Error>;

    /// Applies `state` to the application's state atomically, without a
    /// message.
    ///
    /// # Errors
    ///
    /// A storage error, or [`Error::Unsupported`].
    async fn write_state(&self, state: StateBatch, durability: Durability) -> Result<(), Error>;

    /// Reads one key of the application's state.
    ///
    /// # Errors
    ///
    /// A storage error, or [`Error::Unsupported`].
    async fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error, or [`Error::Unsupported`].
    async fn state_scan(&self, prefix: &[u8]) -> Result<crate::transaction::StateEntries, Error>;

    /// Stops every subscription, persists offsets, syncs and closes the store.
    ///
    /// # Errors
    ///
    /// A storage error during the final sync.
    async fn shutdown(&self) -> Result<(), Error>;
}
