//! `Bus`: the handle applications hold, and its builder.
//!
//! A `Bus` is cheap to clone (an `Arc`); every clone is the same bus. It
//! encodes events with their codec on the caller's thread, and talks to the
//! backend through the `Broker` seam only, so the same application code runs
//! on every backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use weirmq_actors::{EmbeddedBroker, EmbeddedConfig};
use weirmq_bus::{validate_group_name, HalfMessage, StateBatch};
use weirmq_bus::{
    Broker, DeadLetter, Durability, Error, Event, GroupStats, Limits, Message, MessageId,
    MessageTrace, OutgoingMessage, Publish, PublishError, QueuePosition, Resend, ResendReport,
    ResetTo, RetentionReport, SendReceipt, TopicConfig, TransactionChecker, TransactionConfig,
    TransactionOutcome, TryPublishError,
};
use weirmq_persistence::{DiskPolicy, StoreConfig, SyncEvent, SyncHook};

use crate::subscribe::SubscribeBuilder;

/// The default data directory of the embedded store.
const DEFAULT_DATA_DIR: &str = "./weirmq-data";
/// The store's default page cache: recent records stay in memory, a backlog
/// stays on disk, so memory does not grow with the backlog (sled's own
/// default is 1 GiB).
const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Configures and opens a [`Bus`].
///
/// # Examples
///
/// ```
/// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
/// use weirmq::{Bus, Durability, Limits};
/// let bus = Bus::builder()
///     .in_memory()
///     .durability(Durability::Buffered)
///     .limits(Limits { max_body_bytes: 1 << 20, ..Limits::default() })
///     .open()
///     .await?;
/// bus.shutdown().await
/// # }
/// ```
#[derive(Default)]
pub struct BusBuilder {
    data_dir: Option<PathBuf>,
    in_memory: bool,
    durability: Durability,
    limits: Limits,
    cache_capacity: u64,
    sync_hook: Option<SyncHook>,
    max_pending_messages: Option<usize>,
    retention_interval: Option<Duration>,
    min_free_space: Option<u64>,
    checkers: Vec<(String, Arc<dyn TransactionChecker>, TransactionConfig)>,
    #[cfg(feature = "nats")]
    nats: Option<weirmq_nats::NatsConfig>,
}

impl std::fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusBuilder")
            .field("data_dir", &self.data_dir)
            .field("in_memory", &self.in_memory)
            .field("durability", &self.durability)
            .field("limits", &self.limits)
            .finish()
    }
}

