//! The embedded broker: [`EmbeddedBroker`] implements the `Broker` seam with
//! actix actors over the sled store.
//!
//! # Threads
//!
//! * the **persistence arbiter** runs the `PersistenceActor` (the store's
//!   only writer, group commit);
//! * the **broker arbiter** runs every topic, queue and group actor;
//! * the publisher's own thread validates and stamps messages, then sends one
//!   message per publish to the topic actor, and is answered once per publish
//!   from the persistence thread.
//!
//! # Backpressure
//!
//! At most `max_pending_messages` published messages wait for their commit at
//! once; further publishes wait (asynchronously) for room. The delivery side
//! is bounded by each subscription's `max_in_flight`; the backlog stays in
//! sled.
//!
//! # Shutdown
//!
//! [`Broker::shutdown`] stops every group (writing its positions), then the
//! persistence actor commits what is pending, syncs and closes the store, and
//! both arbiters are stopped and joined, so the data directory can be opened
//! again at once.

mod due;
mod group;
mod scheduler;
mod topic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use async_trait::async_trait;
use dashmap::DashMap;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, Semaphore, SemaphorePermit, TryAcquireError};
use tracing::{debug, info};
use weirmq_bus::{
    validate_group_name, validate_topic_name, Broker, BrokerSubscription, Capabilities, DeadLetter,
    Durability, Error, GroupStats, HalfMessage, Limits, Message as BusMessage, MessageId,
    MessageTrace, OutgoingMessage, QueuePosition, Resend, ResendOutcome, ResendReport, ResetTo,
    RetentionReport, SendReceipt, SettleToken, Settlement, Settler, StartFrom, StorageError,
    SubscriptionSpec, TopicConfig, TraceEvent, TraceKind, TransactionChecker, TransactionConfig,
    TransactionOutcome, HALF_TOPIC, SCHEDULE_TOPIC, SYSTEM_TOPIC_PREFIX,
};
use weirmq_persistence::DiskGuard;
use weirmq_persistence::{
    next_seq, CommitOffsets, ConfigureTopic, CreateTopic, OffsetState, PersistenceActor,
    PurgeQueue, QueueKey, RecordTrace, RetryEntry, RetryKey, RunRetention, SetScheduler,
    ShutdownStore, Store, StoreConfig, StoreReader, TopicSettings, TraceRecord, UpdateRetries,
};

use group::{
    AddRetries, DeadLetterSink, GroupActor, GroupSetup, Inspect, ResetPositions, Settle, StopGroup,
};
use scheduler::{Checkers, EndTransaction, MoveSink, Scheduler, StopScheduler};
use topic::{Collector, Listen, PublishPart, QueueActor, TopicActor, TopicPublish, Unlisten};

/// How to open the embedded broker.
#[derive(Clone)]
pub struct EmbeddedConfig {
    /// Where and how the store opens.
    pub store: StoreConfig,
    /// Message limits checked at publish.
    pub limits: Limits,
    /// The most published messages waiting for their commit at once.
    pub max_pending_messages: usize,
    /// Transaction checkers (topic, checker, config), registered before the
    /// scheduler looks at half messages left from a previous run.
    pub checkers: Vec<(String, Arc<dyn TransactionChecker>, TransactionConfig)>,
}

impl std::fmt::Debug for EmbeddedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedConfig")
            .field("store", &self.store)
            .field("limits", &self.limits)
            .field("max_pending_messages", &self.max_pending_messages)
            .field(
                "checkers",
                &self.checkers.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            store: StoreConfig::default(),
            limits: Limits::default(),
            max_pending_messages: 65_536,
            checkers: Vec::new(),
        }
    }
}

/// What the broker knows of a topic; shared by every publisher.
#[derive(Debug)]
struct Topic {
    name: Arc<str>,
    id: u32,
    queues: u32,
    addr: Addr<TopicActor>,
    queue_addrs: Vec<Addr<QueueActor>>,
    ends: Vec<Arc<AtomicU64>>,
    /// Publishes waiting to be sent to the topic actor in one message.
    outbox: Mutex<Vec<PublishPart>>,
    /// Retention and trace, as last configured.
    settings: Mutex<TopicSettings>,
    /// The trace switch, read by its queue and group actors.
    trace: Arc<AtomicBool>,
}

type TopicHandle = Arc<Topic>;

impl Topic {
    /// Sends everything in the outbox to the topic actor as one message.
    fn config(&self) -> TopicConfig {
        let s = self
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        TopicConfig::new(self.name.to_string())
            .queues(self.queues)
            .retention(s.retention)
            .trace(s.trace)
    }

    fn send_outbox(&self) {
        let parts = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        if !parts.is_empty() {
            self.addr.do_send(TopicPublish { parts });
        }
    }
}

/// Sends the outbox when dropped, so a publisher whose future is dropped
/// while it waits never strands the publishes of others.
struct OutboxSender<'a>(&'a Topic);

impl Drop for OutboxSender<'_> {
    fn drop(&mut self) {
        self.0.send_outbox();
    }
}

#[derive(Debug)]
struct GroupHandle {
    addr: Addr<GroupActor>,
    listen_id: u64,
}

