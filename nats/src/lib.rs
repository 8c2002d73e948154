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
//! What JetStream cannot do is said by the type: the backend offers no
//! [`Outbox`] role (JetStream keeps no application state) and no
//! [`History`] role (no index by id or key, no event log; the server
//! enforces retention itself), so `Broker::outbox` and `Broker::history`
//! are `None` and the `Bus` answers those calls with `Error::Unsupported`
//! naming `docs/scaling.md`. Within the roles it offers, two settings are
//! refused the same way: a traced topic and a delayed transactional
//! message.

// The roles (one file each; contracts in weirmq_bus::broker). NATS offers
// no outbox and no history: `Broker::outbox` and `Broker::history` are None.
mod admin;
mod dead_letters;
mod publisher;
mod subscriptions;
mod transactions;

// What the roles share.
mod config;
mod lease;
mod names;
mod streams;
mod subscription;
mod system;
mod topics;
mod wire;

/// The imports every file of this crate uses.
mod prelude {
    pub(crate) use std::future::{Future, IntoFuture};
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
    pub(crate) use std::sync::Arc;
    pub(crate) use std::time::{Duration, SystemTime};

    pub(crate) use async_nats::jetstream::{self, consumer, stream};
    pub(crate) use async_trait::async_trait;
    pub(crate) use bytes::Bytes;
    pub(crate) use dashmap::DashMap;
    pub(crate) use tokio::sync::watch;
    pub(crate) use tracing::{info, warn};

    pub(crate) use weirmq_bus::{
        dlq_topic, now_ms, queue_for_message_group, unix_ms, validate_group_name,
        validate_topic_name, Admin, Admission, Broker, BrokerSubscription, Capabilities,
        DeadLetter, DeadLetters, Durability, Error, GroupStats, GroupTopic, HalfMessage, History,
        Limits, Message, MessageId, Outbox, OutgoingMessage, Publisher, QueuePosition, QueueStats,
        Resend, ResendPlan, ResendReport, ResetTo, SendReceipt, StorageError, SubscriptionSpec,
        Subscriptions, TopicConfig, TopicStats, TransactionChecker, TransactionCheckers,
        TransactionConfig, TransactionOutcome, Transactions, HALF_TOPIC,
    };

    pub(crate) use crate::names::*;
    pub(crate) use crate::streams::is_not_found;
    pub(crate) use crate::subscription;
    pub(crate) use crate::topics::TopicState;
    pub(crate) use crate::{nats_err, Inner, NatsBroker};
}

use prelude::*;

pub use config::{NatsAuth, NatsConfig, NatsTls, ServerFeatures};
use subscription::SubState;

/// The connection and what this process knows; shared by every role and
/// task on the NATS runtime.
pub(crate) struct Inner {
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) ack_wait: Duration,
    pub(crate) replicas: usize,
    pub(crate) features: ServerFeatures,
    /// Delays use the server's message schedules (2.12+, unless turned off).
    native_schedules: bool,
    /// Known topics: queue count and round-robin counter.
    topics: DashMap<String, Arc<TopicState>>,
    subs: DashMap<(String, String), Arc<SubState>>,
    pub(crate) checkers: TransactionCheckers,
    /// Limits and the bound on publishes waiting for their ack.
    pub(crate) admission: Admission,
    closed: AtomicBool,
    /// Stops the system loops (forwarder, checker).
    pub(crate) stop: watch::Sender<bool>,
    system_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The delay forwarder's watch over the messages it naked.
    pub(crate) watch: system::Watch,
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

/// How long past a pull request's expiry a fetch loop waits for the server
/// to end it before asking again. The 2.9 server may drop an expired pull
/// request without its `408` when the consumer was idle; the client's own
/// timer fires only 5 s after the expiry, and messages arriving meanwhile
/// wait for the next request (seen: delayed messages 4.4-5 s late, issue 17).
pub(crate) const PULL_GRACE: Duration = Duration::from_millis(200);

/// One pull request and its batch, as a fetch loop reads it: the next
/// message, or `None` at the batch's end or once the request's expiry +
/// [`PULL_GRACE`] has passed without one (the loop then asks again).
pub(crate) struct Pull {
    batch: async_nats::jetstream::consumer::pull::Batch,
    deadline: tokio::time::Instant,
    gave_up: bool,
}

impl Pull {
    /// A batch that asked the server to wait `expires` from `asked` (when
    /// the request was sent).
    pub(crate) fn new(
        batch: async_nats::jetstream::consumer::pull::Batch,
        asked: tokio::time::Instant,
        expires: Duration,
    ) -> Pull {
        Pull {
            batch,
            deadline: asked + expires + PULL_GRACE,
            gave_up: false,
        }
    }

