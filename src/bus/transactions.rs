//! Transactional messages (contract: `weirmq_bus::Transactions`): a half
//! message, the local transaction, its outcome.

use tracing::Instrument;

use super::meters::PublishOp;
use super::*;

/// The result of [`Bus::publish_transactional`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The half message (its id is the message's id).
    pub half: HalfMessage,
    /// What the local transaction returned.
    pub outcome: TransactionOutcome,
    /// Where the message was stored, if committed.
    pub receipt: Option<SendReceipt>,
}

impl Bus {
    /// Publishes an event in a transaction with the application's own
    /// work (RocketMQ's transactional message): the event is first stored
    /// as a *half message*, invisible to consumers; then `local` runs — do
    /// the local transaction there (write the order row...) and return its
    /// outcome. `Commit` makes the event visible (same id), `Rollback`
    /// discards it, `Unknown` leaves it to the topic's checker
    /// ([`Bus::register_checker`]), which is also asked if the process dies
    /// before `local` returns.
    ///
    /// See `docs/message-types.md` for when to use this and when the local
    /// outbox ([`Bus::publish_with_state`]) fits better.
    ///
    /// # Errors
    ///
    /// As [`Bus::publish`] for storing the half message (then `local` does
    /// not run); a storage error committing it (the checker will be asked).
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # use weirmq::TransactionOutcome;
    /// # #[derive(Serialize, Deserialize, Debug)] struct OrderCreated { id: u64 }
    /// # impl Event for OrderCreated { const TOPIC: &'static str = "orders"; }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = Bus::builder().in_memory().open().await?;
    /// let tx = bus
    ///     .publish_transactional(&OrderCreated { id: 7 }, Publish::new().key("order-7"), |half| async move {
    ///         // insert the order row for half.message_id here...
    ///         TransactionOutcome::Commit
    ///     })
    ///     .await?;
    /// assert!(tx.receipt.is_some());
    /// # bus.shutdown().await }
    /// ```
    pub async fn publish_transactional<E, F, Fut>(
        &self,
        event: &E,
        options: Publish,
        local: F,
    ) -> Result<Transaction, Error>
    where
        E: Event,
        F: FnOnce(HalfMessage) -> Fut,
        Fut: std::future::Future<Output = TransactionOutcome>,
    {
        let durability = options.get_durability().unwrap_or(self.inner.durability);
        let mut messages = [options.into_message(E::TOPIC, event.encode()?)];
        let span = super::spans::publish_span(
            &self.inner.trace_sampling,
            PublishOp::PublishHalf,
            E::TOPIC,
            &mut messages,
        );
        let [message] = messages;
        let started = Instant::now();
        let half = self
            .inner
            .broker
            .publish_half(message, durability)
            .instrument(span.clone())
            .await;
        super::spans::record_outcome(&span, &half);
        self.observe_publish(PublishOp::PublishHalf, E::TOPIC, 1, started, &half);
        let half = half?;
        let outcome = local(half.clone()).await;
        let receipt = self.inner.broker.end_transaction(&half, outcome).await?;
        Ok(Transaction {
            half,
            outcome,
            receipt,
        })
    }

    /// Ends a transaction whose half message was stored by
    /// [`Bus::publish_transactional`] (when the outcome becomes known later,
    /// elsewhere): `Commit` stores the message in its topic and returns the
    /// receipt; `Rollback` discards it; ending a resolved transaction again
    /// does nothing and returns `None`.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn end_transaction(
        &self,
        half: &HalfMessage,
        outcome: TransactionOutcome,
    ) -> Result<Option<SendReceipt>, Error> {
        self.inner.broker.end_transaction(half, outcome).await
    }

    /// Registers the checker of `E`'s topic: asked about half messages whose
    /// outcome was `Unknown` or never given, first after
    /// `config.check_immunity`, then every `config.check_interval`, at most
    /// `config.max_checks` times (then rolled back, logged).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] on a backend without transactions.
    pub fn register_checker<E: Event>(
        &self,
        checker: impl TransactionChecker,
        config: TransactionConfig,
    ) -> Result<(), Error> {
        self.inner
            .broker
            .register_checker(E::TOPIC, Arc::new(checker), config)
    }
}
