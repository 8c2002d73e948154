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
use tracing::{error, warn};
use weirmq_bus::{
    Broker, DeliveryBatch, Error, Event, Message as BusMessage, MessageId, RawDelivery,
    RetryPolicy, SettleToken, Settlement, Settler, SubscriptionSpec,
};

/// One message delivered to a handler actor, decoded into its event type.
///
/// Implement `Handler<Delivery<E>>` for your actor; return `Ok(())` to ack.
pub struct Delivery<E> {
    event: E,
    message: Arc<BusMessage>,
    attempt: u32,
    /// Tells the supervisor if this delivery is dropped by a panic.
    _witness: PanicWitness,
}

/// Travels with a delivery and tells its member generation's [`Witness`]
/// when the handler reads it and whether it is dropped by a panic, so the
/// supervisor knows which of a dead member's deliveries killed it.
struct PanicWitness {
    slot: Arc<Witness>,
    id: u64,
}

impl PanicWitness {
    fn touch(&self) {
        self.slot.last_touched.store(self.id + 1, Ordering::Relaxed);
    }
}

impl Drop for PanicWitness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.slot.first_in_panic.compare_exchange(
                0,
                self.id + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// What one member generation's handler did with its deliveries (ids + 1;
/// 0: none).
///
/// When its actor dies in a panic, the delivery being handled is dropped
/// first while the thread unwinds (its frame is innermost), then some of
/// the ones queued in the mailbox; a handler that let go of its delivery
/// before panicking (`into_event`) read it last.
#[derive(Debug, Default)]
struct Witness {
    first_in_panic: AtomicU64,
    last_touched: AtomicU64,
}

impl Witness {
    /// Which of `lost` (ids, sorted, of a dead generation's deliveries
    /// that got no reply) the actor died on: the one its handler read last,
    /// else the first dropped in the panic, else the earliest (a mailbox is
    /// handled in order). `None` when the delivery dropped in the panic is
    /// not among them: its reply came first, while the actor still looked
    /// alive, and it was settled then (as a failed attempt); every one of
    /// `lost` was sent to the dying mailbox after it and never ran.
    fn culprit(&self, lost: &[u64]) -> Option<usize> {
        let touched = self.last_touched.load(Ordering::Relaxed);
        let panic = self.first_in_panic.load(Ordering::Relaxed);
        let find = |v: u64| lost.iter().position(|id| v != 0 && id + 1 == v);
        match find(touched).or_else(|| find(panic)) {
            Some(i) => Some(i),
            None if panic != 0 => None,
            None => Some(0),
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Delivery<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event)
            .field("message_id", &self.message.id())
            .field("queue", &self.message.queue())
            .field("offset", &self.message.offset())
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl<E: Event> actix::Message for Delivery<E> {
    type Result = Result<(), HandlerError>;
}

impl<E> Delivery<E> {
    /// The event.
    pub fn event(&self) -> &E {
        self._witness.touch();
        &self.event
    }
    /// Takes the event out.
    pub fn into_event(self) -> E {
        self._witness.touch();
        self.event
    }
    /// The stored message (id, tag, keys, properties, raw body, position).
    pub fn message(&self) -> &BusMessage {
        self._witness.touch();
        &self.message
    }
    /// The message id: stable across redeliveries, for idempotent handlers.
    pub fn message_id(&self) -> MessageId {
        self._witness.touch();
        self.message.id()
    }
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub fn attempt(&self) -> u32 {
        self._witness.touch();
        self.attempt
    }
    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self._witness.touch();
        self.message.tag()
    }
    /// The business keys.
    pub fn keys(&self) -> &[String] {
        self._witness.touch();
        self.message.keys()
    }
    /// The user properties.
    pub fn properties(&self) -> &std::collections::BTreeMap<String, String> {
        self._witness.touch();
        self.message.properties()
    }
    /// The queue of the topic the message is in.
    pub fn queue(&self) -> u32 {
        self._witness.touch();
        self.message.queue()
    }
    /// Its offset in that queue.
    pub fn offset(&self) -> u64 {
        self._witness.touch();
        self.message.offset()
    }
    /// When it was published.
    pub fn born_at(&self) -> SystemTime {
        self._witness.touch();
        self.message.born_at()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Retry,
    DeadLetter,
}

/// A handler's failure: retry later (the default, and what `?` on any error
/// gives), or dead-letter now.
///
/// # Examples
///
/// ```
/// use weirmq_actors::HandlerError;
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse()?; // any std error: retry
///     if n == 0 {
///         return Err(HandlerError::dead_letter("zero is never valid")); // no retry
///     }
///     Ok(n)
/// }
/// assert!(parse("x").unwrap_err().is_retry());
/// assert!(!parse("0").unwrap_err().is_retry());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    kind: ErrorKind,
    message: String,
}

impl HandlerError {
    /// A transient failure: the message is delivered again later.
    pub fn retry(message: impl Into<String>) -> Self {
        HandlerError {
            kind: ErrorKind::Retry,
            message: message.into(),
        }
    }

    /// A permanent failure: the message goes to the group's dead-letter
    /// queue at once, with this reason.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        HandlerError {
            kind: ErrorKind::DeadLetter,
            message: reason.into(),
        }
    }

    /// Whether the message will be retried.
    pub fn is_retry(&self) -> bool {
        self.kind == ErrorKind::Retry
    }

    /// The message or reason.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Retry => write!(f, "handler failed (will retry): {}", self.message),
            ErrorKind::DeadLetter => write!(f, "handler dead-lettered: {}", self.message),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retry(e.to_string())
    }
}

