//! Subscribing: [`SubscribeBuilder`] and the running [`Subscription`].

use std::marker::PhantomData;
use std::time::Duration;

use actix::{Actor, ArbiterHandle, Context, Handler};
use weirmq_actors::{start_subscriber, Delivery, Members, SubscriberConfig, SubscriberHandle};
use weirmq_bus::{
    validate_group_name, Error, Event, Filter, GroupStats, Ordering, QueuePosition, RetryPolicy,
    StartFrom, SubscriptionSpec,
};

use crate::bus::Bus;

/// Builds a consumer group's subscription. See [`Bus::subscribe`].
///
/// # Examples
///
/// ```
/// use weirmq::prelude::*;
/// # #[derive(Serialize, Deserialize, Debug)] struct Ping(u32);
/// # impl Event for Ping { const TOPIC: &'static str = "ping"; }
/// struct Pong;
/// impl Actor for Pong { type Context = Context<Self>; }
/// impl Handler<Delivery<Ping>> for Pong {
///     type Result = Result<(), HandlerError>;
///     fn handle(&mut self, d: Delivery<Ping>, _: &mut Context<Self>) -> Self::Result {
///         println!("ping {}", d.event().0);
///         Ok(())
///     }
/// }
/// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
/// let bus = Bus::builder().in_memory().open().await?;
/// let sub = bus.subscribe::<Ping>("pong-service")
///     .start_from(StartFrom::Earliest)
///     .max_in_flight(512)
///     .members(3, || Pong)
///     .start()
///     .await?;
/// bus.publish(&Ping(1)).await?;
/// sub.drain().await?;
/// bus.shutdown().await
/// # }
/// ```
pub struct SubscribeBuilder<E, A = ()> {
    bus: Bus,
    group: String,
    start: StartFrom,
    max_in_flight: usize,
    filter: Filter,
    ordering: Ordering,
    config: SubscriberConfig,
    retry_set: bool,
    broadcast: Option<Vec<String>>,
    per_member_set: bool,
    members: Option<Members<A>>,
    _event: PhantomData<fn() -> E>,
}

impl<E, A> std::fmt::Debug for SubscribeBuilder<E, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeBuilder")
            .field("group", &self.group)
            .field("start", &self.start)
            .field("max_in_flight", &self.max_in_flight)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl<E: Event> SubscribeBuilder<E, ()> {
    pub(crate) fn new(bus: Bus, group: String) -> Self {
        let config = SubscriberConfig {
            trace_sampling: bus.trace_sampling().clone(),
            clock: bus.clock().clone(),
            observer: bus.observer(),
            ..SubscriberConfig::default()
        };
        SubscribeBuilder {
            bus,
            group,
            start: StartFrom::Latest,
            max_in_flight: 1024,
            filter: Filter::All,
            ordering: Ordering::Concurrent,
            config,
            retry_set: false,
            broadcast: None,
            per_member_set: false,
            members: None,
            _event: PhantomData,
        }
    }
}

impl<E: Event, A> SubscribeBuilder<E, A> {
    /// The handler actors: `n` members made by `factory`, started on the
    /// current arbiter (where `start` runs), beside their supervisor. A
    /// member that panics is replaced by a fresh one from the factory.
    ///
    /// Right for handlers that do not block their thread. A handler that
    /// blocks (`std::thread::sleep`, blocking I/O, long computations) stalls
    /// every actor on its arbiter — other subscriptions included: use
    /// [`blocking_members`](Self::blocking_members) for those.
    pub fn members<B, F>(self, n: usize, factory: F) -> SubscribeBuilder<E, B>
    where
        B: Actor<Context = Context<B>>,
        F: Fn() -> B + 'static,
    {
        self.placed(Members::local(n, factory))
    }

