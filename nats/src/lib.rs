//! weirmq's NATS JetStream backend.
//!
//! [`NatsBroker`] implements the [`Broker`] seam on a JetStream server (or
//! cluster), so the same `Bus`, handler actors, supervisor, retry policy and
//! dead-lettering run on it unchanged. Open it with
//! `weirmq::Bus::builder().nats(url)`; this crate is what that uses.
//!
//! # Mapping
//!
//! * A topic is a stream (limits retention, file storage) with one subject
//!   per queue; a message's payload is weirmq's envelope (id, tag, keys,
//!   properties, body), its `Nats-Msg-Id` its id (publish dedupe).
//! * A consumer group is one durable pull consumer per queue, shared by
//!   every member in every process (clustering); a broadcast member is its
//!   own group (`<group>%<id>`), as on the embedded store.
//! * Retry is a `Nak` with the retry policy's delay; the attempt is
//!   JetStream's delivery count. Dead-lettering copies the message to the
//!   dead-letter stream, then terminates it.
//! * FIFO: one process at a time owns a queue (a lease); it delivers one
//!   message per message group at a time and retries a failed one in place.
//! * Delayed messages wait in a schedule stream; a forwarder consumer in
//!   every process naks each until it is due, then publishes it to its
//!   topic (same id, deduplicated) — the only path on 2.9, which has no
//!   message schedules.
//! * Half messages wait in a half stream; `end_transaction` moves or
//!   deletes them, and a checker consumer asks the topic's
//!   [`TransactionChecker`] about those left open.
//!
//! What JetStream cannot do is [`Error::Unsupported`], listed in
//! `docs/scaling.md`: query by id or key, trace, an on-demand retention
//! pass (the server enforces retention itself), the local outbox.

mod lease;
mod names;
mod subscription;
mod system;

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use weirmq_bus::{
    queue_for_message_group, validate_group_name, validate_topic_name, Broker, BrokerSubscription,
    Capabilities, DeadLetter, Durability, Error, GroupStats, HalfMessage, Limits, Message,
    MessageId, MessageTrace, OutgoingMessage, QueuePosition, Resend, ResendOutcome, ResendReport,
    ResetTo, RetentionReport, SendReceipt, StateBatch, StateEntries, StorageError,
    SubscriptionSpec, TopicConfig, TransactionChecker, TransactionConfig, TransactionOutcome,
    DLQ_PROPERTIES,
};

use names::*;
use subscription::SubState;

/// How a [`NatsBroker`] connects and behaves.
#[derive(Clone)]
pub struct NatsConfig {
    /// The server(s), e.g. `nats://127.0.0.1:4222` (comma-separated for a
    /// cluster).
    pub url: String,
    /// How long the server waits for a delivery's settlement before it
    /// redelivers it, to this or another process (default 30 s). A process
    /// that dies holding messages releases them after this long; handlers
    /// that run longer are kept alive by progress acks.
    pub ack_wait: Duration,
    /// Message size and delay limits (as on the embedded store).
    pub limits: Limits,
    /// The most publishes awaiting their JetStream ack at once (default
    /// 65,536); `try_publish` answers [`Error::Busy`] beyond it.
    pub max_pending_messages: usize,
    /// Replicas of every stream weirmq creates (default 1; 3 on a 3-node
    /// cluster).
    pub replicas: usize,
    /// Transaction checkers registered from the start, by topic.
    pub checkers: Vec<(String, Arc<dyn TransactionChecker>, TransactionConfig)>,
    /// Delay with the server's message schedules where it has them (2.12+)
    /// instead of weirmq's forwarder. Default `false`: on 2.12.8 the
    /// server fired schedules 145 ms late at the median and 270 ms at p99,
    /// the forwarder 1–1.4 ms and 2.2–3 ms (BENCHMARKS.md). Turn it on when
    /// delayed messages must fire with no weirmq process running.
    pub use_message_schedules: bool,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("ack_wait", &self.ack_wait)
            .field("limits", &self.limits)
            .field("replicas", &self.replicas)
            .finish()
    }
}

impl NatsConfig {
    /// Defaults for the server(s) at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            ack_wait: Duration::from_secs(30),
            limits: Limits::default(),
            max_pending_messages: 65_536,
            replicas: 1,
            checkers: Vec::new(),
            use_message_schedules: false,
        }
    }
}

/// What the connected server can do natively, detected at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFeatures {
    /// The server's version, as it reports it.
    pub version: String,
    /// Consumers with several filter subjects (2.10+). weirmq filters tags
    /// on the client on every version, so this is informational.
    pub multi_filter: bool,
    /// Message schedules (2.12+). With
    /// [`NatsConfig::use_message_schedules`], delayed messages are schedule
    /// definitions in their topic's stream, fired by the server; otherwise
    /// (and always before 2.12) weirmq's forwarder delays them.
    pub message_schedules: bool,
}

