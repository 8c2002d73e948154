//! The local outbox (contract: `weirmq_bus::Outbox`; optional — a
//! backend without it answers [`Error::Unsupported`]).

use tracing::Instrument;

use super::meters::PublishOp;
use super::*;

impl Bus {
    /// The local outbox: publishes `event` and applies `state` — the
    /// application's own writes, kept in the bus's store — in one atomic
    /// commit. After a crash at any point both are stored or neither is, so
    /// no check-back is needed (unlike [`Bus::publish_transactional`]).
    /// Read the state back with [`Bus::state_get`] / [`Bus::state_scan`].
    ///
    /// # Errors
    ///
    /// As [`Bus::publish`]; then neither the message nor the state is stored.
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # use weirmq::StateBatch;
    /// # #[derive(Serialize, Deserialize, Debug)] struct OrderCreated { id: u64 }
    /// # impl Event for OrderCreated { const TOPIC: &'static str = "orders"; }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = Bus::builder().in_memory().open().await?;
    /// bus.publish_with_state(
    ///     &OrderCreated { id: 42 },
    ///     Publish::new().key("order-42"),
    ///     StateBatch::new().put("order/42", r#"{"state":"created"}"#),
    /// )
    /// .await?;
    /// assert!(bus.state_get(b"order/42").await?.is_some());
    /// # bus.shutdown().await }
    /// ```
    pub async fn publish_with_state<E: Event>(
        &self,
        event: &E,
        options: Publish,
        state: StateBatch,
    ) -> Result<SendReceipt, Error> {
        let durability = options.get_durability().unwrap_or(self.inner.durability);
        let mut messages = [options.into_message(E::TOPIC, event.encode()?)];
        let span = super::spans::publish_span(
            &self.inner.trace_sampling,
            PublishOp::PublishWithState,
            E::TOPIC,
            &mut messages,
        );
        let [message] = messages;
        let outbox = self.outbox(
            "the local outbox (publish_with_state; use a transactional message with a \
             checker instead)",
        )?;
        let copy = self.journal_copy(std::slice::from_ref(&message));
        let started = Instant::now();
        let r = outbox
            .publish_with_state(message, durability, state)
            .instrument(span.clone())
            .await;
        super::spans::record_outcome(&span, &r);
        self.observe_publish(PublishOp::PublishWithState, E::TOPIC, 1, started, &r);
        if let Ok(r) = &r {
            self.journal_published(copy, std::slice::from_ref(r));
        }
        r
    }

    /// Writes to the application's state atomically, without a message
    /// (with the bus's default durability). See [`Bus::publish_with_state`].
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn write_state(&self, state: StateBatch) -> Result<(), Error> {
        self.outbox("application state (write_state)")?
            .write_state(state, self.inner.durability)
            .await
    }

    /// One key of the application's state (see [`Bus::publish_with_state`]).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.outbox("application state (state_get)")?
            .state_get(key)
            .await
    }

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, Error> {
        self.outbox("application state (state_scan)")?
            .state_scan(prefix)
            .await
    }
}