    /// Handler actors that may block their thread: `n` members made by
    /// `factory`, each on a thread (actix arbiter) of its own that the
    /// subscription starts and stops when it ends. A blocked member holds up
    /// only the deliveries in its own hands; other members and other
    /// subscriptions go on. Unless
    /// [`max_in_flight_per_member`](Self::max_in_flight_per_member) is set,
    /// each member holds one delivery at a time (so a slow one does not sit
    /// on deliveries an idle one could take).
    ///
    /// The handler is the same actix actor as for [`members`](Self::members);
    /// the factory must be `Send + Sync` (it runs on the members' threads).
    ///
    /// # Examples
    ///
    /// ```
    /// use weirmq::prelude::*;
    /// # #[derive(Serialize, Deserialize, Debug)] struct Report(u32);
    /// # impl Event for Report { const TOPIC: &'static str = "reports"; }
    /// struct Renderer;
    /// impl Actor for Renderer { type Context = Context<Self>; }
    /// impl Handler<Delivery<Report>> for Renderer {
    ///     type Result = Result<(), HandlerError>;
    ///     fn handle(&mut self, d: Delivery<Report>, _: &mut Context<Self>) -> Self::Result {
    ///         // Blocking work is fine here: this member has a thread of its own.
    ///         std::thread::sleep(std::time::Duration::from_millis(d.event().0.into()));
    ///         Ok(())
    ///     }
    /// }
    /// # #[actix::main] async fn main() -> Result<(), weirmq::Error> {
    /// let bus = Bus::builder().in_memory().open().await?;
    /// let sub = bus.subscribe::<Report>("renderers")
    ///     .blocking_members(4, || Renderer)
    ///     .start()
    ///     .await?;
    /// bus.publish(&Report(5)).await?;
    /// sub.drain().await?;
    /// bus.shutdown().await
    /// # }
    /// ```
    pub fn blocking_members<B, F>(self, n: usize, factory: F) -> SubscribeBuilder<E, B>
    where
        B: Actor<Context = Context<B>>,
        F: Fn() -> B + Send + Sync + 'static,
    {
        let mut b = self.placed(Members::threads(n, factory));
        if !b.per_member_set {
            b.config.max_in_flight_per_member = 1;
        }
        b
    }

    /// Handler actors on an arbiter of the application's: `n` members made
    /// by `factory`, all started on `arbiter` (the application owns it and
    /// stops it after the subscription drained). For example one thread
    /// shared by several subscriptions whose handlers block, or handlers
    /// kept beside other actors of the application.
    pub fn members_on<B, F>(
        self,
        arbiter: &ArbiterHandle,
        n: usize,
        factory: F,
    ) -> SubscribeBuilder<E, B>
    where
        B: Actor<Context = Context<B>>,
        F: Fn() -> B + Send + Sync + 'static,
    {
        self.placed(Members::on(arbiter.clone(), n, factory))
    }

    fn placed<B>(self, members: Members<B>) -> SubscribeBuilder<E, B> {
        SubscribeBuilder {
            bus: self.bus,
            group: self.group,
            start: self.start,
            max_in_flight: self.max_in_flight,
            filter: self.filter,
            ordering: self.ordering,
            config: self.config,
            retry_set: self.retry_set,
            broadcast: self.broadcast,
            per_member_set: self.per_member_set,
            members: Some(members),
            _event: PhantomData,
        }
    }

    /// Receives only the messages `filter` accepts (default: all). Build it
    /// with [`Filter::tags`] (`"vip || gold"`), which reports a bad
    /// expression with its position. The rest are skipped: the group's
    /// position moves past them.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Ordered consumption ([`Ordering::Fifo`]): the messages of one
    /// message group ([`Publish::message_group`](crate::Publish::message_group))
    /// are handled one at a time, in publish order, each retried in place
    /// until it succeeds or is dead-lettered — while other message groups go
    /// on in parallel. Default [`Ordering::Concurrent`].
    pub fn ordering(mut self, ordering: Ordering) -> Self {
        self.ordering = ordering;
        self
    }

