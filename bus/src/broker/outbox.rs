//! The local outbox role (optional): application state committed with a
//! message.
//!
//! The outbox role is optional ([`Broker::outbox`](crate::Broker::outbox)):
//! only a backend that keeps the application's state in its own store can
//! commit both at once.
//!
//! # Contract
//!
//! * [`Outbox::publish_with_state`] stores the message and applies the
//!   state writes in one atomic step: after a crash at any point, both are
//!   stored or neither is.
//! * State writes ([`Outbox::write_state`]) are ordered with the messages'
//!   commits; reads see every write whose call returned.

use async_trait::async_trait;

use crate::error::Error;
use crate::message::{Durability, MessageId, OutgoingMessage, SendReceipt};

/// The local outbox: application state in the bus's store.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// The local outbox: stores `message` and applies `state` to the
    /// application's state in the same store, atomically (after a crash,
    /// both or neither).
    ///
    /// # Errors
    ///
    /// As [`Publisher::publish`](crate::Publisher::publish); a delayed
    /// message is [`Error::Unsupported`].
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
    /// A storage error.
    async fn write_state(&self, state: StateBatch, durability: Durability) -> Result<(), Error>;

    /// Reads one key of the application's state.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;

    /// Reads several keys of the application's state, in order (one read
    /// of the store where the backend can; the inbox looks up a delivery
    /// batch's marks with it).
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn state_get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.state_get(k).await?);
        }
        Ok(out)
    }

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn state_scan(&self, prefix: &[u8]) -> Result<StateEntries, Error>;
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

    /// Adds every write of `other` after these.
    pub fn extend(mut self, other: StateBatch) -> Self {
        self.ops.extend(other.ops);
        self
    }
}

impl From<Vec<StateOp>> for StateBatch {
    fn from(ops: Vec<StateOp>) -> Self {
        StateBatch { ops }
    }
}

/// Where the inbox keeps its marks in the application's state: every key
/// starting with byte `0xFF` is the bus's own (keep yours below it).
pub const INBOX_PREFIX: &[u8] = b"\xFFwq-inbox\x00";

/// The key of the inbox's mark that `group` processed message `id` of
/// `topic`: [`INBOX_PREFIX`] · topic · 0 · group · 0 · id (16 bytes,
/// big-endian, so a topic's marks sort by the time their message was made).
pub fn inbox_key(topic: &str, group: &str, id: MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(INBOX_PREFIX.len() + topic.len() + group.len() + 18);
    k.extend_from_slice(INBOX_PREFIX);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.as_u128().to_be_bytes());
    k
}

/// Key-value pairs of the application's state, in key order.
pub type StateEntries = Vec<(Vec<u8>, Vec<u8>)>;
