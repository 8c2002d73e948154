//! [`BusBuilder`]: configures and opens a [`Bus`] on a backend (the
//! embedded sled store by default, NATS JetStream with feature `nats`).

use super::*;

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
    memory_budget: Option<u64>,
    trace_sampling: TraceSampling,
    checkers: Vec<(String, Arc<dyn TransactionChecker>, TransactionConfig)>,
    #[cfg(feature = "nats")]
    nats: Option<weirmq_nats::NatsConfig>,
    /// A test bus's manual clock (`weirmq::testing`); the system clock
    /// otherwise.
    pub(crate) clock: Clock,
    /// A test bus: the whole embedded broker on the opening arbiter.
    pub(crate) current_arbiter: bool,
    /// A test bus's journal.
    #[cfg(feature = "testing")]
    pub(crate) journal: Option<Arc<crate::testing::Journal>>,
}

impl std::fmt::Debug for BusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusBuilder")
            .field("data_dir", &self.data_dir)
            .field("in_memory", &self.in_memory)
            .field("durability", &self.durability)
            .field("limits", &self.limits)
            .field("trace_sampling", &self.trace_sampling)
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
    ///
    /// The embedded broker then stores into ordered maps in the process
    /// instead of sled (no files, no sled threads), and the store's writer
    /// shares the broker's thread (one thread for the bus, not two);
    /// everything else — group commit, offsets, retries, delays,
    /// transactions, retention, query and trace — is the same code. What
    /// the store holds is in RAM (measured: ~275 bytes per 256-byte
    /// message), within
    /// [`memory_budget`](Self::memory_budget) (default 1 GiB); see
    /// docs/delivery.md, "Memory". `Durability` makes no difference. Use a
    /// data directory for backlogs larger than memory.
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

    /// In memory ([`in_memory`](Self::in_memory)): the most the store may
    /// hold, in bytes (default 1 GiB; counted as stored: encoded messages,
    /// offsets, retry entries and the rest, plus ~64 bytes per entry).
    /// Above three quarters of it, retention removes the oldest messages
    /// every consumer group of their topic has acked; a publish that would
    /// pass it is refused with [`Error::MemoryFull`] (nothing stored).
    /// Ignored with a data directory. See `docs/delivery.md`, "Memory".
    pub fn memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = Some(bytes);
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

    /// Which new traces get `publish` and `process` spans when a
    /// `tracing` subscriber wants them (`weirmq::publish` /
    /// `weirmq::process` at DEBUG). Default
    /// [`TraceSampling::per_second(100)`](TraceSampling::per_second). A
    /// publish that continues a trace (a `traceparent` it was given, the
    /// current OpenTelemetry span) follows that trace's decision, and every
    /// message carries a trace context, sampled or not; see
    /// `docs/observability.md`, "Sampling".
    ///
    /// ```
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// use weirmq::TraceSampling;
    /// let bus = weirmq::Bus::builder()
    ///     .in_memory()
    ///     .trace_sampling(TraceSampling::ratio(0.01))
    ///     .open()
    ///     .await?;
    /// # bus.shutdown().await }
    /// ```
    pub fn trace_sampling(mut self, sampling: TraceSampling) -> Self {
        self.trace_sampling = sampling;
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
            return Ok(Bus::new(
                Arc::new(broker),
                self.durability,
                self.trace_sampling,
                Clock::system(),
                #[cfg(feature = "testing")]
                None,
            ));
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
                memory_budget: self.memory_budget,
                clock: self.clock.clone(),
            },
            limits: self.limits,
            checkers: self.checkers,
            clock: self.clock.clone(),
            current_arbiter: self.current_arbiter,
            ..EmbeddedConfig::default()
        };
        if let Some(n) = self.max_pending_messages {
            config.max_pending_messages = n;
        }
        let embedded = EmbeddedBroker::open(config).await?;
        Ok(Bus::new(
            Arc::new(embedded),
            self.durability,
            self.trace_sampling,
            self.clock,
            #[cfg(feature = "testing")]
            self.journal,
        ))
    }
}
