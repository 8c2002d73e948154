//! A test kit for handler actors: [`TestBus`] — the same [`Bus`] on the
//! in-memory store — on a **virtual clock** (feature `testing`).
//!
//! Time stands still until the test moves it with [`TestBus::advance`]:
//! every time-driven part of the bus — retries and their backoff, delayed
//! messages, transaction checks, consume timeouts, rate limits, retention —
//! waits on that clock ([`Clock`]), so a 16-step retry schedule of almost
//! five hours runs to the dead-letter queue in milliseconds, and the same
//! test gives the same sequence of events every run. Production and tests
//! run the same code: a normal bus reads the system clock through the same
//! [`Clock`].
//!
//! The whole bus runs on the test's own thread (the arbiter that opened
//! it), so nothing moves behind the test's back: between two calls to the
//! kit the bus has either finished what the last step started
//! ([`TestBus::wait_idle`]) or the kit says it did not.
//!
//! # Assertions
//!
//! In the spirit of MassTransit's test harness, each waits until the bus is
//! idle (real-time deadline: [`TestBus::idle_timeout`], 5 s by default;
//! never a sleep) and then reads what happened:
//!
//! * [`TestBus::published`] — the events of a type published so far;
//! * [`TestBus::handled`] — every attempt a group made, with its virtual
//!   time and outcome (acked, retried after a delay, dead-lettered);
//! * [`TestBus::dead_lettered`] — the group's dead-letter queue, as stored.
//!
//! # Example: the default retry schedule, run to the DLQ
//!
//! ```
//! use std::time::Duration;
//! use weirmq::prelude::*;
//! use weirmq::testing::{Outcome, TestBus};
//!
//! #[derive(Serialize, Deserialize, Debug, Clone)]
//! struct Charge { order: u64 }
//! impl Event for Charge { const TOPIC: &'static str = "charges"; }
//!
//! struct AlwaysDown;
//! impl Actor for AlwaysDown { type Context = Context<Self>; }
//! impl Handler<Delivery<Charge>> for AlwaysDown {
//!     type Result = Result<(), HandlerError>;
//!     fn handle(&mut self, _: Delivery<Charge>, _: &mut Context<Self>) -> Self::Result {
//!         Err(HandlerError::retry("payment provider down"))
//!     }
//! }
//!
//! # #[actix::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let started = std::time::Instant::now();
//! let bus = TestBus::start().await?;
//! let _sub = bus.subscribe::<Charge>("billing").members(1, || AlwaysDown).start().await?;
//! bus.publish(&Charge { order: 7 }).await?;
//!
//! // RocketMQ's schedule: 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h.
//! bus.advance(Duration::from_secs(5 * 3600)).await?;
//!
//! let attempts = bus.handled("billing").await?;
//! assert_eq!(attempts.len(), 17); // the first delivery and 16 retries
//! let at: Vec<u64> = attempts.iter().map(|a| a.at.as_secs()).collect();
//! assert_eq!(at, [0, 10, 40, 100, 220, 400, 640, 940, 1300, 1720, 2200,
//!                 2740, 3340, 4540, 6340, 9940, 17140]); // 4 h 45 min 40 s
//! assert!(matches!(attempts[16].outcome, Outcome::DeadLettered { .. }));
//! assert_eq!(bus.dead_lettered("billing").await?.len(), 1);
//! assert!(started.elapsed() < Duration::from_secs(1));
//! # Ok(()) }
//! ```

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weirmq_actors::SettlementObserver;
use weirmq_bus::{Clock, DeadLetter, Event, Message, MessageId, SendReceipt, Settlement};

use crate::{Bus, BusBuilder, Error};

/// Where a test bus's clock starts: 2030-01-01T00:00:00Z (a fixed instant,
/// so stored times are the same every run).
pub const TEST_EPOCH_SECS: u64 = 1_893_456_000;

/// Scheduler passes with no recorded activity after which the bus counts
/// as idle (every actor message handled in between is one pass on the
/// test's single thread; chains between two recorded steps are shorter).
const QUIET_PASSES: u32 = 16;