impl BusBuilder {
    /// Stores data in `dir` (created if missing). Default: `./weirmq-data`.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self.in_memory = false;
        self
    }

    /// Keeps everything in memory: the same semantics, no durability. For
    /// tests, and for events that need not survive the process.
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// The durability of publishes that do not choose one
    /// (default [`Durability::Flushed`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Message size limits (default: RocketMQ's, 4 MiB bodies).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The store's page cache in bytes (default 64 MiB). More keeps more of a
    /// backlog in memory; it does not change what is durable. The process
    /// may hold up to about twice this in cached pages (sled counts them
    /// by their encoded size and evicts lazily): see `docs/delivery.md`,
    /// "Memory", for the whole bound.
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = bytes;
        self
    }

    /// The free space the embedded store keeps on its disk (default: 5% of
    /// the filesystem holding the data directory, at most 256 MiB). Below
    /// twice this, retention removes the oldest messages every consumer
    /// group of their topic has acked; below it, publishes are refused with
    /// [`Error::StoreFull`] (nothing stored) instead of filling the disk.
    /// `0` turns the guard off: the store then writes until the disk is full
    /// and stops ([`Error::StoreFailed`]). See `docs/delivery.md`.
    pub fn min_free_space(mut self, bytes: u64) -> Self {
        self.min_free_space = Some(bytes);
        self
    }

    /// The most published messages waiting for their commit at once
    /// (default 65,536); further publishes wait for room.
    pub fn max_pending_messages(mut self, n: usize) -> Self {
        self.max_pending_messages = Some(n);
        self
    }

    /// Registers the transaction checker of `E`'s topic from the start, so
    /// half messages left unresolved by a previous run are checked by it
    /// (see [`Bus::register_checker`]).
    pub fn transaction_checker<E: Event>(
        mut self,
        checker: impl TransactionChecker,
        config: TransactionConfig,
    ) -> Self {
        self.checkers
            .push((E::TOPIC.to_string(), Arc::new(checker), config));
        self
    }

    /// How often the retention cleaner runs (default every 60 s). Each pass
    /// removes, per topic, the oldest stored records past the topic's
    /// [`Retention`](crate::Retention), in small steps between commits.
    /// [`Bus::enforce_retention`] runs one at once.
    pub fn retention_interval(mut self, every: Duration) -> Self {
        self.retention_interval = Some(every.max(Duration::from_millis(10)));
        self
    }

    /// Uses NATS JetStream at `url` (e.g. `nats://127.0.0.1:4222`, or
    /// several comma-separated servers of a cluster) instead of the embedded
    /// store: the same API, handler actors and guarantees, shared by every
    /// process connected to the server. What JetStream cannot do is
    /// [`Error::Unsupported`]; see `docs/scaling.md`. The data-directory and
    /// cache settings do not apply.
    ///
    /// ```no_run
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = weirmq::Bus::builder().nats("nats://127.0.0.1:4222").open().await?;
    /// # bus.shutdown().await }
    /// ```
    #[cfg(feature = "nats")]
    pub fn nats(mut self, url: impl Into<String>) -> Self {
        self.nats = Some(weirmq_nats::NatsConfig::new(url));
        self
    }

    /// As [`BusBuilder::nats`], with every JetStream setting (ack wait,
    /// replicas). Its limits and checkers are replaced by the builder's.
    #[cfg(feature = "nats")]
    pub fn nats_config(mut self, config: weirmq_nats::NatsConfig) -> Self {
        self.nats = Some(config);
        self
    }

    /// Observes every step of every sync of the store (flush, fdatasync of
    /// the data file and of blob files, directory fsync), on the persistence
    /// thread, before the publishes waiting on it are answered. For tests and
    /// audits; keep it cheap.
    pub fn on_sync(mut self, hook: impl Fn(&SyncEvent) + Send + Sync + 'static) -> Self {
        self.sync_hook = Some(Arc::new(hook));
        self
    }

    /// Opens the bus. Must run inside an actix `System`.
    ///
    /// # Errors
    ///
    /// [`Error::DataDir`] if the data directory is corrupt, not a weirmq
    /// directory, or in use; [`Error::InvalidConfig`] outside an actix
    /// `System`.
    pub async fn open(self) -> Result<Bus, Error> {
        #[cfg(feature = "nats")]
        if let Some(mut nats) = self.nats {
            nats.limits = self.limits;
            nats.checkers = self.checkers;
            if let Some(n) = self.max_pending_messages {
                nats.max_pending_messages = n;
            }
            let broker = weirmq_nats::NatsBroker::connect(nats).await?;
            return Ok(Bus {
                inner: Arc::new(BusInner {
                    broker: Arc::new(broker),
                    durability: self.durability,
                }),
            });
        }
        let path = if self.in_memory {
            None
        } else {
            Some(
                self.data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            )
        };
        let mut config = EmbeddedConfig {
            store: StoreConfig {
                path,
                cache_capacity: if self.cache_capacity == 0 {
                    DEFAULT_CACHE_BYTES
                } else {
                    self.cache_capacity
                },
                sync_hook: self.sync_hook,
                retention_interval: self.retention_interval,
                disk: match self.min_free_space {
                    None => DiskPolicy::Default,
                    Some(0) => DiskPolicy::Off,
                    Some(n) => DiskPolicy::Reserve(n),
                },
            },
            limits: self.limits,
            checkers: self.checkers,
            ..EmbeddedConfig::default()
        };
        if let Some(n) = self.max_pending_messages {
            config.max_pending_messages = n;
        }
        let embedded = EmbeddedBroker::open(config).await?;
        Ok(Bus {
            inner: Arc::new(BusInner {
                broker: Arc::new(embedded),
                durability: self.durability,
            }),
        })
    }
}

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

#[derive(Debug)]
struct BusInner {
    broker: Arc<dyn Broker>,
    durability: Durability,
}

/// The event bus. Cheap to clone; share it freely (e.g. as actix-web
/// `web::Data<Bus>`).
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