struct Inner {
    durable: bool,
    limits: Limits,
    closed: AtomicBool,
    topics: DashMap<String, TopicHandle>,
    groups: DashMap<(String, String), GroupHandle>,
    create_lock: tokio::sync::Mutex<()>,
    persistence: Addr<PersistenceActor>,
    broker_arbiter: ArbiterHandle,
    reader: Mutex<Option<StoreReader>>,
    arbiters: Mutex<Vec<Arbiter>>,
    pending: Semaphore,
    max_pending: usize,
    next_listen_id: AtomicU64,
    scheduler: Mutex<Option<Addr<Scheduler>>>,
    checkers: Checkers,
    /// Refuses publishes before the disk is full.
    guard: DiskGuard,
}

/// The embedded broker. Cheap to clone; every clone is the same broker.
#[derive(Clone)]
pub struct EmbeddedBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("durable", &self.inner.durable)
            .field("topics", &self.inner.topics.len())
            .finish()
    }
}

fn spawn_topic(
    arbiter: &ArbiterHandle,
    persistence: &Addr<PersistenceActor>,
    name: &str,
    id: u32,
    ends: Vec<u64>,
    settings: TopicSettings,
) -> TopicHandle {
    let trace = Arc::new(AtomicBool::new(settings.trace));
    let ends: Vec<Arc<AtomicU64>> = ends
        .into_iter()
        .map(|e| Arc::new(AtomicU64::new(e)))
        .collect();
    let queue_addrs: Vec<Addr<QueueActor>> = ends
        .iter()
        .enumerate()
        .map(|(q, end)| {
            let key = QueueKey {
                topic_id: id,
                queue: q as u32,
            };
            let end = end.clone();
            let p = persistence.clone();
            let t = trace.clone();
            QueueActor::start_in_arbiter(arbiter, move |_| QueueActor::new(key, end, p, t))
        })
        .collect();
    let qa = queue_addrs.clone();
    let addr = TopicActor::start_in_arbiter(arbiter, move |_| TopicActor::new(qa));
    Arc::new(Topic {
        name: Arc::from(name),
        id,
        queues: ends.len() as u32,
        addr,
        queue_addrs,
        ends,
        outbox: Mutex::new(Vec::new()),
        settings: Mutex::new(settings),
        trace,
    })
}

impl EmbeddedBroker {
    /// Opens the store and starts the broker's arbiters.
    ///
    /// Must be called inside a running actix `System` (`#[actix::main]`,
    /// `#[actix_web::main]`, `#[actix::test]`).
    ///
    /// # Errors
    ///
    /// [`Error::DataDir`] for a corrupt, foreign or locked directory;
    /// [`Error::InvalidConfig`] outside an actix `System`.
    pub async fn open(config: EmbeddedConfig) -> Result<EmbeddedBroker, Error> {
        if System::try_current().is_none() {
            return Err(Error::InvalidConfig {
                reason: "the bus must be opened inside a running actix System \
                         (#[actix::main], #[actix_web::main] or #[actix::test])"
                    .into(),
            });
        }
        let durable = config.store.path.is_some();
        let store_cfg = config.store.clone();
        let (store, recovery) = tokio::task::spawn_blocking(move || Store::open(store_cfg))
            .await
            .map_err(|e| Error::Storage(StorageError::msg(format!("opening the store: {e}"))))??;
        let reader = store.reader();
        let guard = store.disk_guard();
        let persistence_arbiter = Arbiter::new();
        let broker_arbiter = Arbiter::new();
        let persistence =
            PersistenceActor::start_in_arbiter(&persistence_arbiter.handle(), move |_| {
                PersistenceActor::new(store, durable)
            });
        let topics = DashMap::new();
        for t in recovery.topics {
            let h = spawn_topic(
                &broker_arbiter.handle(),
                &persistence,
                &t.name,
                t.id,
                t.ends,
                t.settings,
            );
            debug!(topic = %t.name, queues = t.queues, "topic recovered");
            topics.insert(t.name, h);
        }
        info!(
            data_dir = ?config.store.path,
            topics = topics.len(),
            "weirmq embedded broker open"
        );
        let max_pending = config.max_pending_messages.max(1);
        let sched_reader = reader.clone();
        let broker = EmbeddedBroker {
            inner: Arc::new(Inner {
                durable,
                limits: config.limits,
                closed: AtomicBool::new(false),
                topics,
                groups: DashMap::new(),
                create_lock: tokio::sync::Mutex::new(()),
                persistence,
                broker_arbiter: broker_arbiter.handle(),
                reader: Mutex::new(Some(reader)),
                arbiters: Mutex::new(vec![broker_arbiter, persistence_arbiter]),
                pending: Semaphore::new(max_pending),
                max_pending,
                next_listen_id: AtomicU64::new(0),
                scheduler: Mutex::new(None),
                guard,
                checkers: Arc::new(
                    config
                        .checkers
                        .into_iter()
                        .map(|(t, c, cfg)| (t, (c, cfg)))
                        .collect(),
                ),
            }),
        };
        let sink = broker.move_sink();
        let p = broker.inner.persistence.clone();
        let checkers = broker.inner.checkers.clone();
        let scheduler = Scheduler::start_in_arbiter(&broker.inner.broker_arbiter, move |_| {
            Scheduler::new(sched_reader, p, sink, checkers)
        });
        broker
            .inner
            .persistence
            .do_send(SetScheduler(scheduler.clone().recipient()));
        *broker
            .inner
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(scheduler);
        Ok(broker)
    }

