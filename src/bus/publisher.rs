//! Publishing typed events (contract: `weirmq_bus::Publisher`): encoded
//! with the event's codec on the caller's thread, then one call to the
//! backend.

use tracing::Instrument;

use super::meters::PublishOp;
use super::spans::{publish_span, record_outcome};
use super::*;

impl Bus {
    /// Publishes an event to its topic with the bus's default durability.
    ///
    /// # Errors
    ///
    /// [`Error::Codec`] if the event does not encode, a limit error (body
    /// over 4 MiB, ...), [`Error::Closed`], or a storage error. Nothing is
    /// acknowledged on error.
    ///
    /// # Delivery
    ///
    /// The receipt is returned once the message is stored with the bus's
    /// durability (default: fsync'd). It is then delivered to every consumer
    /// group subscribed to the topic, at least once each.
    ///
    /// # Examples
    ///
    /// ```
    /// use weirmq::prelude::*;
    /// #[derive(Serialize, Deserialize, Debug)]
    /// struct OrderCreated { id: u64 }
    /// impl Event for OrderCreated { const TOPIC: &'static str = "orders"; }
    ///
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = Bus::builder().in_memory().open().await?;
    /// let receipt = bus.publish(&OrderCreated { id: 1 }).await?;
    /// assert_eq!(receipt.offset, 0);
    /// # bus.shutdown().await }
    /// ```
    pub async fn publish<E: Event>(&self, event: &E) -> Result<SendReceipt, Error> {
        self.publish_with(event, Publish::new()).await
    }

