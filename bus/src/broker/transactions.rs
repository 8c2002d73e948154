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
//!
//! # Contract
//!
//! * A half message is stored durably and delivered to no one until it is
//!   committed; committed, it is delivered as if published then, with the
//!   same id; rolled back, never.
//! * Ending a transaction twice does nothing the second time.
//! * Each unresolved half message is checked at most `max_checks` times,
//!   the first after `check_immunity`; then rolled back (and logged).
//! * A delayed transactional message is [`Error::Unsupported`] on every
//!   backend (delay it after the commit instead).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::{Durability, Message, MessageId, OutgoingMessage, SendReceipt};
use crate::topic::validate_topic_name;

/// Transactional messages: half messages, their end, their checkers.
#[async_trait]
pub trait Transactions: Send + Sync {
    /// Stores a half message for `message.topic`: durable, invisible to
    /// consumers until [`Transactions::end_transaction`] commits it (or the
    /// topic's checker does). Its first check comes after the check
    /// immunity of the checker registered for the topic (default 6 s).
    ///
    /// # Errors
    ///
    /// As [`Publisher::publish`](crate::Publisher::publish); a delayed transactional message is
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
}

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

/// The transaction checkers of a backend, by topic: registered at open or
/// later ([`Transactions::register_checker`]), asked by the backend's
/// checker loop. The same registry on every backend.
#[derive(Default)]
pub struct TransactionCheckers {
    by_topic: RwLock<HashMap<String, Registered>>,
}

/// A registered checker and its configuration.
type Registered = (Arc<dyn TransactionChecker>, TransactionConfig);

impl fmt::Debug for TransactionCheckers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        f.debug_set().entries(map.keys()).finish()
    }
}

impl TransactionCheckers {
    /// A registry holding these (topic, checker, config) entries (the names
    /// are checked when they are registered later; these come from a
    /// builder that checked them).
    pub fn new(entries: Vec<(String, Arc<dyn TransactionChecker>, TransactionConfig)>) -> Self {
        TransactionCheckers {
            by_topic: RwLock::new(
                entries
                    .into_iter()
                    .map(|(t, c, cfg)| (t, (c, cfg)))
                    .collect(),
            ),
        }
    }

    /// Registers the checker of `topic` (replacing any).
    ///
    /// # Errors
    ///
    /// An invalid topic name.
    pub fn register(
        &self,
        topic: &str,
        checker: Arc<dyn TransactionChecker>,
        config: TransactionConfig,
    ) -> Result<(), Error> {
        validate_topic_name(topic)?;
        self.by_topic
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string(), (checker, config));
        Ok(())
    }

    /// The checker of `topic` and its configuration, if one is registered.
    pub fn get(&self, topic: &str) -> Option<Registered> {
        self.by_topic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
    }

    /// The check configuration of `topic`: its checker's, or the default.
    pub fn config(&self, topic: &str) -> TransactionConfig {
        self.get(topic).map(|c| c.1).unwrap_or_default()
    }
}