impl ServerFeatures {
    fn detect(version: &str) -> Self {
        let mut parts = version
            .trim_start_matches('v')
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        let at_least = |m: u32| major > 2 || (major == 2 && minor >= m);
        ServerFeatures {
            version: version.to_string(),
            multi_filter: at_least(10),
            message_schedules: at_least(12),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) ack_wait: Duration,
    pub(crate) limits: Limits,
    pub(crate) replicas: usize,
    pub(crate) features: ServerFeatures,
    /// Delays use the server's message schedules (2.12+, unless turned off).
    native_schedules: bool,
    /// Known topics: queue count and round-robin counter.
    topics: DashMap<String, Arc<TopicState>>,
    subs: DashMap<(String, String), Arc<SubState>>,
    pub(crate) checkers: DashMap<String, (Arc<dyn TransactionChecker>, TransactionConfig)>,
    pending: Arc<Semaphore>,
    max_pending: usize,
    closed: AtomicBool,
    /// Stops the system loops (forwarder, checker).
    pub(crate) stop: watch::Sender<bool>,
    system_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

pub(crate) struct TopicState {
    pub(crate) config: TopicConfig,
    next: AtomicU64,
    /// Delayed messages up to this far ahead use the server's message
    /// schedules (2.12+): the definition waits in the topic's stream, so it
    /// must not outlive the stream's `max_age`, and a size-limited stream
    /// could drop it. `None`: every delay takes the forwarder.
    native_horizon: Option<Duration>,
}

impl TopicState {
    fn pick_queue(&self, m: &Message) -> u32 {
        let n = self.config.queue_count();
        match m.message_group() {
            Some(g) => queue_for_message_group(g, n),
            None => (self.next.fetch_add(1, AtomicOrdering::Relaxed) % n as u64) as u32,
        }
    }
}

/// The runtime NATS I/O runs on: the client's connection, subscriptions'
/// fetch loops and settlement tasks live here, independent of the actix
/// arbiters that call the broker.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The NATS JetStream backend. Cheap to clone.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
    _rt: Arc<Runtime>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("server", &self.inner.features)
            .finish()
    }
}

pub(crate) fn nats_err(context: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Storage(StorageError::msg(format!("{}: {e}", context.into())))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NatsBroker {
    /// Connects, checks that JetStream is enabled, creates the system
    /// streams and starts the delay forwarder and the transaction checker.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] naming the server if it cannot be reached or has
    /// no JetStream.
    pub async fn connect(config: NatsConfig) -> Result<NatsBroker, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weirmq-nats")
            .enable_all()
            .build()
            .map_err(|e| nats_err("cannot start the NATS runtime", e))?;
        let handle = rt.handle().clone();
        let rt = Arc::new(Runtime(Some(rt)));
        let inner = handle
            .spawn(Self::connect_inner(config, handle.clone()))
            .await
            .map_err(|e| nats_err("NATS connect task", e))??;
        let broker = NatsBroker { inner, _rt: rt };
        let tasks = system::start(broker.inner.clone());
        *broker.inner.system_tasks.lock().unwrap() = tasks;
        Ok(broker)
    }

    async fn connect_inner(
        config: NatsConfig,
        handle: tokio::runtime::Handle,
    ) -> Result<Arc<Inner>, Error> {
        let url = config.url.clone();
        let client = async_nats::ConnectOptions::new()
            .name("weirmq")
            .connection_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
            .map_err(|e| {
                nats_err(
                    format!("cannot connect to NATS at {url} (is nats-server running, with -js?)"),
                    e,
                )
            })?;
        let features = ServerFeatures::detect(&client.server_info().version);
        let js = jetstream::new(client.clone());
        // A cheap JetStream round trip: fails clearly without `-js`.
        js.get_stream(DLQ_STREAM).await.ok();
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            js,
            client,
            handle,
            ack_wait: config.ack_wait.max(Duration::from_secs(1)),
            limits: config.limits,
            replicas: config.replicas.max(1),
            native_schedules: features.message_schedules && config.use_message_schedules,
            features,
            topics: DashMap::new(),
            subs: DashMap::new(),
            checkers: DashMap::new(),
            pending: Arc::new(Semaphore::new(config.max_pending_messages.max(1))),
            max_pending: config.max_pending_messages.max(1),
            closed: AtomicBool::new(false),
            stop,
            system_tasks: std::sync::Mutex::new(Vec::new()),
        });
        for (topic, checker, cfg) in config.checkers {
            inner.checkers.insert(topic, (checker, cfg));
        }
        for (name, subjects, per_subject) in [
            (DLQ_STREAM, "wqdlq.>", -1),
            (SCHEDULE_STREAM, "wqsched.>", -1),
            (HALF_STREAM, "wqhalf.>", -1),
            (HALF_CHECKS_STREAM, "wqhalfc.>", 1),
            (LEASE_STREAM, "wqlease.>", 1),
        ] {
            inner
                .system_stream(name, subjects, per_subject)
                .await
                .map_err(|e| {
                    nats_err(
                        format!(
                            "NATS at {url} refused to create stream {name} (is JetStream \
                             enabled: nats-server -js?)"
                        ),
                        e,
                    )
                })?;
        }
        let v = &inner.features;
        info!(server = %v.version, multi_filter = v.multi_filter,
            message_schedules = v.message_schedules,
            "connected to NATS JetStream");
        Ok(inner)
    }

    /// What the connected server offers natively.
    pub fn server_features(&self) -> &ServerFeatures {
        &self.inner.features
    }

    /// Runs `f` on the NATS runtime and waits for it.
    async fn run<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let inner = self.inner.clone();
        if inner.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::Closed);
        }
        self.inner
            .handle
            .spawn(f(inner))
            .await
            .map_err(|_| Error::Closed)?
    }
}