    /// Publishes an event with a tag, keys, properties or a durability.
    ///
    /// # Errors
    ///
    /// As [`Bus::publish`], plus invalid tag, key or property names.
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # #[derive(Serialize, Deserialize, Debug)] struct OrderCreated { id: u64 }
    /// # impl Event for OrderCreated { const TOPIC: &'static str = "orders"; }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// # let bus = Bus::builder().in_memory().open().await?;
    /// bus.publish_with(
    ///     &OrderCreated { id: 2 },
    ///     Publish::new()
    ///         .tag("vip")
    ///         .key("order-2")
    ///         .property("region", "eu")
    ///         .durability(Durability::Buffered),
    /// )
    /// .await?;
    /// # bus.shutdown().await }
    /// ```
    pub async fn publish_with<E: Event>(
        &self,
        event: &E,
        options: Publish,
    ) -> Result<SendReceipt, Error> {
        let durability = options.get_durability().unwrap_or(self.inner.durability);
        let mut messages = vec![options.into_message(E::TOPIC, event.encode()?)];
        let span = publish_span(
            &self.inner.trace_sampling,
            PublishOp::Publish,
            E::TOPIC,
            &mut messages,
        );
        let copy = self.journal_copy(&messages);
        let started = Instant::now();
        let r = self
            .inner
            .broker
            .publish(messages, durability)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &r);
        self.observe_publish(PublishOp::Publish, E::TOPIC, 1, started, &r);
        if let Ok(r) = &r {
            self.journal_published(copy, r);
        }
        r?.pop().ok_or(Error::Closed)
    }

    /// Publishes an event if the publish pipeline has room, without waiting
    /// for room: when the store is not keeping up it returns at once with
    /// [`Error::Busy`] and the event, having stored nothing. Once admitted it
    /// waits for the store like [`Bus::publish`].
    ///
    /// # Errors
    ///
    /// A [`TryPublishError`] holding the event: `Busy`, or as
    /// [`Bus::publish`].
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # #[derive(Serialize, Deserialize, Debug)] struct Click(u32);
    /// # impl Event for Click { const TOPIC: &'static str = "clicks"; }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = Bus::builder().in_memory().open().await?;
    /// match bus.try_publish(Click(1)).await {
    ///     Ok(receipt) => println!("stored at offset {}", receipt.offset),
    ///     Err(e) if e.is_busy() => println!("shed load, keep {:?} for later", e.event),
    ///     Err(e) => return Err(e.error),
    /// }
    /// # bus.shutdown().await }
    /// ```
    pub async fn try_publish<E: Event>(&self, event: E) -> Result<SendReceipt, TryPublishError<E>> {
        let body = match event.encode() {
            Ok(b) => b,
            Err(e) => {
                return Err(TryPublishError {
                    event,
                    error: e.into(),
                })
            }
        };
        let mut messages = vec![OutgoingMessage::new(E::TOPIC, body)];
        let span = publish_span(
            &self.inner.trace_sampling,
            PublishOp::TryPublish,
            E::TOPIC,
            &mut messages,
        );
        let copy = self.journal_copy(&messages);
        let started = Instant::now();
        let r = self
            .inner
            .broker
            .try_publish(messages, self.inner.durability)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &r);
        self.observe_publish(PublishOp::TryPublish, E::TOPIC, 1, started, &r);
        if let Ok(r) = &r {
            self.journal_published(copy, r);
        }
        match r {
            Ok(mut r) => r.pop().ok_or(TryPublishError {
                event,
                error: Error::Closed,
            }),
            Err(error) => Err(TryPublishError { event, error }),
        }
    }

    /// Publishes many events in one call: one trip through the broker and,
    /// usually, one commit. Receipts are in the order of `events`.
    ///
    /// # Errors
    ///
    /// As [`Bus::publish`]; on error no receipt is returned (some events may
    /// still have been stored: at-least-once).
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # #[derive(Serialize, Deserialize, Debug)] struct OrderCreated { id: u64 }
    /// # impl Event for OrderCreated { const TOPIC: &'static str = "orders"; }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// # let bus = Bus::builder().in_memory().open().await?;
    /// let orders: Vec<OrderCreated> = (0..100).map(|id| OrderCreated { id }).collect();
    /// let receipts = bus.publish_batch(&orders).await?;
    /// assert_eq!(receipts.len(), 100);
    /// # bus.shutdown().await }
    /// ```
    pub async fn publish_batch<E: Event>(&self, events: &[E]) -> Result<Vec<SendReceipt>, Error> {
        let mut messages = events
            .iter()
            .map(|e| Ok(OutgoingMessage::new(E::TOPIC, e.encode()?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let span = publish_span(
            &self.inner.trace_sampling,
            PublishOp::PublishBatch,
            E::TOPIC,
            &mut messages,
        );
        let copy = self.journal_copy(&messages);
        let (n, started) = (messages.len(), Instant::now());
        let r = self
            .inner
            .broker
            .publish(messages, self.inner.durability)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &r);
        self.observe_publish(PublishOp::PublishBatch, E::TOPIC, n, started, &r);
        if let Ok(r) = &r {
            self.journal_published(copy, r);
        }
        r
    }

    /// Publishes a raw message (any body, any user topic). On error the
    /// message is handed back.
    ///
    /// # Errors
    ///
    /// A [`PublishError`] holding the message and the reason.
    pub async fn publish_raw(
        &self,
        message: OutgoingMessage,
        durability: Durability,
    ) -> Result<SendReceipt, PublishError> {
        let topic = message.topic.clone();
        let mut messages = vec![message];
        let span = publish_span(
            &self.inner.trace_sampling,
            PublishOp::Publish,
            &topic,
            &mut messages,
        );
        let copy = messages[0].clone();
        let started = Instant::now();
        let r = self
            .inner
            .broker
            .publish(messages, durability)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &r);
        self.observe_publish(PublishOp::Publish, &copy.topic, 1, started, &r);
        if let Ok(r) = &r {
            self.journal_published(self.journal_copy(std::slice::from_ref(&copy)), r);
        }
        match r {
            Ok(mut r) => r.pop().ok_or(PublishError {
                message: Box::new(copy),
                error: Error::Closed,
            }),
            Err(error) => Err(PublishError {
                message: Box::new(copy),
                error,
            }),
        }
    }

    /// Recalls a delayed message before it is due, by the receipt its
    /// publish returned: [`CancelOutcome::Cancelled`] once it is sure never
    /// to be delivered (the removal is stored), or
    /// [`CancelOutcome::AlreadyDelivered`] if it fell due (it is in its
    /// topic) or was cancelled before — never both. RocketMQ 5 added this
    /// as "recall".
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # use std::time::Duration;
    /// use weirmq::CancelOutcome;
    /// # #[derive(Serialize, Deserialize, Debug)] struct PaymentTimeout { order: u64 }
    /// # impl Event for PaymentTimeout { const TOPIC: &'static str = "payment-timeout"; }
    /// # #[actix::main]
    /// # async fn main() -> Result<(), weirmq::Error> {
    /// # let bus = Bus::builder().in_memory().open().await?;
    /// // Cancel the order in 30 minutes unless it is paid...
    /// let timeout = bus
    ///     .publish_with(&PaymentTimeout { order: 42 }, Publish::new().delay(Duration::from_secs(1800)))
    ///     .await?;
    /// // ...and it was paid: recall the timeout.
    /// assert_eq!(bus.cancel_delayed(&timeout).await?, CancelOutcome::Cancelled);
    /// assert_eq!(bus.cancel_delayed(&timeout).await?, CancelOutcome::AlreadyDelivered);
    /// # bus.shutdown().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a receipt of a message that was not
    /// delayed; [`Error::Unsupported`] on NATS JetStream (docs/scaling.md);
    /// [`Error::Closed`]; a storage error.
    pub async fn cancel_delayed(&self, receipt: &SendReceipt) -> Result<CancelOutcome, Error> {
        self.inner.broker.cancel_delayed(receipt).await
    }
}