/// The bus's clock, seen from a test: where it stands, relative to where
/// it started, and the only way it moves ([`advance`](Self::advance)).
#[derive(Debug, Clone)]
pub struct TestClock {
    clock: Clock,
    start: SystemTime,
    idle_timeout: Duration,
}

impl TestClock {
    /// Waits until the bus has done everything it can do without the clock
    /// moving: publishes stored and delivered, handlers answered, retries
    /// and dead letters written. Measured, never slept for: the bus's
    /// actors record activity on the clock, and this yields to the test
    /// thread's scheduler until 16 passes in a row see none.
    ///
    /// # Errors
    ///
    /// [`NotIdle`] after the idle timeout (real time, default 5 s).
    pub async fn run_until_idle(&self) -> Result<(), NotIdle> {
        let started = std::time::Instant::now();
        let mut quiet = 0;
        let mut seen = self.clock.activity();
        while quiet < QUIET_PASSES {
            if started.elapsed() > self.idle_timeout {
                return Err(NotIdle {
                    waited: started.elapsed(),
                });
            }
            tokio::task::yield_now().await;
            let now = self.clock.activity();
            if now == seen {
                quiet += 1;
            } else {
                seen = now;
                quiet = 0;
            }
        }
        Ok(())
    }

    /// Moves the clock forward by `d`, firing every timer that falls due on
    /// the way at its own time, in order, and letting the bus finish what
    /// each one starts before the next (so a retry scheduled by an attempt
    /// at 0:10 for 0:40 fires at 0:40 within the same call). Returns once
    /// the bus is idle at the new time.
    ///
    /// # Errors
    ///
    /// [`NotIdle`] if one step does not settle within the idle timeout.
    pub async fn advance(&self, d: Duration) -> Result<(), NotIdle> {
        let target = self.clock.now() + d;
        loop {
            self.run_until_idle().await?;
            match self.clock.next_deadline() {
                Some(t) if t <= target => self.clock.jump_to(t),
                _ => {
                    self.clock.jump_to(target);
                    break;
                }
            }
        }
        self.run_until_idle().await
    }

    /// Now, on the virtual clock.
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Virtual time since the test bus started.
    pub fn elapsed(&self) -> Duration {
        self.now().duration_since(self.start).unwrap_or_default()
    }

    /// Where the virtual clock started.
    pub fn start(&self) -> SystemTime {
        self.start
    }

    /// The clock the bus's parts read (a manual [`Clock`]).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}

/// One thing a test bus saw happen, at a virtual time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Virtual time since the test bus started.
    pub at: Duration,
    /// What happened.
    pub what: Happened,
}

/// What a [`Record`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    /// A publish through this bus was stored (a deduplicated publish,
    /// which stored nothing, is not recorded again).
    Published {
        /// The topic (a delayed message's own topic, not the schedule).
        topic: String,
        /// Its id.
        id: MessageId,
        /// For a delayed message: when it falls due (virtual, since start).
        due: Option<Duration>,
    },
    /// A group's handler finished an attempt (or the supervisor settled it
    /// without one: a body that did not decode).
    Handled(Handled),
}

/// One attempt of one consumer group at one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// Virtual time since the test bus started, when it was settled.
    pub at: Duration,
    /// The consumer group.
    pub group: String,
    /// The message's topic.
    pub topic: String,
    /// The message id.
    pub id: MessageId,
    /// Its queue and offset in the topic.
    pub queue: u32,
    /// Its offset in the queue.
    pub offset: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// What the attempt came to.
    pub outcome: Outcome,
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acked.
    Acked,
    /// Failed; tried again after `delay` (virtual).
    Retry {
        /// Until the next attempt.
        delay: Duration,
        /// The handler's error.
        error: String,
    },
    /// Dead-lettered (last attempt failed, or the handler said so).
    DeadLettered {
        /// Why.
        reason: String,
    },
}

/// What a test bus records: every publish through it and every settled
/// attempt of its subscriptions, in order. Shared by the bus and the kit.
#[derive(Debug)]
pub(crate) struct Journal {
    clock: Clock,
    start: SystemTime,
    records: Mutex<Vec<(Record, Option<Vec<u8>>)>>,
    /// Ids journaled as published: a deduplicated publish (its first
    /// receipt again) stored nothing and is not journaled twice.
    stored: Mutex<std::collections::HashSet<MessageId>>,
}

