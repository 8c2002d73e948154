//! The subscriber side: [`Delivery`], [`HandlerError`], and the supervisor
//! that owns a consumer group's handler actors in this process.
//!
//! The supervisor lives on the arbiter where the subscription was started,
//! beside its members. It receives delivery batches from any
//! [`Broker`](weirmq_bus::Broker), decodes each body once into the event
//! type, and hands each delivery to the least busy member with `send()` — so
//! a handler's panic is seen as a failed delivery — at most
//! `max_in_flight_per_member` at a time per member. Outcomes go back to the
//! broker in batches (one message per mailbox drain, not per delivery).
//!
//! # Failure
//!
//! * `Ok(())` acks.
//! * `Err(HandlerError)`, a panic, or a consume timeout is a failed attempt:
//!   the subscription's [`RetryPolicy`] says how long until the next
//!   attempt, and after `max_attempts` the message is dead-lettered with the
//!   last error. `HandlerError::dead_letter` dead-letters at once.
//! * A member that died (panicked in `handle`) is replaced by a fresh one
//!   from the factory. Only the delivery it panicked on counts a failed
//!   attempt: the others that were queued in its mailbox (they never ran)
//!   go to a live member at once, with their attempt unchanged. Which
//!   delivery it died on is the one its handler read last (any accessor,
//!   `into_event` included), else the first dropped while the thread
//!   unwound, else the earliest of the dead member's that got no reply (an
//!   actor handles its mailbox in order).
//! * A body that does not decode into the event type is dead-lettered with
//!   reason `decode: ...` (retrying cannot fix it) and logged; it is never
//!   acked silently.
//!
//! # Shutdown
//!
//! `drain` stops handing out deliveries, waits for those in members' hands,
//! returns their outcomes, then ends the subscription. Deliveries received
//! but not yet handed to a member are not settled: the group's next
//! subscription gets them again.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::members::{Members, Spawner};
use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, error, warn};
use weirmq_bus::{
    Broker, DeliveryBatch, Durability, Error, Event, Message as BusMessage, MessageId, RawDelivery,
    RetryPolicy, SettleToken, Settlement, Settler, SubscriptionSpec, TraceSampling,
};

mod delivery;
mod meters;
mod supervisor;

pub use delivery::{Delivery, HandlerError};
use delivery::{PanicWitness, Witness};
use supervisor::{Member, Supervisor, TokenBucket};

/// How the supervisor treats its members.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberConfig {
    /// When a failed delivery is tried again, and when it is dead-lettered.
    pub retry: RetryPolicy,
    /// How long a member may take over one delivery before it counts as
    /// failed (one timer, at the earliest expiry of the deliveries in
    /// hand). The handler is not cancelled; its late result is ignored.
    pub consume_timeout: Duration,
    /// The most deliveries in one member's hands at once.
    pub max_in_flight_per_member: usize,
    /// The most deliveries handed to members per second, for the whole
    /// subscription (a token bucket holding at most 1/20 s of tokens, so no
    /// 1 s window sees more than 105% of the rate). `None`: unlimited.
    pub rate_limit: Option<u32>,
    /// Which deliveries of messages that carry no trace context get a
    /// `process` span (one that carries a context follows its `sampled`
    /// flag). The facade passes its bus's.
    pub trace_sampling: TraceSampling,
    /// What consume timeouts and the rate limit are measured by. The
    /// facade passes its bus's (the system clock unless the bus is a
    /// `weirmq::testing` one).
    pub clock: weirmq_bus::Clock,
    /// Sees every settlement the supervisor makes (the test kit's
    /// journal); `None` in production.
    pub observer: Option<Observer>,
    /// An inbox subscription: a handler's state (`Delivery::commit_state`)
    /// is committed with the message's processed mark before the ack, and
    /// a message already marked is acked without a handler (exactly-once
    /// effects; needs the broker's outbox role).
    pub inbox: bool,
}

/// Sees what a subscription's supervisor decides for each delivery, as it
/// decides it (on the supervisor's thread; keep it cheap).
pub trait SettlementObserver: Send + Sync + 'static {
    /// `message`'s attempt `attempt` in `group` was settled with
    /// `settlement` (an ack, a retry, or a dead letter).
    fn settled(&self, group: &str, message: &BusMessage, attempt: u32, settlement: &Settlement);
}

