//! Query by id or key, message trace and on-demand retention (contract:
//! `weirmq_bus::History`; optional — a backend without it answers
//! [`Error::Unsupported`]).

use super::*;

impl Bus {
    /// Finds a stored message by its id (from its [`SendReceipt`] or
    /// [`Delivery::message_id`](crate::Delivery::message_id)), in any topic.
    /// `None` if it is not stored: never published, or removed by retention.
    ///
    /// The embedded store finds it through a per-record index (a Bloom
    /// filter over the ids and keys of each stored record, about one per 512
    /// messages), so a query reads the index of every queue and decodes only
    /// matching records: cheap for an admin tool, not meant for a hot path.
    ///
    /// # Errors
    ///
    /// A storage error.
    ///
    /// # Examples
    ///
    /// ```
    /// # use weirmq::prelude::*;
    /// # #[derive(Serialize, Deserialize, Debug)] struct OrderCreated { id: u64 }
    /// # impl Event for OrderCreated { const TOPIC: &'static str = "orders"; }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = Bus::builder().in_memory().open().await?;
    /// let receipt = bus.publish_with(&OrderCreated { id: 7 }, Publish::new().key("order-7")).await?;
    /// let stored = bus.query_id(receipt.message_id).await?.expect("stored");
    /// assert_eq!(stored.keys(), ["order-7"]);
    /// assert_eq!(bus.query_key("orders", "order-7", 10).await?.len(), 1);
    /// # bus.shutdown().await }
    /// ```
    pub async fn query_id(&self, id: MessageId) -> Result<Option<Arc<Message>>, Error> {
        self.history("query by message id")?.query_id(id).await
    }

    /// Up to `max` stored messages of `topic` with `key` among their keys
    /// ([`Publish::key`]), oldest first. Messages removed by retention are
    /// not found.
    ///
    /// # Errors
    ///
    /// An unknown topic, or a storage error.
    pub async fn query_key(
        &self,
        topic: &str,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error> {
        self.history("query by key")?
            .query_key(topic, key, max)
            .await
    }

    /// What happened to a message: where it is stored, and — if its topic
    /// records traces ([`TopicConfig::trace`]) — every step of its life in
    /// order: published, delivered to a group (attempt n), acked, retried
    /// (with the error), dead-lettered (with the reason), resent. `None` if
    /// the message is not stored.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn trace(&self, id: MessageId) -> Result<Option<MessageTrace>, Error> {
        self.history("message trace")?.trace(id).await
    }

    /// Runs a retention pass now and reports what it removed (the cleaner
    /// also runs every [`BusBuilder::retention_interval`]). Publishes go on
    /// meanwhile: the pass removes a few records at a time between commits.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn enforce_retention(&self) -> Result<RetentionReport, Error> {
        self.history(
            "an on-demand retention pass (this backend enforces retention itself, \
             continuously)",
        )?
        .enforce_retention()
        .await
    }
}