/// How the supervisor treats its members.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberConfig {
    /// When a failed delivery is tried again, and when it is dead-lettered.
    pub retry: RetryPolicy,
    /// How long a member may take over one delivery before it counts as
    /// failed (checked by one sweep timer, so up to a quarter of the timeout,
    /// at most 1 s, late). The handler is not cancelled; its late result is
    /// ignored.
    pub consume_timeout: Duration,
    /// The most deliveries in one member's hands at once.
    pub max_in_flight_per_member: usize,
    /// The most deliveries handed to members per second, for the whole
    /// subscription (a token bucket holding at most 1/20 s of tokens, so no
    /// 1 s window sees more than 105% of the rate). `None`: unlimited.
    pub rate_limit: Option<u32>,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            retry: RetryPolicy::default(),
            consume_timeout: Duration::from_secs(60),
            max_in_flight_per_member: 8,
            rate_limit: None,
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `capacity` saved up.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second);
        TokenBucket {
            rate,
            capacity: (rate / 20.0).max(1.0),
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
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
/// What [`Broker::subscribe`] returns; [`Error::InvalidConfig`] for no
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
    let group = spec.group.clone();
    let topic = spec.topic.clone();
    let sub = broker.subscribe(spec).await?;
    let rx = sub.deliveries;
    let count = members.count();
    let spawner = members.into_spawner();
    let members: Vec<Member<A>> = (0..count)
        .map(|j| Member {
            addr: (spawner.spawn)(j),
            in_flight: 0,
            generation: 0,
            panicked: Arc::default(),
        })
        .collect();
    let sup = Supervisor::<E, A> {
        members,
        spawner,
        settler: sub.settler,
        pending: VecDeque::new(),
        settlements: Vec::new(),
        flush_queued: false,
        in_flight: 0,
        bucket: config.rate_limit.map(TokenBucket::new),
        wake_queued: false,
        config,
        drained: None,
        draining: false,
        stream_done: false,
        next: 0,
        in_hand: HashMap::new(),
        casualties: HashMap::new(),
        next_id: 0,
        group: group.clone(),
        topic: topic.clone(),
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

struct Member<A: Actor> {
    addr: Addr<A>,
    in_flight: usize,
    generation: u64,
    /// How this generation's deliveries were dropped (which one it
    /// panicked with).
    panicked: Arc<Witness>,
}

struct Supervisor<E, A: Actor> {
    members: Vec<Member<A>>,
    spawner: Spawner<A>,
    settler: Arc<dyn Settler>,
    pending: VecDeque<RawDelivery>,
    settlements: Vec<(SettleToken, Settlement)>,
    flush_queued: bool,
    in_flight: usize,
    bucket: Option<TokenBucket>,
    wake_queued: bool,
    config: SubscriberConfig,
    drained: Option<oneshot::Sender<()>>,
    draining: bool,
    stream_done: bool,
    next: usize,
    /// Deliveries in members' hands, by id: the consume-timeout sweep
    /// fails those held too long (one timer for all, not one per delivery).
    in_hand: HashMap<u64, InHand>,
    /// Deliveries whose member died before replying, by (member,
    /// generation), with their ids: settled once every delivery that
    /// generation held has an answer (see `resolve_casualties`).
    casualties: HashMap<(usize, u64), Vec<(u64, InHand)>>,
    next_id: u64,
    group: String,
    topic: String,
    _event: PhantomData<fn() -> E>,
}

/// A delivery in a member's hands.
struct InHand {
    since: Instant,
    member: usize,
    generation: u64,
    /// How the member generation's deliveries were dropped.
    panicked: Arc<Witness>,
    token: SettleToken,
    message: Arc<BusMessage>,
    attempt: u32,
}

#[derive(Message)]
#[rtype(result = "()")]
struct FlushSettlements;

impl<E, A> Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    fn settle(&mut self, token: SettleToken, s: Settlement, ctx: &mut Context<Self>) {
        self.settlements.push((token, s));
        if !self.flush_queued {
            self.flush_queued = true;
            ctx.notify(FlushSettlements);
        }
    }

    fn flush(&mut self) {
        self.flush_queued = false;
        if !self.settlements.is_empty() {
            self.settler.settle(std::mem::take(&mut self.settlements));
        }
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        let max = self.config.max_in_flight_per_member.max(1);
        while !self.pending.is_empty() {
            let n = self.members.len();
            let Some(j) = (0..n)
                .map(|i| (self.next + i) % n)
                .find(|&j| self.members[j].in_flight < max)
            else {
                break;
            };
            if let Some(bucket) = &mut self.bucket {
                if let Err(wait) = bucket.take() {
                    if !self.wake_queued {
                        self.wake_queued = true;
                        ctx.run_later(wait, |act, ctx| {
                            act.wake_queued = false;
                            act.dispatch(ctx);
                        });
                    }
                    break;
                }
            }
            self.next = j + 1;
            let Some(d) = self.pending.pop_front() else {
                break;
            };
            let event = match E::decode(d.message.body()) {
                Ok(e) => e,
                Err(e) => {
                    // Not handed to a member: it does not count against the rate.
                    if let Some(bucket) = &mut self.bucket {
                        bucket.refund();
                    }
                    error!(group = %self.group, topic = %self.topic, msg_id = %d.message.id(),
                        error = %e, "body does not decode into the event type; dead-lettering");
                    self.settle(
                        d.token,
                        Settlement::DeadLetter {
                            reason: format!("decode: {e}"),
                        },
                        ctx,
                    );
                    continue;
                }
            };
            let member = &mut self.members[j];
            member.in_flight += 1;
            self.in_flight += 1;
            let generation = member.generation;
            let id = self.next_id;
            self.next_id += 1;
            let panicked = member.panicked.clone();
            let fut = member.addr.send(Delivery {
                event,
                message: d.message.clone(),
                attempt: d.attempt,
                _witness: PanicWitness {
                    slot: panicked.clone(),
                    id,
                },
            });
            self.in_hand.insert(
                id,
                InHand {
                    since: Instant::now(),
                    member: j,
                    generation,
                    panicked,
                    token: d.token,
                    message: d.message,
                    attempt: d.attempt,
                },
            );
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                // Gone if the consume-timeout sweep already failed it.
                if let Some(h) = act.in_hand.remove(&id) {
                    act.completed(id, h, res, ctx);
                }
            }));
        }
    }

    /// Fails every delivery held longer than the consume timeout.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let limit = self.config.consume_timeout;
        let expired: Vec<u64> = self
            .in_hand
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= limit)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(h) = self.in_hand.remove(&id) {
                self.completed(id, h, Err(MailboxError::Timeout), ctx);
            }
        }
    }

    fn completed(
        &mut self,
        id: u64,
        h: InHand,
        res: Result<Result<(), HandlerError>, MailboxError>,
        ctx: &mut Context<Self>,
    ) {
        let (j, generation) = (h.member, h.generation);
        self.in_flight -= 1;
        if self.members[j].generation == generation {
            self.members[j].in_flight = self.members[j].in_flight.saturating_sub(1);
        }
        if matches!(res, Err(MailboxError::Closed)) {
            let m = &mut self.members[j];
            let dead = m.generation != generation || !m.addr.connected();
            if dead {
                // Its actor stopped: this delivery may never have run.
                if m.generation == generation && !self.draining {
                    warn!(group = %self.group, member = j, "handler actor stopped; restarting it");
                    m.addr = (self.spawner.spawn)(j);
                    m.in_flight = 0;
                    m.generation += 1;
                    m.panicked = Arc::default();
                }
                self.casualties
                    .entry((j, generation))
                    .or_default()
                    .push((id, h));
            } else {
                // The actor lives: the future it returned panicked.
                self.failed(h, "the handler's future panicked".to_string(), ctx);
            }
        } else {
            self.outcome(h, res, ctx);
        }
        if self.casualties.contains_key(&(j, generation)) {
            self.resolve_casualties(j, generation, ctx);
        }
        self.dispatch(ctx);
        self.maybe_finish(ctx);
    }

    /// Settles the deliveries a dead member held without replying, once
    /// none of that generation's is outstanding: the one it panicked on
    /// (known from its drop during the unwind, else the earliest — a member
    /// handles its mailbox in order) is a failed attempt; the rest never
    /// ran and go back to the front of the queue as they were.
    fn resolve_casualties(&mut self, j: usize, generation: u64, ctx: &mut Context<Self>) {
        if self
            .in_hand
            .values()
            .any(|h| h.member == j && h.generation == generation)
        {
            return;
        }
        let Some(mut lost) = self.casualties.remove(&(j, generation)) else {
            return;
        };
        lost.sort_by_key(|(id, _)| *id);
        let ids: Vec<u64> = lost.iter().map(|(id, _)| *id).collect();
        if let Some(culprit) = lost[0].1.panicked.culprit(&ids) {
            let (_, h) = lost.remove(culprit);
            self.failed(
                h,
                "the handler panicked (its actor stopped and was replaced)".to_string(),
                ctx,
            );
        }
        for (_, h) in lost.into_iter().rev() {
            self.pending.push_front(RawDelivery {
                message: h.message,
                attempt: h.attempt,
                token: h.token,
            });
        }
    }

    /// Settles a delivery its handler answered (or that timed out).
    fn outcome(
        &mut self,
        h: InHand,
        res: Result<Result<(), HandlerError>, MailboxError>,
        ctx: &mut Context<Self>,
    ) {
        let failure = match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.is_retry() => Err(e.message().to_string()),
            Ok(Err(e)) => {
                let reason = e.message().to_string();
                self.settle(h.token, Settlement::DeadLetter { reason }, ctx);
                return;
            }
            Err(MailboxError::Timeout) => Err(format!(
                "consume timeout: the handler took longer than {:?}",
                self.config.consume_timeout
            )),
            Err(MailboxError::Closed) => Err("the handler's actor stopped".to_string()),
        };
        match failure {
            Ok(()) => self.settle(h.token, Settlement::Ack, ctx),
            Err(error) => self.failed(h, error, ctx),
        }
    }

    /// A failed attempt: retried per the policy, or dead-lettered after the
    /// last one.
    fn failed(&mut self, h: InHand, error: String, ctx: &mut Context<Self>) {
        let attempt = h.attempt;
        let settlement = match self.config.retry.delay_after(attempt) {
            Some(delay) => {
                warn!(group = %self.group, topic = %self.topic, msg_id = %h.message.id(),
                    attempt, ?delay, %error, "delivery failed; will retry");
                Settlement::Nack { delay, error }
            }
            None => Settlement::DeadLetter {
                reason: format!(
                    "failed {attempt} of {} attempts; last error: {error}",
                    self.config.retry.max_attempts()
                ),
            },
        };
        self.settle(h.token, settlement, ctx);
    }

    fn maybe_finish(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight == 0 && (self.draining || self.stream_done) {
            self.flush();
            if let Some(tx) = self.drained.take() {
                let _ = tx.send(());
            }
            ctx.stop();
        }
    }
}

impl<E, A> Actor for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.spawner.stop_threads();
    }

    fn started(&mut self, ctx: &mut Context<Self>) {
        // A delivery fails at most a quarter of the timeout (≤ 1 s) late.
        let every = (self.config.consume_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        ctx.run_interval(every, |act, ctx| act.sweep(ctx));
    }
}

impl<E, A> StreamHandler<DeliveryBatch> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    fn handle(&mut self, batch: DeliveryBatch, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        self.pending.extend(batch);
        self.dispatch(ctx);
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.stream_done = true;
        self.pending.clear();
        self.maybe_finish(ctx);
    }
}

impl<E, A> Handler<FlushSettlements> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Result = ();

    fn handle(&mut self, _: FlushSettlements, _: &mut Context<Self>) {
        self.flush();
    }
}

impl<E, A> Handler<Drain> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Result = MessageResult<Drain>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.draining = true;
        self.pending.clear();
        self.drained = Some(tx);
        self.maybe_finish(ctx);
        MessageResult(rx)
    }
}