impl Journal {
    fn since_start(&self, t: SystemTime) -> Duration {
        t.duration_since(self.start).unwrap_or_default()
    }

    fn push(&self, at: Duration, what: Happened, body: Option<Vec<u8>>) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Record { at, what }, body));
    }

    /// Records stored publishes: (topic, body) each, with its receipt.
    pub(crate) fn published(&self, messages: Vec<(String, Vec<u8>)>, receipts: &[SendReceipt]) {
        for ((topic, body), r) in messages.into_iter().zip(receipts) {
            let new = self
                .stored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(r.message_id);
            if !new {
                continue;
            }
            let due = r.deliver_at.map(|t| self.since_start(t));
            self.push(
                self.since_start(self.clock.now()),
                Happened::Published {
                    topic,
                    id: r.message_id,
                    due,
                },
                Some(body),
            );
        }
    }
}

impl SettlementObserver for Journal {
    fn settled(&self, group: &str, m: &Message, attempt: u32, s: &Settlement) {
        let outcome = match s {
            Settlement::Ack => Outcome::Acked,
            Settlement::Nack { delay, error } => Outcome::Retry {
                delay: *delay,
                error: error.clone(),
            },
            Settlement::DeadLetter { reason } => Outcome::DeadLettered {
                reason: reason.clone(),
            },
        };
        let at = self.since_start(self.clock.now());
        self.push(
            at,
            Happened::Handled(Handled {
                at,
                group: group.to_string(),
                topic: m.topic().to_string(),
                id: m.id(),
                queue: m.queue(),
                offset: m.offset(),
                attempt,
                outcome,
            }),
            None,
        );
    }
}

/// The bus did not settle within the kit's real-time deadline: a handler
/// still running (blocked, or waiting on something outside the bus), or
/// work that keeps making more work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotIdle {
    /// How long the kit waited (real time).
    pub waited: Duration,
}

impl std::fmt::Display for NotIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the test bus was still busy after {:?} of real time (a handler that blocks or \
             waits on something outside the bus? raise TestBusBuilder::idle_timeout if it \
             is only slow)",
            self.waited
        )
    }
}

impl std::error::Error for NotIdle {}

/// The kit's assertions return the bus's [`Error`]; a bus that did not
/// become idle is [`Error::InvalidConfig`] with the [`NotIdle`] message.
impl From<NotIdle> for Error {
    fn from(e: NotIdle) -> Error {
        Error::InvalidConfig {
            reason: e.to_string(),
        }
    }
}

/// Configures a [`TestBus`].
#[derive(Debug)]
pub struct TestBusBuilder {
    builder: BusBuilder,
    start: SystemTime,
    idle_timeout: Duration,
}

impl TestBusBuilder {
    /// Changes the underlying bus's settings (limits, retention interval,
    /// transaction checkers, memory budget...). The store stays in memory,
    /// and the clock the kit's.
    pub fn configure(mut self, f: impl FnOnce(BusBuilder) -> BusBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }

    /// Where the virtual clock starts (default 2030-01-01T00:00:00Z,
    /// [`TEST_EPOCH_SECS`]).
    pub fn start_at(mut self, t: SystemTime) -> Self {
        self.start = t;
        self
    }

    /// How long (real time) the kit waits for the bus to be idle before it
    /// gives up with [`NotIdle`] (default 5 s).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Opens the test bus. Must run inside an actix `System`
    /// (`#[actix::test]`).
    ///
    /// # Errors
    ///
    /// As [`BusBuilder::open`].
    pub async fn start(self) -> Result<TestBus, Error> {
        let clock = Clock::manual(self.start);
        let journal = Arc::new(Journal {
            clock: clock.clone(),
            start: self.start,
            records: Mutex::new(Vec::new()),
            stored: Mutex::new(Default::default()),
        });
        let mut builder = self.builder.in_memory();
        builder.clock = clock.clone();
        builder.current_arbiter = true;
        builder.journal = Some(journal.clone());
        let bus = builder.open().await?;
        let t = TestBus {
            bus,
            clock: TestClock {
                clock,
                start: self.start,
                idle_timeout: self.idle_timeout,
            },
            journal,
        };
        t.wait_idle().await?;
        Ok(t)
    }
}