    /// Refuses a user's publish when the disk is nearly full
    /// ([`Error::StoreFull`]; see `weirmq_persistence::DiskGuard`).
    fn disk_room(&self, messages: &[OutgoingMessage]) -> Result<(), Error> {
        let bytes: usize = messages.iter().map(|m| m.body.len() + 64).sum();
        self.inner.guard.admit(bytes as u64)
    }

    /// Where the scheduler stores delayed messages that fell due: in their
    /// topic, as they were (same id).
    fn move_sink(&self) -> MoveSink {
        let me = self.clone();
        Arc::new(move |topic: String, messages: Vec<BusMessage>| {
            let me = me.clone();
            async move {
                let h = me.existing_or_default(&topic, false).await?;
                let _room = me.admit(messages.len(), true).await?;
                // Buffered: the entry is removed in a later commit, so a
                // crash loses the copy only together with the removal.
                let r = me
                    .publish_stamped(
                        &h,
                        messages.into_iter().enumerate().collect(),
                        Durability::Buffered,
                    )
                    .await?;
                Ok(r.into_iter().map(|(_, r)| r).collect())
            }
            .boxed()
        })
    }

    /// An existing topic, or `InvalidConfig` naming it.
    fn known_topic(&self, topic: &str) -> Result<TopicHandle, Error> {
        self.inner
            .topics
            .get(topic)
            .map(|h| h.clone())
            .ok_or_else(|| Error::InvalidConfig {
                reason: format!("topic `{topic}` does not exist"),
            })
    }

    /// The group actor of a subscription running in this process.
    fn running_group(&self, group: &str, topic: &str) -> Option<Addr<GroupActor>> {
        self.inner
            .groups
            .get(&(group.to_string(), topic.to_string()))
            .map(|g| g.addr.clone())
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn reader(&self) -> Result<StoreReader, Error> {
        self.inner
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed)
    }

    async fn topic(&self, config: TopicConfig, system: bool) -> Result<TopicHandle, Error> {
        let settings = TopicSettings {
            retention: config.retention_limits(),
            trace: config.traced(),
        };
        if let Some(h) = self.inner.topics.get(config.name()) {
            let h = h.clone();
            if h.queues != config.queue_count() {
                return Err(Error::TopicConflict {
                    topic: config.name().to_string(),
                    reason: format!(
                        "it has {} queues, {} were asked for",
                        h.queues,
                        config.queue_count()
                    ),
                });
            }
            self.configure(&h, settings).await?;
            return Ok(h);
        }
        if system {
            config.validate_system()?;
        } else {
            config.validate()?;
        }
        self.check_open()?;
        let _guard = self.inner.create_lock.lock().await;
        if let Some(h) = self.inner.topics.get(config.name()) {
            return Ok(h.clone());
        }
        let id = self
            .inner
            .persistence
            .send(CreateTopic {
                name: config.name().to_string(),
                queues: config.queue_count(),
                settings: settings.clone(),
            })
            .await
            .map_err(|_| Error::Closed)??;
        let h = spawn_topic(
            &self.inner.broker_arbiter,
            &self.inner.persistence,
            config.name(),
            id,
            vec![0; config.queue_count() as usize],
            settings,
        );
        info!(
            topic = config.name(),
            queues = config.queue_count(),
            "topic created"
        );
        self.inner
            .topics
            .insert(config.name().to_string(), h.clone());
        Ok(h)
    }

    /// Applies new retention and trace settings to an existing topic.
    async fn configure(&self, h: &Topic, settings: TopicSettings) -> Result<(), Error> {
        let same = *h.settings.lock().unwrap_or_else(|p| p.into_inner()) == settings;
        if same {
            return Ok(());
        }
        self.check_open()?;
        let _guard = self.inner.create_lock.lock().await;
        self.inner
            .persistence
            .send(ConfigureTopic {
                name: h.name.to_string(),
                id: h.id,
                queues: h.queues,
                settings: settings.clone(),
            })
            .await
            .map_err(|_| Error::Closed)??;
        h.trace.store(settings.trace, Ordering::Relaxed);
        info!(topic = %h.name, ?settings, "topic reconfigured");
        *h.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        Ok(())
    }

    async fn existing_or_default(&self, name: &str, system: bool) -> Result<TopicHandle, Error> {
        if let Some(h) = self.inner.topics.get(name) {
            return Ok(h.clone());
        }
        // Dead-letter topics have one queue: their order is the order of death.
        let queues = if system {
            1
        } else {
            weirmq_bus::DEFAULT_QUEUES
        };
        self.topic(TopicConfig::new(name).queues(queues), system)
            .await
    }

