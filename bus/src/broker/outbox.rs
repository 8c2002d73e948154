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
use crate::message::{Durability, OutgoingMessage, SendReceipt};

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
}

/// Key-value pairs of the application's state, in key order.
pub type StateEntries = Vec<(Vec<u8>, Vec<u8>)>;