    /// The next message, waiting until the deadline at most.
    pub(crate) async fn next(
        &mut self,
    ) -> Option<Result<async_nats::jetstream::Message, async_nats::Error>> {
        use futures::StreamExt;
        if self.gave_up {
            return None;
        }
        match tokio::time::timeout_at(self.deadline, self.batch.next()).await {
            Ok(next) => next,
            Err(_) => {
                tracing::debug!(
                    "the server did not end a pull request at its expiry; asking again"
                );
                self.gave_up = true;
                None
            }
        }
    }

    /// The next message if one has arrived already.
    pub(crate) fn ready(
        &mut self,
    ) -> Option<Result<async_nats::jetstream::Message, async_nats::Error>> {
        use futures::{FutureExt, StreamExt};
        self.batch.next().now_or_never().flatten()
    }

    /// After the loop is done with this request: if it gave up waiting for
    /// the server's end of it, the request may still be alive on the server
    /// (its expiry counts from when the server read it, which under load is
    /// later than the client's clock says). A message the server sends it
    /// then must not go to an inbox nobody reads — it would stay pending for
    /// the consumer's whole ack wait (seen: a delayed message 30 s late in
    /// CI). So the batch is read on, in a task, until the client library
    /// ends it (5 s past the expiry), and each late message goes to `late`.
    pub(crate) fn salvage<F, Fut>(self, handle: &tokio::runtime::Handle, mut late: F)
    where
        F: FnMut(async_nats::jetstream::Message) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        use futures::StreamExt;
        if !self.gave_up {
            return;
        }
        let mut batch = self.batch;
        handle.spawn(async move {
            while let Some(item) = batch.next().await {
                if let Ok(m) = item {
                    tracing::debug!("a message reached a pull request given up on; handling it");
                    late(m).await;
                }
            }
        });
    }
}

pub(crate) fn nats_err(context: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Storage(StorageError::msg(format!("{}: {e}", context.into())))
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
        let client = config
            .connect_options()
            .await?
            .connect(&url)
            .await
            .map_err(|e| {
                use async_nats::ConnectErrorKind as K;
                // A certificate the client does not trust surfaces as an
                // I/O error of the handshake, not as kind `Tls`.
                let text = e.to_string().to_ascii_lowercase();
                let hint = match e.kind() {
                    K::AuthorizationViolation | K::Authentication => {
                        "the server refused the credentials: check NatsConfig::auth"
                    }
                    K::Tls => "TLS failed: check NatsConfig::tls (CA file, client certificate)",
                    _ if text.contains("certificate") || text.contains("tls") => {
                        "TLS failed: check NatsConfig::tls (the CA that signed the server's \
                         certificate, a client certificate)"
                    }
                    _ => "is nats-server running, with -js?",
                };
                nats_err(format!("cannot connect to NATS at {url} ({hint})"), e)
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
            replicas: config.replicas.max(1),
            native_schedules: features.message_schedules && config.use_message_schedules,
            features,
            topics: DashMap::new(),
            subs: DashMap::new(),
            checkers: TransactionCheckers::new(config.checkers),
            admission: Admission::new(config.limits, config.max_pending_messages),
            closed: AtomicBool::new(false),
            stop,
            system_tasks: std::sync::Mutex::new(Vec::new()),
            watch: system::Watch::default(),
        });
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

#[async_trait]
impl Broker for NatsBroker {
    fn capabilities(&self) -> Capabilities {
        // A JetStream ack means stored by the server (replicated on a
        // cluster), not fsynced by default: see docs/scaling.md.
        Capabilities::new("NATS JetStream", true, false, false)
    }

    /// JetStream keeps no application state to commit with a message: use
    /// a transactional message with a checker.
    fn outbox(&self) -> Option<&dyn Outbox> {
        None
    }

    /// JetStream has no index by message id or key and no per-message event
    /// log, and enforces retention itself, continuously.
    fn history(&self) -> Option<&dyn History> {
        None
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
                // `send_replace`, not `send`: a system loop spawned at
                // connect may not have run (and subscribed) yet, and
                // `send` without a receiver leaves the value unchanged —
                // such a loop would then run on and this would wait for
                // it forever (seen: a shutdown right after open, in CI).
                inner.stop.send_replace(true);
                let tasks = std::mem::take(&mut *inner.system_tasks.lock().unwrap());
                for t in tasks {
                    let _ = t.await;
                }
                if let Err(e) = inner.client.flush().await {
                    warn!(error = %e, "flushing the NATS connection at shutdown");
                }
                inner.admission.close();
            })
            .await
            .map_err(|_| Error::Closed)
    }
}