    /// Takes room for `n` messages in the publish pipeline (bounded by
    /// `max_pending_messages`): waits for it, or fails with `Busy`.
    async fn admit(&self, n: usize, wait: bool) -> Result<SemaphorePermit<'_>, Error> {
        let permits = n.clamp(1, self.inner.max_pending) as u32;
        if wait {
            return self
                .inner
                .pending
                .acquire_many(permits)
                .await
                .map_err(|_| Error::Closed);
        }
        self.inner
            .pending
            .try_acquire_many(permits)
            .map_err(|e| match e {
                TryAcquireError::Closed => Error::Closed,
                TryAcquireError::NoPermits => Error::Busy {
                    pending: self.inner.max_pending - self.inner.pending.available_permits(),
                },
            })
    }

    /// Validates, admits and publishes a batch (to one or more topics).
    async fn publish_messages(
        &self,
        mut messages: Vec<OutgoingMessage>,
        durability: Durability,
        wait: bool,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.check_open()?;
        for m in &messages {
            self.inner.limits.check(m)?;
        }
        self.disk_room(&messages)?;
        let n = messages.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        // A delayed message goes to the schedule topic (its own topic is
        // named in it); one whose time has come goes straight through.
        let now = std::time::SystemTime::now();
        for m in &mut messages {
            if m.deliver_at.is_some_and(|t| t <= now) {
                m.deliver_at = None;
            }
            if m.deliver_at.is_some() {
                self.existing_or_default(&m.topic, false).await?;
            }
        }
        // The hot path: no allocation per message to pick its topic.
        fn route(m: &OutgoingMessage) -> &str {
            match m.deliver_at {
                Some(_) => SCHEDULE_TOPIC,
                None => &m.topic,
            }
        }
        let _room = self.admit(n, wait).await?;
        if messages.iter().all(|m| route(m) == route(&messages[0])) {
            let first = route(&messages[0]).to_string();
            let system = first == SCHEDULE_TOPIC;
            let r = self
                .publish_to(
                    &first,
                    messages.into_iter().enumerate().collect(),
                    durability,
                    system,
                )
                .await?;
            return Ok(r.into_iter().map(|(_, r)| r).collect());
        }
        let mut by_topic: HashMap<String, Vec<(usize, OutgoingMessage)>> = HashMap::new();
        for (i, m) in messages.into_iter().enumerate() {
            by_topic
                .entry(route(&m).to_string())
                .or_default()
                .push((i, m));
        }
        let parts = futures::future::try_join_all(by_topic.into_iter().map(|(t, ms)| async move {
            let system = t == SCHEDULE_TOPIC;
            self.publish_to(&t, ms, durability, system).await
        }))
        .await?;
        let mut out: Vec<Option<SendReceipt>> = vec![None; n];
        for (i, r) in parts.into_iter().flatten() {
            out[i] = Some(r);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Publishes messages that were already validated and admitted, to one
    /// topic.
    async fn publish_to(
        &self,
        topic: &str,
        messages: Vec<(usize, OutgoingMessage)>,
        durability: Durability,
        system: bool,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        self.check_open()?;
        let h = self.existing_or_default(topic, system).await?;
        let stamped: Vec<(usize, BusMessage)> = messages
            .into_iter()
            .map(|(i, m)| {
                // Staged in a system topic (a delayed message): say for which.
                let destination = (*m.topic != *h.name).then(|| m.topic.clone());
                let msg = BusMessage::prepare(m, h.name.clone());
                (
                    i,
                    match destination {
                        Some(d) => msg.with_destination(d),
                        None => msg,
                    },
                )
            })
            .collect();
        self.publish_stamped(&h, stamped, durability).await
    }

    /// Stores messages already stamped (id, birth time) in topic `h`;
    /// returns each one's receipt with its index.
    async fn publish_stamped(
        &self,
        h: &Topic,
        messages: Vec<(usize, BusMessage)>,
        durability: Durability,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        self.publish_stamped_with(h, messages, durability, Vec::new())
            .await
    }

    /// As `publish_stamped`, with application state written atomically with
    /// the messages (the local outbox).
    async fn publish_stamped_with(
        &self,
        h: &Topic,
        messages: Vec<(usize, BusMessage)>,
        durability: Durability,
        state: Vec<weirmq_bus::StateOp>,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        let n = messages.len();
        let idx: Vec<usize> = messages.iter().map(|(i, _)| *i).collect();
        let stamped: Vec<(usize, BusMessage)> = messages
            .into_iter()
            .enumerate()
            .map(|(j, (_, m))| (j, m))
            .collect();
        let (tx, rx) = oneshot::channel();
        let part = PublishPart {
            state,
            messages: stamped,
            durability,
            collector: Collector::new(n, tx),
        };
        // Group commit starts here: the first publisher to find the outbox
        // empty yields once, so every publish made meanwhile (from this
        // thread or others) crosses to the broker in the same message.
        let first = {
            let mut outbox = h.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.push(part);
            outbox.len() == 1
        };
        if first {
            let _send = OutboxSender(h);
            tokio::task::yield_now().await;
        }
        let receipts = rx.await.map_err(|_| Error::Closed)??;
        Ok(idx.into_iter().zip(receipts).collect())
    }

    fn dead_letter_sink(&self) -> DeadLetterSink {
        let me = self.clone();
        Arc::new(move |m: OutgoingMessage| {
            let me = me.clone();
            async move {
                let topic = m.topic.clone();
                let _room = me.admit(1, true).await?;
                let mut r = me
                    .publish_to(&topic, vec![(0, m)], Durability::Flushed, true)
                    .await?;
                r.pop().map(|(_, r)| r).ok_or_else(|| {
                    Error::Storage(StorageError::msg("no receipt for a dead letter"))
                })
            }
            .boxed()
        })
    }

    /// Reads up to `max` stored messages of `topic`'s `queue` from `from`.
    /// System topics (`%DLQ%<group>`) can be read too.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an unknown topic or queue, or a storage
    /// error.
    async fn read_queue_impl(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<BusMessage>>, Error> {
        let h = self.known_topic(topic)?;
        if queue >= h.queues {
            return Err(Error::InvalidConfig {
                reason: format!("topic `{topic}` has {} queues, not {}", h.queues, queue + 1),
            });
        }
        let reader = self.reader()?;
        let end = h.ends[queue as usize].load(Ordering::Acquire);
        let key = QueueKey {
            topic_id: h.id,
            queue,
        };
        let name = h.name.clone();
        tokio::task::spawn_blocking(move || reader.read_range(&name, key, from, end, max))
            .await
            .map_err(|e| Error::Storage(StorageError::msg(e.to_string())))?
            .map_err(Error::from)
    }

    /// One page of `group`'s dead letters, oldest first, from DLQ offset
    /// `from`.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn dead_letters_impl(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let topic = dlq_topic(group);
        if !self.inner.topics.contains_key(&topic) {
            return Ok(Vec::new());
        }
        let messages = self.read_queue_impl(&topic, 0, from, max).await?;
        let resent = self.reader()?.resent(group)?;
        Ok(messages
            .into_iter()
            .map(|m| DeadLetter {
                dlq_offset: m.offset(),
                resent: resent.contains(&m.offset()),
                message: m,
            })
            .collect())
    }

    /// How many dead letters `group` has (resent ones included, until
    /// purged).
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn dead_letter_count_impl(&self, group: &str) -> Result<u64, Error> {
        let Some(h) = self.inner.topics.get(&dlq_topic(group)).map(|h| h.clone()) else {
            return Ok(0);
        };
        Ok(self.reader()?.count(QueueKey {
            topic_id: h.id,
            queue: 0,
        })?)
    }

    /// Sends dead letters back to `group` (and no other group) as attempt 1,
    /// each at most once; one report per message.
    ///
    /// # Errors
    ///
    /// A storage error reading the dead-letter queue (a failure to schedule
    /// a resend is reported per message instead).
    async fn resend_dead_letters_impl(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        validate_group_name(group)?;
        self.check_open()?;
        // One resend at a time, so two cannot both find a letter unsent.
        let _guard = self.inner.create_lock.lock().await;
        let mut letters = Vec::new();
        loop {
            let from = letters.last().map_or(0, |l: &DeadLetter| l.dlq_offset + 1);
            let page = self.dead_letters_impl(group, from, 1000).await?;
            if page.is_empty() {
                break;
            }
            letters.extend(page);
        }
        let mut reports: Vec<ResendReport> = Vec::new();
        let mut chosen: Vec<(usize, DeadLetter)> = Vec::new();
        let pick = |dl: &DeadLetter, chosen: &Vec<(usize, DeadLetter)>| {
            !dl.resent && !chosen.iter().any(|(_, c)| c.dlq_offset == dl.dlq_offset)
        };
        match which {
            Resend::All => {
                for dl in letters.iter().filter(|d| !d.resent) {
                    let Some(id) = dl.original_id() else { continue };
                    reports.push(ResendReport {
                        message_id: id,
                        outcome: ResendOutcome::Resent,
                    });
                    chosen.push((reports.len() - 1, dl.clone()));
                }
            }
            Resend::Ids(ids) => {
                for id in ids {
                    let found: Vec<&DeadLetter> = letters
                        .iter()
                        .filter(|d| d.original_id() == Some(id))
                        .collect();
                    let outcome = match found.iter().find(|d| pick(d, &chosen)) {
                        Some(dl) => {
                            chosen.push((reports.len(), (*dl).clone()));
                            ResendOutcome::Resent
                        }
                        None if found.is_empty() => ResendOutcome::NotFound,
                        None => ResendOutcome::AlreadyResent,
                    };
                    reports.push(ResendReport {
                        message_id: id,
                        outcome,
                    });
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut entries: Vec<(String, RetryEntry)> = Vec::new();
        let mut marks = Vec::new();
        let mut traces = Vec::new();
        for (at, dl) in &chosen {
            let origin = dl
                .origin_topic()
                .and_then(|t| self.inner.topics.get(t).map(|h| h.clone()));
            let (Some(h), Some(queue), Some(offset)) =
                (origin, dl.origin_queue(), dl.origin_offset())
            else {
                reports[*at].outcome = ResendOutcome::Failed(
                    "the dead letter does not say where it came from, or that topic is gone".into(),
                );
                continue;
            };
            // The retry names the original in its queue: it must still be there.
            let key = QueueKey {
                topic_id: h.id,
                queue,
            };
            let kept = self
                .reader()?
                .read_range(&h.name, key, offset, offset + 1, 1)
                .map(|m| m.len() == 1)?;
            if !kept {
                reports[*at].outcome = ResendOutcome::Failed(format!(
                    "the original message ({} queue {queue} offset {offset}) was removed by \
                     retention; read the dead letter and publish it again instead",
                    h.name
                ));
                continue;
            }
            if h.trace.load(Ordering::Relaxed) {
                traces.push(TraceRecord {
                    key,
                    offset,
                    event: TraceEvent::now(TraceKind::Resent, Some(group), 1, None),
                });
            }
            entries.push((
                h.name.to_string(),
                RetryEntry {
                    key: RetryKey {
                        group: group.to_string(),
                        topic_id: h.id,
                        due_ms: now,
                        seq: next_seq(),
                    },
                    queue,
                    offset,
                    attempt: 1,
                    first_failed_ms: now,
                    last_error: "resent from the dead-letter queue".into(),
                },
            ));
            marks.push((group.to_string(), dl.dlq_offset));
        }
        if entries.is_empty() {
            return Ok(reports);
        }
        let (tx, rx) = oneshot::channel();
        self.inner.persistence.do_send(UpdateRetries {
            put: entries.iter().map(|(_, e)| e.clone()).collect(),
            remove: Vec::new(),
            resent: marks,
            unschedule: Vec::new(),
            reschedule: Vec::new(),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        match rx.await.map_err(|_| Error::Closed)? {
            Ok(()) => {
                info!(group, resent = entries.len(), "dead letters resent");
                if !traces.is_empty() {
                    self.inner.persistence.do_send(RecordTrace(traces));
                }
                let mut by_topic: HashMap<String, Vec<RetryEntry>> = HashMap::new();
                for (t, e) in entries {
                    by_topic.entry(t).or_default().push(e);
                }
                for (topic, es) in by_topic {
                    if let Some(addr) = self.running_group(group, &topic) {
                        addr.do_send(AddRetries(es));
                    }
                }
            }
            Err(e) => {
                for r in &mut reports {
                    if r.outcome == ResendOutcome::Resent {
                        r.outcome = ResendOutcome::Failed(e.to_string());
                    }
                }
            }
        }
        Ok(reports)
    }

    /// Deletes every dead letter of `group`; returns how many.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn purge_dead_letters_impl(&self, group: &str) -> Result<u64, Error> {
        let Some(h) = self.inner.topics.get(&dlq_topic(group)).map(|h| h.clone()) else {
            return Ok(0);
        };
        let n = self
            .inner
            .persistence
            .send(PurgeQueue {
                key: QueueKey {
                    topic_id: h.id,
                    queue: 0,
                },
                group: group.to_string(),
            })
            .await
            .map_err(|_| Error::Closed)??;
        info!(group, purged = n, "dead letters purged");
        Ok(n)
    }

    fn topics_impl(&self) -> Vec<TopicConfig> {
        let mut v: Vec<TopicConfig> = self.inner.topics.iter().map(|h| h.config()).collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }
}

/// Runs a store read off the actix threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Storage(StorageError::msg(e.to_string())))?
        .map_err(Error::from)
}

fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

#[derive(Debug)]
struct GroupSettler {
    addr: Addr<GroupActor>,
}

impl Settler for GroupSettler {
    fn settle(&self, batch: Vec<(SettleToken, Settlement)>) {
        // A control message bounded by the subscription's in-flight window.
        self.addr.do_send(Settle(batch));
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.inner.durable, self.inner.durable, true)
    }

    async fn ensure_topic(&self, config: TopicConfig) -> Result<TopicConfig, Error> {
        config.validate()?;
        let h = self.topic(config, false).await?;
        Ok(h.config())
    }

    async fn publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.publish_messages(messages, durability, true).await
    }

    async fn try_publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.publish_messages(messages, durability, false).await
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<BrokerSubscription, Error> {
        self.check_open()?;
        validate_group_name(&spec.group)?;
        validate_topic_name(&spec.topic)?;
        let h = self.existing_or_default(&spec.topic, false).await?;
        let key = (spec.group.clone(), spec.topic.clone());
        let _guard = self.inner.create_lock.lock().await;
        if self.inner.groups.contains_key(&key) {
            return Err(Error::AlreadySubscribed {
                group: spec.group,
                topic: spec.topic,
            });
        }
        let reader = self.reader()?;
        let stored = reader.load_offsets(&spec.group, h.id)?;
        let retries = reader.load_retries(&spec.group, h.id)?;
        let mut starts = Vec::with_capacity(h.queues as usize);
        for q in 0..h.queues {
            let s = match stored.get(&q) {
                Some(s) => s.clone(),
                None => OffsetState {
                    committed: match spec.start {
                        StartFrom::Latest => h.ends[q as usize].load(Ordering::Acquire),
                        StartFrom::Earliest => reader.queue_start(QueueKey {
                            topic_id: h.id,
                            queue: q,
                        })?,
                    },
                    acked_above: Vec::new(),
                },
            };
            starts.push(s);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let setup = GroupSetup {
            group: spec.group.clone(),
            topic: h.name.clone(),
            topic_id: h.id,
            starts,
            ends: h.ends.clone(),
            max_in_flight: spec.max_in_flight,
            reader,
            persistence: self.inner.persistence.clone(),
            deliveries: tx,
            dead_letters: self.dead_letter_sink(),
            retries,
            filter: spec.filter.clone(),
            trace: h.trace.clone(),
            ordering: spec.ordering,
        };
        let addr = GroupActor::start_in_arbiter(&self.inner.broker_arbiter, move |_| {
            GroupActor::new(setup)
        });
        let listen_id = self.inner.next_listen_id.fetch_add(1, Ordering::Relaxed);
        for q in &h.queue_addrs {
            q.do_send(Listen {
                id: listen_id,
                group: addr.clone(),
            });
        }
        info!(group = %spec.group, topic = %spec.topic, "subscribed");
        self.inner.groups.insert(
            key,
            GroupHandle {
                addr: addr.clone(),
                listen_id,
            },
        );
        Ok(BrokerSubscription {
            deliveries: rx,
            settler: Arc::new(GroupSettler { addr }),
        })
    }

    async fn unsubscribe(&self, group: &str, topic: &str) -> Result<(), Error> {
        let Some((_, g)) = self
            .inner
            .groups
            .remove(&(group.to_string(), topic.to_string()))
        else {
            return Ok(());
        };
        if let Some(h) = self.inner.topics.get(topic) {
            for q in &h.queue_addrs {
                q.do_send(Unlisten { id: g.listen_id });
            }
        }
        let _ = g.addr.send(StopGroup).await;
        info!(group, topic, "unsubscribed");
        Ok(())
    }

    async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        let running = self.running_group(group, topic);
        if let Some(addr) = running {
            if let Ok((p, _)) = addr.send(Inspect).await {
                return Ok(p);
            }
        }
        let h = self.known_topic(topic)?;
        let reader = self.reader()?;
        let stored = reader.load_offsets(group, h.id)?;
        (0..h.queues)
            .map(|q| {
                let max = h.ends[q as usize].load(Ordering::Acquire);
                let mut s = stored.get(&q).cloned().unwrap_or_default();
                // Retention may have removed what the group has not read:
                // it will continue at the first kept message.
                let start = reader.queue_start(QueueKey {
                    topic_id: h.id,
                    queue: q,
                })?;
                if s.committed < start {
                    s.committed = start;
                    s.acked_above.retain(|o| *o >= start);
                }
                Ok(QueuePosition {
                    queue: q,
                    committed: s.committed,
                    max,
                    lag: max
                        .saturating_sub(s.committed)
                        .saturating_sub(s.acked_above.len() as u64),
                })
            })
            .collect()
    }

    async fn group_stats(&self, group: &str, topic: &str) -> GroupStats {
        let running = self.running_group(group, topic);
        match running {
            Some(addr) => addr.send(Inspect).await.map(|(_, s)| s).unwrap_or_default(),
            None => GroupStats::default(),
        }
    }

    async fn topics(&self) -> Vec<TopicConfig> {
        self.topics_impl()
    }

    async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<BusMessage>>, Error> {
        self.read_queue_impl(topic, queue, from, max).await
    }

    async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        self.check_open()?;
        let h = self.known_topic(topic)?;
        let reader = self.reader()?;
        let mut targets = Vec::with_capacity(h.queues as usize);
        for q in 0..h.queues {
            let key = QueueKey {
                topic_id: h.id,
                queue: q,
            };
            let end = h.ends[q as usize].load(Ordering::Acquire);
            let start = reader.queue_start(key)?;
            targets.push(match to {
                ResetTo::Earliest => start,
                ResetTo::Latest => end,
                ResetTo::Time(t) => {
                    let ms = t
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    reader.offset_at_time(&h.name, key, start, end, ms)?
                }
            });
        }
        let running = self.running_group(group, topic);
        if let Some(addr) = running {
            let positions = addr
                .send(ResetPositions(targets.clone()))
                .await
                .map_err(|_| Error::Closed)?;
            info!(group, topic, ?to, ?targets, "positions reset");
            return Ok(positions);
        }
        let entries = targets
            .iter()
            .enumerate()
            .map(|(q, t)| {
                (
                    QueueKey {
                        topic_id: h.id,
                        queue: q as u32,
                    },
                    OffsetState {
                        committed: *t,
                        acked_above: Vec::new(),
                    },
                )
            })
            .collect();
        self.inner
            .persistence
            .send(CommitOffsets {
                group: group.to_string(),
                entries,
                now: true,
            })
            .await
            .map_err(|_| Error::Closed)?;
        info!(group, topic, ?to, ?targets, "positions reset");
        self.positions(group, topic).await
    }

    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        self.dead_letters_impl(group, from, max).await
    }

    async fn dead_letter_count(&self, group: &str) -> Result<u64, Error> {
        self.dead_letter_count_impl(group).await
    }

    async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        self.resend_dead_letters_impl(group, which).await
    }

    async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error> {
        self.purge_dead_letters_impl(group).await
    }

    async fn publish_half(
        &self,
        mut message: OutgoingMessage,
        durability: Durability,
    ) -> Result<HalfMessage, Error> {
        self.check_open()?;
        self.inner.limits.check(&message)?;
        self.disk_room(std::slice::from_ref(&message))?;
        if message.deliver_at.is_some() {
            return Err(Error::Unsupported {
                feature: "a delayed transactional message (delay it after the commit instead)"
                    .into(),
            });
        }
        let dest = self.existing_or_default(&message.topic, false).await?;
        let config = self
            .inner
            .checkers
            .get(&message.topic)
            .map(|c| c.1)
            .unwrap_or_default();
        // Its "delivery" time is its first check.
        message.deliver_at = Some(std::time::SystemTime::now() + config.check_immunity);
        let half = self.existing_or_default(HALF_TOPIC, true).await?;
        let _room = self.admit(1, true).await?;
        let m = BusMessage::prepare(message, half.name.clone())
            .with_destination(dest.name.to_string())
            .as_half();
        let check_at_ms = m
            .deliver_at()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let mut r = self
            .publish_stamped(&half, vec![(0, m)], durability)
            .await?;
        let (_, receipt) = r.pop().ok_or(Error::Closed)?;
        Ok(HalfMessage {
            message_id: receipt.message_id,
            topic: dest.name.to_string(),
            offset: receipt.offset,
            check_at_ms,
        })
    }

    async fn end_transaction(
        &self,
        half: &HalfMessage,
        outcome: TransactionOutcome,
    ) -> Result<Option<SendReceipt>, Error> {
        self.check_open()?;
        let half_topic = self.known_topic(HALF_TOPIC)?;
        let scheduler = self
            .inner
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed)?;
        scheduler
            .send(EndTransaction {
                half: half.clone(),
                half_topic_id: half_topic.id,
                outcome,
            })
            .await
            .map_err(|_| Error::Closed)?
    }

    fn register_checker(
        &self,
        topic: &str,
        checker: Arc<dyn TransactionChecker>,
        config: TransactionConfig,
    ) -> Result<(), Error> {
        validate_topic_name(topic)?;
        self.inner
            .checkers
            .insert(topic.to_string(), (checker, config));
        Ok(())
    }

    async fn publish_with_state(
        &self,
        message: OutgoingMessage,
        durability: Durability,
        state: weirmq_bus::StateBatch,
    ) -> Result<SendReceipt, Error> {
        self.check_open()?;
        self.inner.limits.check(&message)?;
        self.disk_room(std::slice::from_ref(&message))?;
        if message.deliver_at.is_some() {
            return Err(Error::Unsupported {
                feature: "a delayed message with application state".into(),
            });
        }
        let h = self.existing_or_default(&message.topic, false).await?;
        let _room = self.admit(1, true).await?;
        let m = BusMessage::prepare(message, h.name.clone());
        let mut r = self
            .publish_stamped_with(&h, vec![(0, m)], durability, state.into_ops())
            .await?;
        r.pop().map(|(_, r)| r).ok_or(Error::Closed)
    }

    async fn write_state(
        &self,
        state: weirmq_bus::StateBatch,
        durability: Durability,
    ) -> Result<(), Error> {
        self.check_open()?;
        let (tx, rx) = oneshot::channel();
        // An append without messages: the state ops alone, in one
        // transaction, in commit order with everything else.
        self.inner.persistence.do_send(weirmq_persistence::Append {
            key: QueueKey {
                topic_id: u32::MAX,
                queue: 0,
            },
            messages: Vec::new(),
            durability,
            trace: false,
            state: state.into_ops(),
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.await.map_err(|_| Error::Closed)?.map_err(Error::from)
    }

    async fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let reader = self.reader()?;
        let key = key.to_vec();
        blocking(move || reader.state_get(&key)).await
    }

    async fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, Error> {
        let reader = self.reader()?;
        let prefix = prefix.to_vec();
        blocking(move || reader.state_scan(&prefix)).await
    }

    async fn query_id(&self, id: MessageId) -> Result<Option<Arc<BusMessage>>, Error> {
        self.check_open()?;
        let mut topics: Vec<(Arc<str>, u32, u32)> = self
            .inner
            .topics
            .iter()
            .map(|h| (h.name.clone(), h.id, h.queues))
            .collect();
        // User topics first; dead letters are copies with ids of their own.
        topics.sort_by_key(|(n, _, _)| (n.starts_with(SYSTEM_TOPIC_PREFIX), n.clone()));
        let reader = self.reader()?;
        blocking(move || reader.find_id(&topics, id)).await
    }

    async fn query_key(
        &self,
        topic: &str,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<BusMessage>>, Error> {
        self.check_open()?;
        let h = self.known_topic(topic)?;
        let reader = self.reader()?;
        let key = key.to_string();
        blocking(move || reader.find_key(&h.name, h.id, h.queues, &key, max)).await
    }

    async fn trace(&self, id: MessageId) -> Result<Option<MessageTrace>, Error> {
        let Some(m) = self.query_id(id).await? else {
            return Ok(None);
        };
        let h = self.known_topic(m.topic())?;
        let reader = self.reader()?;
        let key = QueueKey {
            topic_id: h.id,
            queue: m.queue(),
        };
        let offset = m.offset();
        let events = blocking(move || reader.trace_of(key, offset)).await?;
        Ok(Some(MessageTrace {
            id,
            topic: m.topic().to_string(),
            queue: m.queue(),
            offset,
            traced: h.trace.load(Ordering::Relaxed),
            events,
        }))
    }

    async fn enforce_retention(&self) -> Result<RetentionReport, Error> {
        self.check_open()?;
        Ok(self
            .inner
            .persistence
            .send(RunRetention)
            .await
            .map_err(|_| Error::Closed)??)
    }

    async fn shutdown(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let scheduler = self
            .inner
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(s) = scheduler {
            let _ = s.send(StopScheduler).await;
        }
        let groups: Vec<(String, String)> =
            self.inner.groups.iter().map(|e| e.key().clone()).collect();
        for (g, t) in groups {
            self.unsubscribe(&g, &t).await?;
        }
        // Publishes still waiting for a commit are answered before the store closes.
        let _drained = self
            .inner
            .pending
            .acquire_many(self.inner.max_pending as u32)
            .await;
        let result = self.inner.persistence.send(ShutdownStore).await;
        self.inner
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.topics.clear();
        let arbiters: Vec<Arbiter> = std::mem::take(
            &mut *self
                .inner
                .arbiters
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        tokio::task::spawn_blocking(move || {
            for a in arbiters {
                a.stop();
                let _ = a.join();
            }
        })
        .await
        .map_err(|e| Error::Storage(StorageError::msg(format!("stopping the broker: {e}"))))?;
        self.inner.pending.close();
        info!("weirmq embedded broker shut down");
        match result {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Ok(()),
        }
    }
}
