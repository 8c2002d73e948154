//! `Bus`: the handle applications hold, and its builder.
//!
//! A `Bus` is cheap to clone (an `Arc`); every clone is the same bus. It
//! encodes events with their codec on the caller's thread, and talks to the
//! backend through the `Broker` seam only, so the same application code runs
//! on every backend.
//!
//! Its methods are grouped by the seam's roles, one file each (`publisher`,
//! `subscriptions`, `admin`, `dead_letters`, `transactions`, `outbox`,
//! `history`). A backend that does not offer an optional role (`outbox`,
//! `history`) is turned into [`Error::Unsupported`] here, once.

mod admin;
mod builder;
mod dead_letters;
mod history;
mod meters;
mod outbox;
mod publisher;
mod sampler;
mod spans;
mod subscriptions;
mod transactions;

pub use builder::BusBuilder;
pub use transactions::Transaction;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weirmq_actors::{EmbeddedBroker, EmbeddedConfig};
use weirmq_bus::{validate_group_name, CancelOutcome, Clock, HalfMessage, StateBatch};
use weirmq_bus::{
    Broker, Capabilities, DeadLetter, Durability, Error, Event, GroupStats, GroupTopic, History,
    Limits, Message, MessageId, MessageTrace, Outbox, OutgoingMessage, Publish, PublishError,
    QueuePosition, Resend, ResendReport, ResetTo, RetentionReport, SendReceipt, TopicConfig,
    TopicStats, TraceSampling, TransactionChecker, TransactionConfig, TransactionOutcome,
    TryPublishError,
};
use weirmq_persistence::{DiskPolicy, StoreConfig, SyncEvent, SyncHook};

use crate::subscribe::SubscribeBuilder;

#[derive(Debug)]
struct BusInner {
    broker: Arc<dyn Broker>,
    durability: Durability,
    /// The (position group, topic) pairs subscribed through this bus: the
    /// metrics sampler reports their lag (see `sampler.rs`).
    watched: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    /// Publish metric handles by topic (see `meters.rs`).
    publish_meters: dashmap::DashMap<String, meters::PublishMeters>,
    /// Which new traces get spans (publishes here, deliveries of the
    /// subscriptions started through this bus).
    trace_sampling: TraceSampling,
    /// What the subscriptions started through this bus measure consume
    /// timeouts and rate limits by (the backend's own parts have it too).
    clock: Clock,
    /// What a `weirmq::testing` bus records of this bus's publishes.
    #[cfg(feature = "testing")]
    pub(crate) journal: Option<Arc<crate::testing::Journal>>,
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

    pub(crate) fn trace_sampling(&self) -> &TraceSampling {
        &self.inner.trace_sampling
    }

    /// The clock this bus's time-driven parts read and wait on: the system
    /// clock, or a `weirmq::testing` bus's manual one.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// A test bus's journal, as the supervisors' settlement observer.
    pub(crate) fn observer(&self) -> Option<weirmq_actors::Observer> {
        #[cfg(feature = "testing")]
        if let Some(j) = &self.inner.journal {
            return Some(weirmq_actors::Observer(j.clone()));
        }
        None
    }

    /// What a test bus's journal needs of a publish: each message's topic
    /// and body (`None`, and nothing copied, on a normal bus).
    #[allow(clippy::unused_self)]
    pub(crate) fn journal_copy(
        &self,
        _messages: &[OutgoingMessage],
    ) -> Option<Vec<(String, Vec<u8>)>> {
        #[cfg(feature = "testing")]
        if self.inner.journal.is_some() {
            return Some(
                _messages
                    .iter()
                    .map(|m| (m.topic.clone(), m.body.clone()))
                    .collect(),
            );
        }
        None
    }

    /// Records stored publishes in a test bus's journal.
    #[allow(clippy::unused_self)]
    pub(crate) fn journal_published(
        &self,
        _copy: Option<Vec<(String, Vec<u8>)>>,
        _receipts: &[SendReceipt],
    ) {
        #[cfg(feature = "testing")]
        if let (Some(j), Some(c)) = (&self.inner.journal, _copy) {
            j.published(c, _receipts);
        }
    }

    /// A bus over `broker`, with its metrics sampler running.
    fn new(
        broker: Arc<dyn Broker>,
        durability: Durability,
        trace_sampling: TraceSampling,
        clock: Clock,
        #[cfg(feature = "testing")] journal: Option<Arc<crate::testing::Journal>>,
    ) -> Bus {
        let inner = Arc::new(BusInner {
            broker,
            durability,
            trace_sampling,
            clock,
            watched: Default::default(),
            publish_meters: Default::default(),
            #[cfg(feature = "testing")]
            journal,
        });
        actix::spawn(sampler::run(Arc::downgrade(&inner)));
        Bus { inner }
    }

    /// Tells the metrics sampler about a position group of a subscription.
    pub(crate) fn watch(&self, group: &str, topic: &str) {
        self.inner
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((group.to_string(), topic.to_string()));
    }

    /// Whether a subscription of `group` to `topic` was started through
    /// this bus (its counters in [`Bus::group_stats`] are live).
    pub(crate) fn is_watched(&self, group: &str, topic: &str) -> bool {
        self.inner
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(group.to_string(), topic.to_string()))
    }

    /// What the backend does: durable, real syncs, dense offsets, and
    /// whether it offers the local outbox and history (query, trace,
    /// on-demand retention).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = weirmq::Bus::builder().in_memory().open().await?;
    /// let c = bus.capabilities();
    /// assert!(c.outbox && c.history && !c.durable);
    /// # bus.shutdown().await }
    /// ```
    pub fn capabilities(&self) -> Capabilities {
        let broker = &self.inner.broker;
        let mut c = broker.capabilities();
        c.outbox = broker.outbox().is_some();
        c.history = broker.history().is_some();
        c
    }

    /// The backend's local outbox, or `Unsupported` naming what was asked.
    fn outbox(&self, what: &str) -> Result<&dyn Outbox, Error> {
        self.inner
            .broker
            .outbox()
            .ok_or_else(|| self.unsupported(what))
    }

    /// The backend's history role, or `Unsupported` naming what was asked.
    fn history(&self, what: &str) -> Result<&dyn History, Error> {
        self.inner
            .broker
            .history()
            .ok_or_else(|| self.unsupported(what))
    }

    /// Records a publish's metrics: its messages, stored or not, and the
    /// call's duration (see `weirmq_bus::metrics`).
    fn observe_publish<T, E>(
        &self,
        operation: meters::PublishOp,
        topic: &str,
        messages: usize,
        started: Instant,
        result: &Result<T, E>,
    ) {
        let meters = &self.inner.publish_meters;
        if let Some(p) = meters.get(topic) {
            return p.record(operation, messages, result.is_ok(), started);
        }
        meters
            .entry(topic.to_string())
            .or_insert_with(|| meters::PublishMeters::new(topic))
            .record(operation, messages, result.is_ok(), started);
    }

    fn unsupported(&self, what: &str) -> Error {
        Error::Unsupported {
            feature: format!(
                "{what} on the {} backend (see docs/scaling.md)",
                self.inner.broker.capabilities().backend
            ),
        }
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