impl Bus {
    /// A builder; `Bus::builder().open().await` opens `./weirmq-data`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = weirmq::Bus::builder().data_dir("/var/lib/my-service/bus").open().await?;
    /// # bus.shutdown().await }
    /// ```
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// Creates a topic with this configuration, or checks that the existing
    /// one matches. Topics are also created with defaults on first use.
    ///
    /// # Errors
    ///
    /// Invalid name or queue count, [`Error::TopicConflict`], or a storage
    /// error.
    pub async fn create_topic(&self, config: TopicConfig) -> Result<(), Error> {
        self.inner.broker.ensure_topic(config).await.map(|_| ())
    }

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
        let message = options.into_message(E::TOPIC, event.encode()?);
        let mut r = self.inner.broker.publish(vec![message], durability).await?;
        r.pop().ok_or(Error::Closed)
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
        let message = OutgoingMessage::new(E::TOPIC, body);
        match self
            .inner
            .broker
            .try_publish(vec![message], self.inner.durability)
            .await
        {
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
        let messages = events
            .iter()
            .map(|e| Ok(OutgoingMessage::new(E::TOPIC, e.encode()?)))
            .collect::<Result<Vec<_>, Error>>()?;
        self.inner
            .broker
            .publish(messages, self.inner.durability)
            .await
    }

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
        let message = options.into_message(E::TOPIC, event.encode()?);
        let half = self.inner.broker.publish_half(message, durability).await?;
        let outcome = local(half.clone()).await;
        let receipt = self.inner.broker.end_transaction(&half, outcome).await?;
        Ok(Transaction {
            half,
            outcome,
            receipt,
        })
    }

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
        let message = options.into_message(E::TOPIC, event.encode()?);
        self.inner
            .broker
            .publish_with_state(message, durability, state)
            .await
    }

    /// Writes to the application's state atomically, without a message
    /// (with the bus's default durability). See [`Bus::publish_with_state`].
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn write_state(&self, state: StateBatch) -> Result<(), Error> {
        self.inner
            .broker
            .write_state(state, self.inner.durability)
            .await
    }

    /// One key of the application's state (see [`Bus::publish_with_state`]).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.inner.broker.state_get(key).await
    }

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, Error> {
        self.inner.broker.state_scan(prefix).await
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
        let copy = message.clone();
        match self.inner.broker.publish(vec![message], durability).await {
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

    /// Starts building a subscription of consumer group `group` to `E`'s
    /// topic; see [`SubscribeBuilder`] for the options and an example.
    pub fn subscribe<E: Event>(&self, group: impl Into<String>) -> SubscribeBuilder<E> {
        SubscribeBuilder::new(self.clone(), group.into())
    }

    /// The group's committed position and lag in each queue of `topic`.
    ///
    /// # Errors
    ///
    /// An invalid group name, an unknown topic, or a storage error.
    pub async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        self.inner.broker.positions(group, topic).await
    }

    /// Moves `group`'s position in every queue of `topic` — to the first
    /// stored message (replay), the end (skip the backlog), or the first
    /// message published at or after an instant. A running subscription
    /// picks it up at once; returns the new positions.
    ///
    /// # Errors
    ///
    /// An unknown topic or invalid group name, or a storage error.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(bus: weirmq::Bus) -> Result<(), weirmq::Error> {
    /// use std::time::{Duration, SystemTime};
    /// use weirmq::ResetTo;
    /// let yesterday = SystemTime::now() - Duration::from_secs(24 * 3600);
    /// bus.reset_offsets("analytics", "orders", ResetTo::Time(yesterday)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        self.inner.broker.reset_offsets(group, topic, to).await
    }

    /// Counters of the running subscription of `group` to `topic` in this
    /// process (zeros if none, or if the names are not valid: no
    /// subscription can have them).
    pub async fn group_stats(&self, group: &str, topic: &str) -> GroupStats {
        self.inner.broker.group_stats(group, topic).await
    }

    /// Reads up to `max` stored messages of one queue from offset `from`.
    /// Works for system topics too (`%DLQ%<group>`).
    ///
    /// # Errors
    ///
    /// An unknown topic or queue, or a storage error.
    pub async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error> {
        self.inner.broker.read_queue(topic, queue, from, max).await
    }

    /// One page of `group`'s dead letters, oldest first, starting at DLQ
    /// offset `from` (use the last one's `dlq_offset + 1` for the next
    /// page). Each keeps the original message and says where it came from,
    /// why it died, after how many attempts, and whether it was resent.
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error.
    pub async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        validate_group_name(group)?;
        self.inner.broker.dead_letters(group, from, max).await
    }

    /// How many dead letters `group` holds (resent ones too, until purged).
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error.
    pub async fn dead_letter_count(&self, group: &str) -> Result<u64, Error> {
        validate_group_name(group)?;
        self.inner.broker.dead_letter_count(group).await
    }

    /// Sends dead letters back to `group` — to that group only, as attempt
    /// 1, each at most once — and reports per message: `Resent`,
    /// `NotFound`, `AlreadyResent`, or `Failed` with the reason.
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error reading the DLQ.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(bus: weirmq::Bus) -> Result<(), weirmq::Error> {
    /// use weirmq::{Resend, ResendOutcome};
    /// for r in bus.resend_dead_letters("coupon-service", Resend::All).await? {
    ///     assert_eq!(r.outcome, ResendOutcome::Resent, "{}", r.message_id);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        validate_group_name(group)?;
        self.inner.broker.resend_dead_letters(group, which).await
    }

    /// Deletes every dead letter of `group`; returns how many were deleted.
    ///
    /// # Errors
    ///
    /// An invalid group name, or a storage error.
    pub async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error> {
        validate_group_name(group)?;
        self.inner.broker.purge_dead_letters(group).await
    }

    /// The topics that exist, with their queue counts, retention and trace
    /// settings.
    pub async fn topics(&self) -> Vec<TopicConfig> {
        self.inner.broker.topics().await
    }

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
        self.inner.broker.query_id(id).await
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
        self.inner.broker.query_key(topic, key, max).await
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
        self.inner.broker.trace(id).await
    }

    /// Runs a retention pass now and reports what it removed (the cleaner
    /// also runs every [`BusBuilder::retention_interval`]). Publishes go on
    /// meanwhile: the pass removes a few records at a time between commits.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn enforce_retention(&self) -> Result<RetentionReport, Error> {
        self.inner.broker.enforce_retention().await
    }

    /// Stops every subscription (writing positions), answers publishes in
    /// flight, syncs and closes the store. The data directory can be opened
    /// again once this returns. Further calls on any clone return
    /// [`Error::Closed`].
    ///
    /// # Errors
    ///
    /// A storage error during the final sync.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.inner.broker.shutdown().await
    }
}