impl Inner {
    async fn system_stream(
        &self,
        name: &str,
        subjects: &str,
        per_subject: i64,
    ) -> Result<(), String> {
        if self.js.get_stream(name).await.is_ok() {
            return Ok(());
        }
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: per_subject,
            num_replicas: self.replicas,
            description: Some("weirmq system stream".into()),
            ..Default::default()
        };
        match self.js.create_stream(config).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Another process may have created it meanwhile.
                if self.js.get_stream(name).await.is_ok() {
                    Ok(())
                } else {
                    Err(e.to_string())
                }
            }
        }
    }

    /// The topic's state, creating its stream with `config` (or reading the
    /// existing one's) if this process has not seen it yet.
    pub(crate) async fn topic(
        &self,
        config: TopicConfig,
        explicit: bool,
    ) -> Result<Arc<TopicState>, Error> {
        if let Some(t) = self.topics.get(config.name()) {
            if explicit && t.config.queue_count() != config.queue_count() {
                return Err(Error::TopicConflict {
                    topic: config.name().to_string(),
                    reason: format!(
                        "it has {} queues, not {}",
                        t.config.queue_count(),
                        config.queue_count()
                    ),
                });
            }
            return Ok(t.clone());
        }
        let name = topic_stream(config.name());
        let read = |name: String| async move {
            let mut s = self.js.get_stream(&name).await.ok()?;
            Some(
                s.info()
                    .await
                    .map(|i| i.config.clone())
                    .map_err(|e| nats_err(format!("reading stream {name}"), e)),
            )
        };
        let stream_config = match read(name.clone()).await {
            Some(c) => c?,
            None => {
                let r = config.retention_limits();
                let age = r.age().unwrap_or(Duration::ZERO);
                let mut subjects = vec![topic_subjects(config.name())];
                if self.native_schedules {
                    subjects.push(schedule_definitions(config.name()));
                }
                let s = stream::Config {
                    name: name.clone(),
                    subjects,
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    max_age: age,
                    max_bytes: r
                        .bytes()
                        .map_or(-1, |b| (b * config.queue_count() as u64) as i64),
                    duplicate_window: if age.is_zero() {
                        Duration::from_secs(120)
                    } else {
                        age.min(Duration::from_secs(120))
                    },
                    num_replicas: self.replicas,
                    description: Some(describe(&config)),
                    allow_message_schedules: self.native_schedules,
                    ..Default::default()
                };
                match self.js.create_stream(s).await {
                    Ok(mut s) => s
                        .info()
                        .await
                        .map(|i| i.config.clone())
                        .map_err(|e| nats_err(format!("reading stream {name}"), e))?,
                    // Created by another process meanwhile.
                    Err(e) => match read(name.clone()).await {
                        Some(c) => c?,
                        None => return Err(nats_err(format!("creating stream {name}"), e)),
                    },
                }
            }
        };
        let stored = parse_description(config.name(), stream_config.description.as_deref())?;
        let native_horizon = match (stream_config.max_age, stream_config.max_bytes) {
            (_, b) if b > 0 => None,
            (age, _) if age.is_zero() => Some(Duration::MAX),
            // A margin for clocks and the publish itself.
            (age, _) => age.checked_sub(Duration::from_secs(60)),
        };
        let native_horizon = match native_horizon {
            Some(h) if self.native_schedules && self.enable_schedules(stream_config).await => {
                Some(h)
            }
            _ => None,
        };
        if explicit && stored.queue_count() != config.queue_count() {
            return Err(Error::TopicConflict {
                topic: config.name().to_string(),
                reason: format!(
                    "it has {} queues, not {}",
                    stored.queue_count(),
                    config.queue_count()
                ),
            });
        }
        let state = Arc::new(TopicState {
            config: stored,
            next: AtomicU64::new(0),
            native_horizon,
        });
        Ok(self
            .topics
            .entry(config.name().to_string())
            .or_insert(state)
            .clone())
    }

    /// Makes sure a topic stream takes schedule definitions (a stream made
    /// before the server was upgraded to 2.12 does not); false, with a
    /// warning, if the server refuses: that topic's delays then take the
    /// forwarder.
    async fn enable_schedules(&self, mut c: stream::Config) -> bool {
        let Some(topic) = c.name.strip_prefix(TOPIC_STREAM_PREFIX).and_then(dec) else {
            return false;
        };
        let defs = schedule_definitions(&topic);
        if c.allow_message_schedules && c.subjects.contains(&defs) {
            return true;
        }
        c.allow_message_schedules = true;
        if !c.subjects.contains(&defs) {
            c.subjects.push(defs);
        }
        match self.js.update_stream(c).await {
            Ok(_) => {
                info!(topic = %topic, "topic stream now takes message schedules (delays are native)");
                true
            }
            Err(e) => {
                warn!(topic = %topic, error = %e,
                    "cannot enable message schedules on the topic's stream; its delays use the forwarder");
                false
            }
        }
    }

    /// Publishes stamped messages to `subject`s, pipelined; returns each
    /// one's stream sequence.
    pub(crate) async fn publish_raw(
        &self,
        items: Vec<(String, Bytes, String)>,
    ) -> Result<Vec<u64>, Error> {
        self.publish_with_headers(
            items
                .into_iter()
                .map(|(s, p, id)| (s, p, id, None))
                .collect(),
        )
        .await
    }

    /// As `publish_raw`, each message with extra headers.
    pub(crate) async fn publish_with_headers(
        &self,
        items: Vec<(String, Bytes, String, Option<async_nats::HeaderMap>)>,
    ) -> Result<Vec<u64>, Error> {
        let mut acks = Vec::with_capacity(items.len());
        for (subject, payload, msg_id, headers) in items {
            let mut publish = jetstream::message::PublishMessage::build();
            if let Some(h) = headers {
                publish = publish.headers(h);
            }
            let publish = publish.payload(payload).message_id(msg_id);
            acks.push(
                self.js
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| nats_err("NATS publish", e))?,
            );
        }
        let mut seqs = Vec::with_capacity(acks.len());
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            seqs.push(
                ack.map_err(|e| nats_err("NATS publish not acknowledged", e))?
                    .sequence,
            );
        }
        Ok(seqs)
    }

    /// Stores stamped messages in their topic (queue chosen here), as
    /// `target`'s; returns receipts in order.
    pub(crate) async fn store_in_topic(
        &self,
        messages: Vec<Message>,
        target: &str,
    ) -> Result<Vec<SendReceipt>, Error> {
        let mut items = Vec::with_capacity(messages.len());
        let mut places = Vec::with_capacity(messages.len());
        for m in &messages {
            let t = self.topic(TopicConfig::new(m.topic()), false).await?;
            let q = t.pick_queue(m);
            let mut buf = Vec::new();
            m.encode_envelope(&mut buf);
            items.push((
                queue_subject(m.topic(), q, target),
                Bytes::from(buf),
                if target == ALL_GROUPS {
                    m.id().to_string()
                } else {
                    // A resend must not be dropped as a duplicate of the original.
                    format!("{}-{target}-{}", m.id(), now_ms())
                },
            ));
            places.push(q);
        }
        let seqs = self.publish_raw(items).await?;
        Ok(messages
            .iter()
            .zip(places)
            .zip(seqs)
            .map(|((m, queue), offset)| SendReceipt {
                message_id: m.id(),
                queue,
                offset,
                deliver_at: None,
            })
            .collect())
    }

    async fn publish(
        self: Arc<Self>,
        messages: Vec<OutgoingMessage>,
        wait: bool,
    ) -> Result<Vec<SendReceipt>, Error> {
        for m in &messages {
            self.limits.check(m)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let n = messages.len();
        let _permit = if wait {
            self.pending
                .clone()
                .acquire_many_owned(n.min(self.max_pending) as u32)
                .await
                .map_err(|_| Error::Closed)?
        } else {
            self.pending
                .clone()
                .try_acquire_many_owned(n.min(self.max_pending) as u32)
                .map_err(|_| Error::Busy {
                    pending: self.max_pending - self.pending.available_permits(),
                })?
        };
        let now = SystemTime::now();
        let mut out: Vec<Option<SendReceipt>> = vec![None; n];
        let mut plain = Vec::new();
        let mut plain_at = Vec::new();
        let mut delayed = Vec::new();
        let mut scheduled = Vec::new();
        for (i, mut m) in messages.into_iter().enumerate() {
            if m.deliver_at.is_some_and(|t| t <= now) {
                m.deliver_at = None;
            }
            let t = self.topic(TopicConfig::new(m.topic.clone()), false).await?;
            let topic: Arc<str> = Arc::from(t.config.name());
            let native = match (m.deliver_at, t.native_horizon) {
                (Some(at), Some(h)) => at.duration_since(now).unwrap_or_default() < h,
                _ => false,
            };
            if native {
                let msg = Message::prepare(m, topic);
                let q = t.pick_queue(&msg);
                scheduled.push((i, q, msg));
            } else if m.deliver_at.is_some() {
                let msg = Message::prepare(m, Arc::from(weirmq_bus::SCHEDULE_TOPIC))
                    .with_destination(topic.to_string());
                delayed.push((i, msg));
            } else {
                plain.push(Message::prepare(m, topic));
                plain_at.push(i);
            }
        }
        if !plain.is_empty() {
            let receipts = self.store_in_topic(plain, ALL_GROUPS).await?;
            for (i, r) in plain_at.into_iter().zip(receipts) {
                out[i] = Some(r);
            }
        }
        if !scheduled.is_empty() {
            // Native (2.12+): a schedule definition in the topic's own
            // stream; the server publishes its payload to the queue's
            // subject when due (and purges the definition).
            let mut items = Vec::with_capacity(scheduled.len());
            for (_, q, m) in &scheduled {
                let mut buf = Vec::new();
                m.encode_envelope(&mut buf);
                let at = m.deliver_at().unwrap_or_else(SystemTime::now);
                let at = time::OffsetDateTime::from(at)
                    .format(&time::format_description::well_known::Rfc3339)
                    .map_err(|e| nats_err("formatting a schedule time", e))?;
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Schedule", format!("@at {at}").as_str());
                h.insert(
                    "Nats-Schedule-Target",
                    queue_subject(m.topic(), *q, ALL_GROUPS).as_str(),
                );
                items.push((
                    schedule_definition_subject(m.topic(), m.id()),
                    Bytes::from(buf),
                    m.id().to_string(),
                    Some(h),
                ));
            }
            let seqs = self.publish_with_headers(items).await?;
            for ((i, q, m), seq) in scheduled.into_iter().zip(seqs) {
                out[i] = Some(SendReceipt {
                    message_id: m.id(),
                    queue: q,
                    offset: seq,
                    deliver_at: m.deliver_at(),
                });
            }
        }
        if !delayed.is_empty() {
            let items = delayed
                .iter()
                .map(|(_, m)| {
                    let mut buf = Vec::new();
                    m.encode_envelope(&mut buf);
                    (
                        schedule_subject(m.destination().unwrap_or_default()),
                        Bytes::from(buf),
                        m.id().to_string(),
                    )
                })
                .collect();
            let seqs = self.publish_raw(items).await?;
            for ((i, m), seq) in delayed.into_iter().zip(seqs) {
                out[i] = Some(SendReceipt {
                    message_id: m.id(),
                    queue: 0,
                    offset: seq,
                    deliver_at: m.deliver_at(),
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Stores a dead letter of `group` (a copy with its own id).
    pub(crate) async fn store_dead_letter(
        &self,
        group: &str,
        dl: OutgoingMessage,
    ) -> Result<(), Error> {
        let m = Message::prepare(dl, Arc::from(format!("%DLQ%{group}").as_str()));
        let mut buf = Vec::new();
        m.encode_envelope(&mut buf);
        self.publish_raw(vec![(
            dlq_subject(group),
            Bytes::from(buf),
            m.id().to_string(),
        )])
        .await?;
        Ok(())
    }

    pub(crate) async fn stream(&self, name: &str) -> Result<stream::Stream, Error> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| nats_err(format!("opening stream {name}"), e))
    }

    /// Up to `max` messages of `stream` matching `filter`, from sequence
    /// `from`, raw.
    pub(crate) async fn read_raw(
        &self,
        stream: &stream::Stream,
        filter: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<jetstream::message::StreamMessage>, Error> {
        let mut out = Vec::new();
        let mut seq = from.max(1);
        while out.len() < max {
            match stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(filter.to_string())
                .send()
                .await
            {
                Ok(m) => {
                    seq = m.sequence + 1;
                    out.push(m);
                }
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(nats_err(format!("reading {filter}"), e)),
            }
        }
        Ok(out)
    }

    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let stream = self.stream(DLQ_STREAM).await?;
        let resent: std::collections::HashSet<u64> = self
            .read_raw(&stream, &dlq_resent_subject(group), 1, usize::MAX)
            .await?
            .into_iter()
            .filter_map(|m| std::str::from_utf8(&m.payload).ok()?.parse().ok())
            .collect();
        let topic: Arc<str> = Arc::from(format!("%DLQ%{group}").as_str());
        let mut out = Vec::new();
        for raw in self
            .read_raw(&stream, &dlq_subject(group), from, max)
            .await?
        {
            let (m, _) = Message::decode_envelope(topic.clone(), 0, raw.sequence, &raw.payload)?;
            out.push(DeadLetter {
                dlq_offset: raw.sequence,
                message: Arc::new(m),
                resent: resent.contains(&raw.sequence),
            });
        }
        Ok(out)
    }

    async fn subject_count(&self, stream: &str, filter: &str) -> Result<u64, Error> {
        use futures::TryStreamExt;
        let s = self.stream(stream).await?;
        let mut info = s
            .info_with_subjects(filter)
            .await
            .map_err(|e| nats_err(format!("counting {filter}"), e))?;
        let mut total = 0;
        while let Some((_, n)) = info
            .try_next()
            .await
            .map_err(|e| nats_err(format!("counting {filter}"), e))?
        {
            total += n as u64;
        }
        Ok(total)
    }

    async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        let t = self.known_topic(topic).await?;
        let mut stream = self.stream(&topic_stream(topic)).await?;
        let last = stream
            .info()
            .await
            .map_err(|e| nats_err("reading stream info", e))?
            .state
            .last_sequence;
        let mut out = Vec::new();
        for q in 0..t.config.queue_count() {
            let pos = match stream
                .get_consumer::<consumer::pull::Config>(&consumer_name(group, q))
                .await
            {
                Ok(c) => {
                    let info = c
                        .get_info()
                        .await
                        .map_err(|e| nats_err("reading consumer info", e))?;
                    QueuePosition {
                        queue: q,
                        committed: info.ack_floor.stream_sequence + 1,
                        max: last + 1,
                        lag: info.num_pending + info.num_ack_pending as u64,
                    }
                }
                Err(_) => QueuePosition {
                    queue: q,
                    committed: 0,
                    max: last + 1,
                    lag: self
                        .subject_count(&topic_stream(topic), &queue_filter(topic, q))
                        .await?,
                },
            };
            out.push(pos);
        }
        Ok(out)
    }

    /// A topic that must exist (in this process's view or on the server).
    pub(crate) async fn known_topic(&self, topic: &str) -> Result<Arc<TopicState>, Error> {
        if let Some(t) = self.topics.get(topic) {
            return Ok(t.clone());
        }
        if self.js.get_stream(topic_stream(topic)).await.is_err() {
            return Err(Error::InvalidConfig {
                reason: format!("topic `{topic}` does not exist"),
            });
        }
        self.topic(TopicConfig::new(topic), false).await
    }
}

pub(crate) fn is_not_found(e: &jetstream::stream::RawMessageError) -> bool {
    use jetstream::stream::RawMessageErrorKind as K;
    match e.kind() {
        K::NoMessageFound => true,
        K::JetStream(js) => {
            js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND || js.code() == 404
        }
        _ => false,
    }
}

fn describe(config: &TopicConfig) -> String {
    format!(
        "weirmq topic={} queues={}",
        config.name(),
        config.queue_count()
    )
}

fn parse_description(topic: &str, d: Option<&str>) -> Result<TopicConfig, Error> {
    let queues = d
        .and_then(|d| d.strip_prefix("weirmq topic="))
        .and_then(|rest| rest.split(" queues=").nth(1))
        .and_then(|q| q.trim().parse::<u32>().ok())
        .ok_or_else(|| Error::InvalidConfig {
            reason: format!(
                "stream {} exists but was not made by weirmq (description {d:?}); \
                 rename or delete it",
                topic_stream(topic)
            ),
        })?;
    Ok(TopicConfig::new(topic).queues(queues))
}

fn unsupported(feature: &str) -> Error {
    Error::Unsupported {
        feature: format!("{feature} on the NATS JetStream backend (see docs/scaling.md)"),
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn capabilities(&self) -> Capabilities {
        // A JetStream ack means stored by the server (replicated on a
        // cluster), not fsynced by default: see docs/scaling.md.
        Capabilities::new(true, false, false)
    }

    async fn ensure_topic(&self, config: TopicConfig) -> Result<TopicConfig, Error> {
        config.validate()?;
        if config.traced() {
            return Err(unsupported("message trace (TopicConfig::trace)"));
        }
        self.run(|i| async move { Ok(i.topic(config, true).await?.config.clone()) })
            .await
    }

    async fn publish(
        &self,
        messages: Vec<OutgoingMessage>,
        _durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.run(|i| i.publish(messages, true)).await
    }

    async fn try_publish(
        &self,
        messages: Vec<OutgoingMessage>,
        _durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.run(|i| i.publish(messages, false)).await
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<BrokerSubscription, Error> {
        validate_group_name(&spec.group)?;
        validate_topic_name(&spec.topic)?;
        if spec.max_in_flight == 0 {
            return Err(Error::InvalidConfig {
                reason: "max_in_flight must be at least 1".into(),
            });
        }
        self.run(|i| async move {
            let key = (spec.group.clone(), spec.topic.clone());
            if i.subs.contains_key(&key) {
                return Err(Error::AlreadySubscribed {
                    group: spec.group,
                    topic: spec.topic,
                });
            }
            let t = i.topic(TopicConfig::new(spec.topic.clone()), false).await?;
            let (state, sub) = subscription::start(i.clone(), spec, t).await?;
            match i.subs.entry(key) {
                dashmap::mapref::entry::Entry::Occupied(o) => {
                    state.stop().await;
                    Err(Error::AlreadySubscribed {
                        group: o.key().0.clone(),
                        topic: o.key().1.clone(),
                    })
                }
                dashmap::mapref::entry::Entry::Vacant(v) => {
                    v.insert(state);
                    Ok(sub)
                }
            }
        })
        .await
    }

    async fn unsubscribe(&self, group: &str, topic: &str) -> Result<(), Error> {
        let key = (group.to_string(), topic.to_string());
        let inner = self.inner.clone();
        self.inner
            .handle
            .spawn(async move {
                if let Some((_, s)) = inner.subs.remove(&key) {
                    s.stop().await;
                }
            })
            .await
            .map_err(|_| Error::Closed)
    }

    async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        let (g, t) = (group.to_string(), topic.to_string());
        self.run(|i| async move { i.positions(&g, &t).await }).await
    }

    async fn group_stats(&self, group: &str, topic: &str) -> GroupStats {
        self.inner
            .subs
            .get(&(group.to_string(), topic.to_string()))
            .map(|s| s.stats())
            .unwrap_or_default()
    }

    async fn topics(&self) -> Vec<TopicConfig> {
        self.run(|i| async move {
            use futures::StreamExt;
            let mut names = i.js.stream_names();
            let mut out = Vec::new();
            while let Some(name) = names.next().await {
                let Ok(name) = name else { break };
                let Some(topic) = name.strip_prefix(TOPIC_STREAM_PREFIX).and_then(dec) else {
                    continue;
                };
                if let Ok(t) = i.topic(TopicConfig::new(topic), false).await {
                    out.push(t.config.clone());
                }
            }
            out.sort_by(|a, b| a.name().cmp(b.name()));
            Ok(out)
        })
        .await
        .unwrap_or_default()
    }

    async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error> {
        let topic = topic.to_string();
        self.run(move |i| async move {
            let t = i.known_topic(&topic).await?;
            if queue >= t.config.queue_count() {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "topic `{topic}` has {} queues; there is no queue {queue}",
                        t.config.queue_count()
                    ),
                });
            }
            let stream = i.stream(&topic_stream(&topic)).await?;
            let name: Arc<str> = Arc::from(topic.as_str());
            let mut out = Vec::new();
            for raw in i
                .read_raw(&stream, &queue_filter(&topic, queue), from, max)
                .await?
            {
                let (m, _) =
                    Message::decode_envelope(name.clone(), queue, raw.sequence, &raw.payload)?;
                out.push(Arc::new(m));
            }
            Ok(out)
        })
        .await
    }

    async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        let (g, t) = (group.to_string(), topic.to_string());
        self.run(move |i| async move {
            let state = i.known_topic(&t).await?;
            let sub = i.subs.get(&(g.clone(), t.clone())).map(|s| s.clone());
            subscription::reset(&i, &g, &state, to, sub.as_deref()).await?;
            i.positions(&g, &t).await
        })
        .await
    }

    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error> {
        let g = group.to_string();
        self.run(move |i| async move { i.dead_letters(&g, from, max).await })
            .await
    }

    async fn dead_letter_count(&self, group: &str) -> Result<u64, Error> {
        let g = group.to_string();
        self.run(move |i| async move { i.subject_count(DLQ_STREAM, &dlq_subject(&g)).await })
            .await
    }

    async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error> {
        validate_group_name(group)?;
        let g = group.to_string();
        self.run(move |i| async move {
            let all = i.dead_letters(&g, 1, usize::MAX).await?;
            let chosen: Vec<(MessageId, Option<&DeadLetter>)> = match &which {
                Resend::All => all
                    .iter()
                    .filter(|d| !d.resent)
                    .filter_map(|d| Some((d.original_id()?, Some(d))))
                    .collect(),
                Resend::Ids(ids) => ids
                    .iter()
                    .map(|id| {
                        let found = all
                            .iter()
                            .filter(|d| d.original_id() == Some(*id))
                            .find(|d| !d.resent)
                            .or_else(|| all.iter().find(|d| d.original_id() == Some(*id)));
                        (*id, found)
                    })
                    .collect(),
            };
            let mut reports = Vec::with_capacity(chosen.len());
            for (id, dl) in chosen {
                let outcome = match dl {
                    None => ResendOutcome::NotFound,
                    Some(d) if d.resent => ResendOutcome::AlreadyResent,
                    Some(d) => match i.resend_one(&g, d).await {
                        Ok(()) => ResendOutcome::Resent,
                        Err(e) => ResendOutcome::Failed(e.to_string()),
                    },
                };
                reports.push(ResendReport {
                    message_id: id,
                    outcome,
                });
            }
            Ok(reports)
        })
        .await
    }

    async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error> {
        let g = group.to_string();
        self.run(move |i| async move {
            let n = i.subject_count(DLQ_STREAM, &dlq_subject(&g)).await?;
            i.stream(DLQ_STREAM)
                .await?
                .purge()
                .filter(dlq_group_filter(&g))
                .await
                .map_err(|e| nats_err("purging dead letters", e))?;
            Ok(n)
        })
        .await
    }

    async fn query_id(&self, _id: MessageId) -> Result<Option<Arc<Message>>, Error> {
        Err(unsupported("query by message id"))
    }

    async fn query_key(
        &self,
        _topic: &str,
        _key: &str,
        _max: usize,
    ) -> Result<Vec<Arc<Message>>, Error> {
        Err(unsupported("query by key"))
    }

    async fn trace(&self, _id: MessageId) -> Result<Option<MessageTrace>, Error> {
        Err(unsupported("message trace"))
    }

    async fn enforce_retention(&self) -> Result<RetentionReport, Error> {
        Err(unsupported(
            "an on-demand retention pass (JetStream enforces each stream's max_age and \
             max_bytes itself, continuously)",
        ))
    }

    async fn publish_half(
        &self,
        message: OutgoingMessage,
        _durability: Durability,
    ) -> Result<HalfMessage, Error> {
        self.inner.limits.check(&message)?;
        if message.deliver_at.is_some() {
            return Err(Error::Unsupported {
                feature: "a delayed transactional message".into(),
            });
        }
        self.run(|i| system::publish_half(i, message)).await
    }

    async fn end_transaction(
        &self,
        half: &HalfMessage,
        outcome: TransactionOutcome,
    ) -> Result<Option<SendReceipt>, Error> {
        let half = half.clone();
        self.run(move |i| system::end_transaction(i, half, outcome))
            .await
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
        _message: OutgoingMessage,
        _durability: Durability,
        _state: StateBatch,
    ) -> Result<SendReceipt, Error> {
        Err(unsupported(
            "the local outbox (publish_with_state): JetStream keeps no application state; \
             use a transactional message with a checker",
        ))
    }

    async fn write_state(&self, _state: StateBatch, _durability: Durability) -> Result<(), Error> {
        Err(unsupported("application state (write_state)"))
    }

    async fn state_get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Err(unsupported("application state (state_get)"))
    }

    async fn state_scan(&self, _prefix: &[u8]) -> Result<StateEntries, Error> {
        Err(unsupported("application state (state_scan)"))
    }

    async fn shutdown(&self) -> Result<(), Error> {
        if self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        let inner = self.inner.clone();
        self.inner
            .handle
            .spawn(async move {
                let subs: Vec<_> = inner.subs.iter().map(|e| e.key().clone()).collect();
                for key in subs {
                    if let Some((_, s)) = inner.subs.remove(&key) {
                        s.stop().await;
                    }
                }
                let _ = inner.stop.send(true);
                let tasks = std::mem::take(&mut *inner.system_tasks.lock().unwrap());
                for t in tasks {
                    let _ = t.await;
                }
                if let Err(e) = inner.client.flush().await {
                    warn!(error = %e, "flushing the NATS connection at shutdown");
                }
                inner.pending.close();
            })
            .await
            .map_err(|_| Error::Closed)
    }
}

