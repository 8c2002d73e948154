//! The embedded broker: [`EmbeddedBroker`] implements the `Broker` seam with
//! actix actors over the sled store, one file per role (`publisher.rs`,
//! `subscriptions.rs`, `admin.rs`, `dead_letters.rs`, `transactions.rs`,
//! `outbox.rs`, `history.rs`; contracts in `weirmq_bus::broker`), beside the
//! actors (`topic_actor.rs`, `queue_actor.rs`, `group_actor.rs`,
//! `scheduler.rs`) and the topic registry (`topics.rs`). This file opens and
//! shuts the broker down.
//!
//! # Threads
//!
//! * the **persistence arbiter** runs the `PersistenceActor` (the store's
//!   only writer, group commit) — with a data directory; in memory the
//!   writer runs on the broker arbiter (its commit has nothing to wait for);
//! * the **broker arbiter** runs every topic, queue and group actor, and the
//!   scheduler;
//! * the publisher's own thread validates and stamps messages and puts them
//!   in the topic's outbox; the first publisher to find it empty yields once
//!   and sends everything gathered to the topic actor as one message (in
//!   memory at most 16 publishes a message); each publish is answered once
//!   from the writer's thread.
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
//! the broker's arbiters (two on disk, one in memory) are stopped and
//! joined, so the data directory can be opened again at once.

// The roles (one file each; contracts in weirmq_bus::broker).
mod admin;
mod dead_letters;
mod dedupe;
mod history;
mod outbox;
mod publisher;
mod subscriptions;
mod topics;
mod transactions;

// The actors.
mod due;
mod group_actor;
mod queue_actor;
mod scheduler;
mod topic_actor;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use async_trait::async_trait;
use dashmap::DashMap;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};
use weirmq_bus::{
    dlq_topic, unix_ms, validate_group_name, validate_topic_name, Admin, Admission, Broker,
    BrokerSubscription, Capabilities, DeadLetter, DeadLetters, Durability, Error, GroupStats,
    GroupTopic, HalfMessage, History, Limits, Message as BusMessage, MessageId, MessageTrace,
    Outbox, OutgoingMessage, Publisher, QueuePosition, QueueStats, Resend, ResendOutcome,
    ResendPlan, ResendReport, ResetTo, RetentionReport, SendReceipt, SettleToken, Settlement,
    Settler, StartFrom, StorageError, SubscriptionSpec, Subscriptions, TopicConfig, TopicStats,
    TraceEvent, TraceKind, TransactionChecker, TransactionCheckers, TransactionConfig,
    TransactionOutcome, Transactions, HALF_TOPIC, SCHEDULE_TOPIC, SYSTEM_TOPIC_PREFIX,
};
use weirmq_persistence::DiskGuard;
use weirmq_persistence::{
    next_seq, CommitOffsets, ConfigureTopic, CreateTopic, OffsetState, PersistenceActor,
    PurgeQueue, QueueKey, RecordTrace, RetryEntry, RetryKey, RunRetention, SetScheduler,
    ShutdownStore, Store, StoreConfig, StoreReader, TopicSettings, TraceRecord, UpdateRetries,
};

use group_actor::{
    AddRetries, DeadLetterSink, GroupActor, GroupSetup, Inspect, ResetPositions, Settle, StopGroup,
};
use queue_actor::{Listen, QueueActor, Unlisten};
use scheduler::{Checkers, EndTransaction, MoveSink, Scheduler, StopScheduler};
use topic_actor::{Collector, PublishPart, TopicActor, TopicPublish};
use topics::{spawn_topic, OutboxSender, Topic, TopicHandle};

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
    /// The one source of time of every time-driven part (retries, delays,
    /// transaction checks, retention, stored times); it replaces
    /// `store.clock`. The system clock unless a test kit gives a manual
    /// one.
    pub clock: weirmq_bus::Clock,
    /// Runs the persistence actor and the broker's actors on the arbiter
    /// that opens the broker instead of two threads of their own: one
    /// thread for the whole bus, so a test driving a manual clock sees the
    /// same interleaving every run. Slower under load; for tests.
    pub current_arbiter: bool,
}

impl std::fmt::Debug for EmbeddedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedConfig")
            .field("store", &self.store)
            .field("limits", &self.limits)
            .field("max_pending_messages", &self.max_pending_messages)
            .field("clock", &self.clock)
            .field("current_arbiter", &self.current_arbiter)
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
            clock: weirmq_bus::Clock::system(),
            current_arbiter: false,
        }
    }
}

#[derive(Debug)]
struct GroupHandle {
    addr: Addr<GroupActor>,
    listen_id: u64,
}