    /// Where a group with no committed position starts (default
    /// [`StartFrom::Latest`]). A group that has one resumes there.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// The most unsettled deliveries of this subscription at once (default
    /// 1024). Bounds memory whatever the backlog.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// The most deliveries in one member's hands at once (default 8; 1 for
    /// [`blocking_members`](Self::blocking_members)). Each member's actix
    /// mailbox is made to hold at least this many messages (actix's default
    /// is 16), so the deliveries handed out do not fill it; a handler that
    /// sets its own capacity in `started` keeps its own.
    pub fn max_in_flight_per_member(mut self, n: usize) -> Self {
        self.per_member_set = true;
        self.config.max_in_flight_per_member = n.max(1);
        self
    }

    /// Hands members at most `per_second` deliveries per second, for the
    /// whole subscription in this process (default: unlimited). The backlog
    /// waits in the store; at most `max_in_flight` messages wait in memory.
    /// Over any 1 s window the rate is exceeded by at most 5%.
    pub fn rate_limit(mut self, per_second: u32) -> Self {
        self.config.rate_limit = Some(per_second);
        self
    }

    /// When a failed delivery (an `Err`, a panic, a consume timeout) is
    /// tried again, and after how many attempts it is dead-lettered
    /// (default: RocketMQ's schedule, 10 s … 2 h, 16 retries).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self.retry_set = true;
        self
    }

    /// Broadcasting: every member gets every message. `member_ids` are
    /// stable names chosen by the application; each member keeps its own
    /// position (as consumer group `<group>%<id>`), so a restarted member
    /// resumes where it was. One handler actor per id, made by the
    /// `members` factory (its count is ignored). As in RocketMQ, failures
    /// are not retried unless [`retry`](Self::retry) is set: a failed
    /// delivery goes to that member's dead-letter queue (logged, counted).
    pub fn broadcast<I, S>(mut self, member_ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.broadcast = Some(member_ids.into_iter().map(Into::into).collect());
        self
    }

    /// How long a handler may take over one delivery before the attempt
    /// counts as failed (default 60 s). The handler is not cancelled; its
    /// late result is ignored.
    pub fn consume_timeout(mut self, timeout: Duration) -> Self {
        self.config.consume_timeout = timeout;
        self
    }

    /// Makes this an **inbox** subscription: exactly-once effects on the
    /// bus's own state. A handler writes with
    /// [`Delivery::commit_state`](weirmq_actors::Delivery::commit_state);
    /// when it returns `Ok`, those writes and the message's *processed
    /// mark* are committed in one atomic write, then the message is acked.
    /// A message whose mark is stored is acked without reaching a handler
    /// again — after a crash between the commit and the ack, a redelivery,
    /// or a replay — so its writes happen exactly once per message per
    /// group. A failed attempt writes nothing. A member's slot stays taken
    /// until its attempt's writes are committed, so a handler that reads
    /// state and writes it back, run one at a time (one member,
    /// [`max_in_flight_per_member(1)`](Self::max_in_flight_per_member)),
    /// reads what the attempt before it committed. See
    /// docs/exactly-once.md.
    ///
    /// The embedded store only (its outbox role keeps the application's
    /// state): on NATS, [`start`](Self::start) answers
    /// [`Error::Unsupported`].
    pub fn inbox(mut self) -> Self {
        self.config.inbox = true;
        self
    }
}