impl Inner {
    async fn resend_one(&self, group: &str, d: &DeadLetter) -> Result<(), Error> {
        let (Some(topic), Some(id)) = (d.origin_topic(), d.original_id()) else {
            return Err(Error::InvalidConfig {
                reason: "the dead letter does not say where it came from".into(),
            });
        };
        let mut out = OutgoingMessage::new(topic, d.message.body().to_vec());
        out.tag = d.message.tag().map(str::to_string);
        out.keys = d.message.keys().to_vec();
        out.properties = d.message.properties().clone();
        for p in DLQ_PROPERTIES {
            out.properties.remove(p);
        }
        let t = self.known_topic(topic).await?;
        let m = Message::prepare(out, Arc::from(t.config.name()));
        let m = m.with_identity(id, d.message.born_at());
        let q = d.origin_queue().unwrap_or(0) % t.config.queue_count();
        let mut buf = Vec::new();
        m.encode_envelope(&mut buf);
        self.publish_raw(vec![(
            queue_subject(topic, q, &group_target(group)),
            Bytes::from(buf),
            format!("{}-resend-{}", m.id(), d.dlq_offset),
        )])
        .await?;
        self.publish_raw(vec![(
            dlq_resent_subject(group),
            Bytes::from(d.dlq_offset.to_string()),
            format!("resent-{group}-{}", d.dlq_offset),
        )])
        .await?;
        Ok(())
    }
}
