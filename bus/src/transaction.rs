//! Transactional messages: half messages, outcomes, the checker.
//!
//! A transactional publish first stores a *half message*: durable, but
//! invisible to consumers. The application then runs its local transaction
//! and says [`TransactionOutcome::Commit`] (the message becomes visible, as
//! if published then) or [`TransactionOutcome::Rollback`] (it never does).
//! If it says [`TransactionOutcome::Unknown`] — or dies before saying
//! anything — the topic's [`TransactionChecker`] is asked later, and again,
//! until it knows or [`TransactionConfig::max_checks`] is reached (then the
//! message is rolled back, and that is logged).

use std::time::Duration;

use async_trait::async_trait;

use crate::message::{Message, MessageId};

/// What became of a local transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionOutcome {
    /// It committed: deliver the message.
    Commit,
    /// It rolled back: never deliver the message.
    Rollback,
    /// Not known (yet): ask the checker later.
    Unknown,
}

/// When and how often half messages left unresolved are checked
/// (RocketMQ's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionConfig {
    /// How long after the half message is stored the first check comes
    /// (default 6 s): time for the local transaction to finish.
    pub check_immunity: Duration,
    /// Between checks that answered `Unknown` (default 30 s).
    pub check_interval: Duration,
    /// Checks before giving up and rolling back (default 15).
    pub max_checks: u32,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        TransactionConfig {
            check_immunity: Duration::from_secs(6),
            check_interval: Duration::from_secs(30),
            max_checks: 15,
        }
    }
}

/// Answers for half messages whose transaction outcome was not given
/// (`Unknown`, or the producer died). Registered per topic; it typically
/// looks the business key up in the application's database.
///
/// Only unresolved half messages are checked, each at most `max_checks`
/// times.
#[async_trait]
pub trait TransactionChecker: Send + Sync + 'static {
    /// The outcome of the local transaction behind `message` (a half
    /// message of the checker's topic: its id, keys, properties and body
    /// are those published).
    async fn check(&self, message: &Message) -> TransactionOutcome;
}

/// A stored half message waiting for its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfMessage {
    /// The message id (kept when it is committed).
    pub message_id: MessageId,
    /// The topic it will be delivered to when committed.
    pub topic: String,
    /// Its offset in the half-message topic.
    pub offset: u64,
    /// When it is first checked (Unix ms).
    pub check_at_ms: u64,
}

/// One write to the application's own state in the bus's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// Writes to the application's state committed atomically with a message
/// (the *local outbox*): after a crash at any point, both are stored or
/// neither is.
///
/// # Examples
///
/// ```
/// use weirmq_bus::StateBatch;
/// let batch = StateBatch::new()
///     .put("order/42", r#"{"state":"created"}"#)
///     .delete("cart/7");
/// assert_eq!(batch.ops().len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateBatch {
    ops: Vec<StateOp>,
}

impl StateBatch {
    /// No writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn put(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(StateOp::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Removes `key`.
    pub fn delete(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.ops.push(StateOp::Delete { key: key.into() });
        self
    }

    /// The writes, in order.
    pub fn ops(&self) -> &[StateOp] {
        &self.ops
    }

    /// Takes the writes out.
    pub fn into_ops(self) -> Vec<StateOp> {
        self.ops
    }
}

/// Key-value pairs of the application's state, in key order.
pub type StateEntries = Vec<(Vec<u8>, Vec<u8>)>;