struct Inner {
    durable: bool,
    closed: AtomicBool,
    topics: DashMap<String, TopicHandle>,
    groups: DashMap<(String, String), GroupHandle>,
    create_lock: tokio::sync::Mutex<()>,
    persistence: Addr<PersistenceActor>,
    broker_arbiter: ArbiterHandle,
    reader: Mutex<Option<StoreReader>>,
    arbiters: Mutex<Vec<Arbiter>>,
    /// Limits and the bound on publishes waiting for their commit.
    admission: Admission,
    next_listen_id: AtomicU64,
    scheduler: Mutex<Option<Addr<Scheduler>>>,
    checkers: Checkers,
    /// Refuses publishes before the disk is full.
    guard: DiskGuard,
    /// The time of every time-driven part.
    clock: weirmq_bus::Clock,
    /// Store reads run in place, not on the blocking pool
    /// (`current_arbiter`).
    reads_in_place: bool,
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
        let mut store_cfg = config.store.clone();
        store_cfg.clock = config.clock.clone();
        let (store, recovery) = tokio::task::spawn_blocking(move || Store::open(store_cfg))
            .await
            .map_err(|e| Error::Storage(StorageError::msg(format!("opening the store: {e}"))))??;
        let reader = store.reader();
        let guard = store.disk_guard();
        let (persistence_arbiter, broker_arbiter, own_arbiters) = if config.current_arbiter {
            (Arbiter::current(), Arbiter::current(), Vec::new())
        } else if !durable {
            // In memory a commit is a few map inserts with nothing to wait
            // for: the store's writer shares the broker's thread, so an
            // append and its commit cost no thread hop (see ARCHITECTURE.md,
            // "Threads and actors").
            let b = Arbiter::new();
            (b.handle(), b.handle(), vec![b])
        } else {
            let (p, b) = (Arbiter::new(), Arbiter::new());
            (p.handle(), b.handle(), vec![b, p])
        };
        let persistence = PersistenceActor::start_in_arbiter(&persistence_arbiter, move |_| {
            PersistenceActor::new(store, durable)
        });
        let topics = DashMap::new();
        for t in recovery.topics {
            let h = spawn_topic(
                &broker_arbiter,
                &persistence,
                &t.name,
                t.id,
                t.queues,
                t.ends,
                t.settings,
            );
            debug!(topic = %t.name, queues = t.queues, "topic recovered");
            topics.insert(t.name, h);
        }
        // Idempotency keys whose window is still open.
        let by_id: HashMap<u32, TopicHandle> =
            topics.iter().map(|t| (t.id, t.value().clone())).collect();
        for e in reader.dedupe_entries(config.clock.now_ms())? {
            if let Some(h) = by_id.get(&e.topic_id) {
                let receipt = SendReceipt {
                    message_id: e.id,
                    queue: e.queue,
                    offset: e.offset,
                    deliver_at: None,
                };
                h.dedupe
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .load(e.key, receipt, e.until_ms);
            }
        }
        info!(
            data_dir = ?config.store.path,
            topics = topics.len(),
            "weirmq embedded broker open"
        );
        let sched_reader = reader.clone();
        let broker = EmbeddedBroker {
            inner: Arc::new(Inner {
                durable,
                closed: AtomicBool::new(false),
                topics,
                groups: DashMap::new(),
                create_lock: tokio::sync::Mutex::new(()),
                persistence,
                broker_arbiter,
                reader: Mutex::new(Some(reader)),
                arbiters: Mutex::new(own_arbiters),
                admission: Admission::new(config.limits, config.max_pending_messages)
                    .with_clock(config.clock.clone()),
                next_listen_id: AtomicU64::new(0),
                scheduler: Mutex::new(None),
                guard,
                checkers: Arc::new(TransactionCheckers::new(config.checkers)),
                clock: config.clock,
                reads_in_place: config.current_arbiter,
            }),
        };
        let sink = broker.move_sink();
        let p = broker.inner.persistence.clone();
        let checkers = broker.inner.checkers.clone();
        let clock = broker.inner.clock.clone();
        let scheduler = Scheduler::start_in_arbiter(&broker.inner.broker_arbiter, move |_| {
            Scheduler::new(sched_reader, p, sink, checkers, clock)
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

    /// The scheduler (delayed messages, transactions), or `Closed` once the
    /// broker shut down.
    fn scheduler(&self) -> Result<Addr<Scheduler>, Error> {
        self.inner
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed)
    }

    fn reader(&self) -> Result<StoreReader, Error> {
        self.inner
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Error::Closed)
    }
}

impl EmbeddedBroker {
    /// Runs a store read off the actix threads — or in place on a broker
    /// that runs on one arbiter for a test kit (its store is in memory, and
    /// a read on another thread would be work the kit cannot see).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, Error> {
        if self.inner.reads_in_place {
            return f().map_err(Error::from);
        }
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::Storage(StorageError::msg(e.to_string())))?
            .map_err(Error::from)
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(
            "embedded sled",
            self.inner.durable,
            self.inner.durable,
            true,
        )
    }

    fn outbox(&self) -> Option<&dyn Outbox> {
        Some(self)
    }

    fn history(&self) -> Option<&dyn History> {
        Some(self)
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
        let _drained = self.inner.admission.drain().await;
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
        self.inner.admission.close();
        info!("weirmq embedded broker shut down");
        match result {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Ok(()),
        }
    }
}