/// A shared [`SettlementObserver`]; equal to another when it is the same one.
#[derive(Clone)]
pub struct Observer(pub Arc<dyn SettlementObserver>);

impl PartialEq for Observer {
    fn eq(&self, other: &Observer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            retry: RetryPolicy::default(),
            consume_timeout: Duration::from_secs(60),
            max_in_flight_per_member: 8,
            rate_limit: None,
            trace_sampling: TraceSampling::default(),
            clock: weirmq_bus::Clock::system(),
            observer: None,
            inbox: false,
        }
    }
}

/// A running subscription's supervisor, seen from outside.
pub struct SubscriberHandle {
    drain: Recipient<Drain>,
    group: String,
    topic: String,
    broker: Arc<dyn Broker>,
}

impl fmt::Debug for SubscriberHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriberHandle")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .finish()
    }
}

impl SubscriberHandle {
    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// Whether the supervisor is still running.
    pub fn is_running(&self) -> bool {
        self.drain.connected()
    }

    /// Finishes the deliveries in members' hands, settles them, and ends the
    /// subscription (positions are written).
    ///
    /// # Errors
    ///
    /// A storage error while ending the subscription.
    pub async fn drain(self) -> Result<(), Error> {
        if let Ok(rx) = self.drain.send(Drain).await {
            let _ = rx.await;
        }
        self.broker.unsubscribe(&self.group, &self.topic).await
    }
}

/// Starts a supervised consumer group: its supervisor on the current
/// arbiter, its handler actors where `members` places them, fed by
/// `broker`.
///
/// # Errors
///
/// What [`Subscriptions::subscribe`](weirmq_bus::Subscriptions::subscribe) returns; [`Error::InvalidConfig`] for no
/// members or a rate limit of 0.
pub async fn start_subscriber<E, A>(
    broker: Arc<dyn Broker>,
    spec: SubscriptionSpec,
    members: Members<A>,
    config: SubscriberConfig,
) -> Result<SubscriberHandle, Error>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    if members.count() == 0 {
        return Err(Error::InvalidConfig {
            reason: "a subscription needs at least one member".into(),
        });
    }
    if config.rate_limit == Some(0) {
        return Err(Error::InvalidConfig {
            reason: "a rate limit is at least 1 message per second".into(),
        });
    }
    if config.inbox && broker.outbox().is_none() {
        return Err(Error::Unsupported {
            feature: format!(
                "an inbox subscription (exactly-once state) on {}: it needs the bus's own \
                 store for the application's state; see docs/exactly-once.md",
                broker.capabilities().backend
            ),
        });
    }
    let group = spec.group.clone();
    let topic = spec.topic.clone();
    let sub = broker.subscribe(spec).await?;
    let rx = sub.deliveries;
    let count = members.count();
    let spawner = members.into_spawner(config.max_in_flight_per_member);
    let members: Vec<Member<A>> = (0..count)
        .map(|j| Member {
            addr: (spawner.spawn)(j),
            in_flight: 0,
            generation: 0,
            panicked: Arc::default(),
        })
        .collect();
    let inbox = config.inbox.then(|| broker.clone());
    let sup = Supervisor::<E, A> {
        members,
        spawner,
        settler: sub.settler,
        pending: VecDeque::new(),
        settlements: Vec::new(),
        flush_queued: false,
        dispatch_queued: false,
        in_flight: 0,
        bucket: config
            .rate_limit
            .map(|r| TokenBucket::new(r, config.clock.now())),
        wake_queued: false,
        config,
        drained: None,
        draining: false,
        stream_done: false,
        next: 0,
        in_hand: HashMap::new(),
        sweep_armed: false,
        casualties: HashMap::new(),
        next_id: 0,
        group: group.clone(),
        topic: topic.clone(),
        meters: meters::Meters::new(&group, &topic),
        inbox,
        io_pending: 0,
        inbox_writes: Vec::new(),
        _event: PhantomData,
    };
    let addr = Supervisor::create(move |ctx| {
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|batch| (batch, rx))
        });
        ctx.add_stream(stream);
        sup
    });
    Ok(SubscriberHandle {
        drain: addr.recipient(),
        group,
        topic,
        broker,
    })
}

/// Asks the supervisor to drain; answered with a receiver that resolves when
/// members' deliveries are settled.
#[derive(Debug)]
pub(crate) struct Drain;

impl actix::Message for Drain {
    type Result = oneshot::Receiver<()>;
}