/// An in-memory [`Bus`] on a virtual clock, with assertions. Derefs to the
/// [`Bus`]: publish, subscribe and query it as usual. See the module docs.
#[derive(Debug)]
pub struct TestBus {
    bus: Bus,
    clock: TestClock,
    journal: Arc<Journal>,
}

impl Deref for TestBus {
    type Target = Bus;

    fn deref(&self) -> &Bus {
        &self.bus
    }
}

impl TestBus {
    /// A test bus with the defaults (see [`TestBusBuilder`]).
    ///
    /// # Errors
    ///
    /// As [`BusBuilder::open`].
    pub async fn start() -> Result<TestBus, Error> {
        TestBus::builder().start().await
    }

    /// Configures a test bus.
    pub fn builder() -> TestBusBuilder {
        TestBusBuilder {
            builder: Bus::builder(),
            start: UNIX_EPOCH + Duration::from_secs(TEST_EPOCH_SECS),
            idle_timeout: Duration::from_secs(5),
        }
    }

    /// The bus (also reachable through `Deref`).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The virtual clock.
    pub fn clock(&self) -> &TestClock {
        &self.clock
    }

    /// The kit's real-time deadline for the bus to become idle.
    pub fn idle_timeout(&self) -> Duration {
        self.clock.idle_timeout
    }

    /// Waits until the bus has done everything it can do without the clock
    /// moving (see [`TestClock::run_until_idle`]).
    ///
    /// # Errors
    ///
    /// [`NotIdle`] after [`idle_timeout`](Self::idle_timeout) of real time.
    pub async fn wait_idle(&self) -> Result<(), NotIdle> {
        self.clock.run_until_idle().await
    }

    /// Moves the virtual clock forward by `d` (see [`TestClock::advance`]).
    ///
    /// # Errors
    ///
    /// [`NotIdle`] if one step does not settle within the idle timeout.
    pub async fn advance(&self, d: Duration) -> Result<(), NotIdle> {
        self.clock.advance(d).await
    }

    /// Moves the virtual clock to `t` (as [`advance`](Self::advance)).
    ///
    /// # Errors
    ///
    /// As [`advance`](Self::advance).
    pub async fn advance_to(&self, t: SystemTime) -> Result<(), NotIdle> {
        let d = t.duration_since(self.clock.now()).unwrap_or_default();
        self.advance(d).await
    }

    /// Everything recorded so far, in order (without waiting).
    pub fn journal(&self) -> Vec<Record> {
        self.journal
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Once idle: every event of type `E` published through this bus so
    /// far (handlers' publishes included), in publish order, decoded.
    ///
    /// # Errors
    ///
    /// [`NotIdle`]; a body that does not decode as `E` is an
    /// [`Error::Codec`] (another event type on the same topic).
    pub async fn published<E: Event>(&self) -> Result<Vec<E>, Error> {
        self.wait_idle().await?;
        let records = self
            .journal
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (r, body) in records.iter() {
            if let (Happened::Published { topic, .. }, Some(body)) = (&r.what, body) {
                if topic == E::TOPIC {
                    out.push(E::decode(body)?);
                }
            }
        }
        Ok(out)
    }

    /// Once idle: every attempt `group` settled so far, in order.
    ///
    /// # Errors
    ///
    /// [`NotIdle`] (as [`Error::InvalidConfig`]).
    pub async fn handled(&self, group: &str) -> Result<Vec<Handled>, Error> {
        self.wait_idle().await?;
        Ok(self
            .journal()
            .into_iter()
            .filter_map(|r| match r.what {
                Happened::Handled(h) if h.group == group => Some(h),
                _ => None,
            })
            .collect())
    }

    /// Once idle: `group`'s dead-letter queue, as stored (first 10,000).
    ///
    /// # Errors
    ///
    /// [`NotIdle`] (as [`Error::InvalidConfig`]), or a store error.
    pub async fn dead_lettered(&self, group: &str) -> Result<Vec<DeadLetter>, Error> {
        self.wait_idle().await?;
        self.bus.dead_letters(group, 0, 10_000).await
    }
}