impl<E, A> SubscribeBuilder<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    /// Starts the subscription: the supervisor runs on the current arbiter,
    /// the members where [`members`](Self::members),
    /// [`blocking_members`](Self::blocking_members) or
    /// [`members_on`](Self::members_on) placed them.
    ///
    /// # Errors
    ///
    /// An invalid group name, [`Error::AlreadySubscribed`], no members, or
    /// a storage error.
    ///
    /// # Delivery
    ///
    /// Every message of the topic published after the group's start point is
    /// delivered to one member at least once; messages of one queue are
    /// handed out in offset order but processed concurrently, unless the
    /// subscription is [`Ordering::Fifo`].
    pub async fn start(self) -> Result<Subscription, Error> {
        let members = self.members.ok_or_else(|| Error::InvalidConfig {
            reason:
                "call .members(n, factory) (or .blocking_members / .members_on) before .start()"
                    .into(),
        })?;
        let spec = |group: String| SubscriptionSpec {
            group,
            topic: E::TOPIC.to_string(),
            start: self.start,
            max_in_flight: self.max_in_flight,
            filter: self.filter.clone(),
            ordering: self.ordering,
        };
        let broker = self.bus.broker().clone();
        let Some(ids) = self.broadcast else {
            let handle =
                start_subscriber::<E, A>(broker, spec(self.group.clone()), members, self.config)
                    .await?;
            self.bus.watch(&self.group, E::TOPIC);
            return Ok(Subscription {
                bus: self.bus,
                group: self.group,
                handles: vec![handle],
            });
        };
        if ids.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "a broadcast subscription needs at least one member id".into(),
            });
        }
        let mut config = self.config;
        if !self.retry_set {
            config.retry = RetryPolicy::none();
        }
        let groups: Vec<String> = ids
            .iter()
            .map(|id| format!("{}%{id}", self.group))
            .collect();
        for g in &groups {
            validate_group_name(g)?;
        }
        let mut handles = Vec::with_capacity(groups.len());
        for g in groups {
            match start_subscriber::<E, A>(
                broker.clone(),
                spec(g.clone()),
                members.clone().with_count(1),
                config.clone(),
            )
            .await
            {
                Ok(h) => {
                    self.bus.watch(&g, E::TOPIC);
                    handles.push(h)
                }
                Err(e) => {
                    for h in handles {
                        let _ = h.drain().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(Subscription {
            bus: self.bus,
            group: self.group,
            handles,
        })
    }
}

/// A running subscription. Dropping it leaves it running; call
/// [`Subscription::drain`] to stop it gracefully.
#[derive(Debug)]
pub struct Subscription {
    bus: Bus,
    group: String,
    /// One per consumer position: one for clustering, one per member id for
    /// broadcasting.
    handles: Vec<SubscriberHandle>,
}

impl Subscription {
    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        self.handles[0].topic()
    }

    /// The consumer groups that hold this subscription's positions: the
    /// group itself, or `<group>%<id>` per broadcast member (use them with
    /// the bus's admin calls, e.g. `dead_letters`).
    pub fn position_groups(&self) -> Vec<&str> {
        self.handles.iter().map(|h| h.group()).collect()
    }

    /// Whether every supervisor is still running.
    pub fn is_running(&self) -> bool {
        self.handles.iter().all(|h| h.is_running())
    }

    /// The position and lag in each queue (for broadcasting: one set per
    /// member, in member order).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn positions(&self) -> Result<Vec<QueuePosition>, Error> {
        let mut out = Vec::new();
        for h in &self.handles {
            out.extend(self.bus.positions(h.group(), h.topic()).await?);
        }
        Ok(out)
    }

    /// Counters since the subscription started (summed over broadcast
    /// members).
    pub async fn stats(&self) -> GroupStats {
        let mut total = GroupStats::default();
        for h in &self.handles {
            let s = self.bus.group_stats(h.group(), h.topic()).await;
            total.delivered += s.delivered;
            total.acked += s.acked;
            total.retried += s.retried;
            total.dead_lettered += s.dead_lettered;
            total.in_flight += s.in_flight;
            total.scheduled_retries += s.scheduled_retries;
            total.filtered += s.filtered;
        }
        total
    }

    /// Finishes the deliveries in members' hands, settles them, writes the
    /// group's positions and stops. Messages not yet handed to a member are
    /// delivered to the group's next subscription.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn drain(self) -> Result<(), Error> {
        let mut first_error = None;
        for h in self.handles {
            if let Err(e) = h.drain().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
