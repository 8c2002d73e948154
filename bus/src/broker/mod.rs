//! The `Broker` seam: what a storage/transport backend offers, as roles.
//!
//! Everything above the seam — typed events, handler actors, the subscriber
//! supervisor, the retry policy — is written once against these traits.
//! Below it sit the embedded broker (actix actors over sled, in
//! weirmq-actors) and NATS JetStream (weirmq-nats).
//!
//! A backend implements one trait per role, each with its own contract in
//! its own file:
//!
//! | role | file | required methods |
//! |---|---|---|
//! | [`Publisher`] | `publisher.rs` | 2 |
//! | [`Subscriptions`] | `subscriptions.rs` | 2 |
//! | [`Admin`] (topics, groups, positions, reset, read, stats) | `admin.rs` | 8 |
//! | [`DeadLetters`] | `dead_letters.rs` | 4 |
//! | [`Transactions`] | `transactions.rs` | 3 |
//! | [`Outbox`] (optional) | `outbox.rs` | 4 |
//! | [`History`] (optional: query, trace, retention) | `history.rs` | 4 |
//!
//! [`Broker`] is their supertrait plus the lifecycle: what the backend is
//! ([`Broker::capabilities`]), its optional roles ([`Broker::outbox`],
//! [`Broker::history`]: a backend without one returns `None`, so what it
//! cannot do is a fact of its type, not a method answering
//! `Unsupported`), and [`Broker::shutdown`].
//!
//! Logic that does not depend on the backend lives here once, beside the
//! role it serves: publish admission ([`Admission`]), the dead-letter copy
//! ([`DeadLetterCopy`]) and the choice of dead letters to resend
//! ([`ResendPlan`]), system topic names ([`dlq_topic`]), time helpers
//! ([`crate::now_ms`]).
//!
//! # Contract common to every role
//!
//! * Errors are typed [`Error`]s a user can act on; nothing already stored
//!   is lost by a failing call.
//! * Positions are opaque outside their backend ([`SettleToken`]).
//! * Calls may come from any thread and any runtime; a backend moves work to
//!   its own threads itself.

mod admin;
mod dead_letters;
mod history;
mod outbox;
mod publisher;
mod subscriptions;
mod transactions;

use std::fmt;

use async_trait::async_trait;

use crate::error::Error;

pub use admin::{Admin, GroupStats, GroupTopic, QueuePosition, QueueStats, ResetTo, TopicStats};
pub use dead_letters::{
    dlq_topic, DeadLetter, DeadLetterCopy, DeadLetters, Resend, ResendOutcome, ResendPlan,
    ResendReport, DLQ_ATTEMPTS, DLQ_DEAD_LETTERED_AT_MS, DLQ_FIRST_FAILED_AT_MS, DLQ_ORIGIN_MSG_ID,
    DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_QUEUE, DLQ_ORIGIN_TOPIC, DLQ_PROPERTIES, DLQ_REASON,
    DLQ_TOPIC_PREFIX,
};
pub use history::{History, MessageTrace, RetentionReport, TraceEvent, TraceKind};
pub use outbox::{inbox_key, Outbox, StateBatch, StateEntries, StateOp, INBOX_PREFIX};
pub use publisher::{
    delayed_receipt, pending_publishes, Admission, AdmissionPermit, CancelOutcome, Publisher,
};
pub use subscriptions::{
    BrokerSubscription, DeliveryBatch, Ordering, RawDelivery, SettleToken, Settlement, Settler,
    StartFrom, SubscriptionSpec, Subscriptions,
};
pub use transactions::{
    HalfMessage, TransactionChecker, TransactionCheckers, TransactionConfig, TransactionOutcome,
    Transactions,
};

/// What a backend does natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's name for messages ("embedded sled", "NATS JetStream").
    pub backend: &'static str,
    /// Messages survive a process restart.
    pub durable: bool,
    /// `Durability::Flushed` is honoured with a real sync to stable storage.
    pub fsync: bool,
    /// Offsets are dense per queue and positions can be read back.
    pub dense_offsets: bool,
    /// The local outbox ([`Outbox`]) is offered. Filled in by the `Bus`
    /// from [`Broker::outbox`]; a backend leaves it `false`.
    pub outbox: bool,
    /// Query, trace and on-demand retention ([`History`]) are offered.
    /// Filled in by the `Bus` from [`Broker::history`].
    pub history: bool,
}

impl Capabilities {
    /// A capability set (for backend authors; fields are non-exhaustive).
    pub fn new(backend: &'static str, durable: bool, fsync: bool, dense_offsets: bool) -> Self {
        Capabilities {
            backend,
            durable,
            fsync,
            dense_offsets,
            outbox: false,
            history: false,
        }
    }
}

/// A storage/transport backend: every role, plus the lifecycle.
///
/// # Contract
///
/// * [`Broker::capabilities`] is cheap and constant for the backend's life.
/// * An optional role is offered for the backend's whole life or never:
///   [`Broker::outbox`] and [`Broker::history`] answer the same every time.
/// * [`Broker::shutdown`] stops every subscription (their offsets
///   persisted), answers or fails every publish in progress, syncs and
///   closes the store; calls after it fail with [`Error::Closed`]; a second
///   shutdown does nothing and answers `Ok`.
#[async_trait]
pub trait Broker:
    Publisher + Subscriptions + Admin + DeadLetters + Transactions + fmt::Debug + 'static
{
    /// What this backend does natively.
    fn capabilities(&self) -> Capabilities;

    /// The local outbox, if this backend keeps application state.
    fn outbox(&self) -> Option<&dyn Outbox>;

    /// Query, trace and on-demand retention, if this backend keeps what
    /// they need.
    fn history(&self) -> Option<&dyn History>;

    /// Stops every subscription, persists offsets, syncs and closes the store.
    ///
    /// # Errors
    ///
    /// A storage error during the final sync.
    async fn shutdown(&self) -> Result<(), Error>;
}
