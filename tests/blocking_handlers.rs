//! Handlers that block their thread (`std::thread::sleep`, blocking I/O,
//! heavy computation) run on threads of their own with
//! `SubscribeBuilder::blocking_members` (or on an arbiter of the
//! application's with `members_on`), so they never stall the subscriptions
//! beside them.
//!
//! Regression (issue 13, defect 7): with `.members(..)` the blocking
//! handler below stalls every subscription of the same arbiter (the other
//! group got nothing for the 10 s it blocked; checked on the previous main
//! with this test's first case written with `.members(1, ..)`).

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use weirmq::prelude::*;

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Job(u64);
impl Event for Job {
    const TOPIC: &'static str = "jobs";
}

/// Blocks its thread until `other` has handled `want` deliveries (or 10 s
/// pass), then records whether the other group got them meanwhile.
struct Blocker {
    other: Log,
    want: usize,
    released: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl Actor for Blocker {
    type Context = Context<Self>;
}

impl Handler<Delivery<Job>> for Blocker {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, _: Delivery<Job>, _: &mut Context<Self>) -> Self::Result {
        let end = Instant::now() + Duration::from_secs(10);
        // A blocking wait, on purpose: this is the kind of handler under test.
        while self.other.len() < self.want {
            if Instant::now() > end {
                self.timed_out.store(true, Ordering::SeqCst);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.released.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Placement {
    OwnThreads,
    AnArbiterOfOurs,
}

#[actix::test]
async fn a_blocking_group_does_not_stall_another_group() {
    for placement in [Placement::OwnThreads, Placement::AnArbiterOfOurs] {
        let bus = Bus::builder().in_memory().open().await.unwrap();
        let fast = Log::default();
        let released = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let (f, r, t) = (fast.clone(), released.clone(), timed_out.clone());
        let factory = move || Blocker {
            other: f.clone(),
            want: 50,
            released: r.clone(),
            timed_out: t.clone(),
        };
        let ours = actix::Arbiter::new();
        let builder = bus.subscribe::<Job>("slow");
        let slow = match placement {
            Placement::OwnThreads => builder.blocking_members(1, factory).start().await,
            Placement::AnArbiterOfOurs => {
                builder.members_on(&ours.handle(), 1, factory).start().await
            }
        }
        .unwrap();
        let quick = bus
            .subscribe::<Num>("quick")
            .members(2, recorders(&fast, ack_all()))
            .start()
            .await
            .unwrap();
        bus.publish(&Job(1)).await.unwrap();
        for n in 0..50 {
            bus.publish(&Num { n }).await.unwrap();
        }
        wait_until(
            "the blocking handler returned",
            Duration::from_secs(30),
            || {
                let (r, t) = (released.clone(), timed_out.clone());
                async move { r.load(Ordering::SeqCst) || t.load(Ordering::SeqCst) }
            },
        )
        .await;
        assert!(
            released.load(Ordering::SeqCst),
            "{placement:?}: the other group got its 50 messages while the blocking handler ran"
        );
        caught_up(&bus, "slow", Job::TOPIC).await;
        slow.drain().await.unwrap();
        quick.drain().await.unwrap();
        bus.shutdown().await.unwrap();
        ours.stop();
    }
}

/// Blocks until `n` of its kind are blocking at once (or 10 s pass).
struct Rendezvous {
    inside: Arc<AtomicUsize>,
    n: usize,
    met: Arc<AtomicUsize>,
}

impl Actor for Rendezvous {
    type Context = Context<Self>;
}

impl Handler<Delivery<Job>> for Rendezvous {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, _: Delivery<Job>, _: &mut Context<Self>) -> Self::Result {
        self.inside.fetch_add(1, Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while self.inside.load(Ordering::SeqCst) < self.n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.inside.load(Ordering::SeqCst) >= self.n {
            self.met.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[actix::test]
async fn blocking_members_block_in_parallel_each_on_its_own_thread() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let inside = Arc::new(AtomicUsize::new(0));
    let met = Arc::new(AtomicUsize::new(0));
    let (i, m) = (inside.clone(), met.clone());
    let sub = bus
        .subscribe::<Job>("parallel")
        .blocking_members(4, move || Rendezvous {
            inside: i.clone(),
            n: 4,
            met: m.clone(),
        })
        .start()
        .await
        .unwrap();
    for n in 0..4 {
        bus.publish(&Job(n)).await.unwrap();
    }
    caught_up(&bus, "parallel", Job::TOPIC).await;
    assert_eq!(
        met.load(Ordering::SeqCst),
        4,
        "all four blocked at the same time (one delivery per member, each on its thread)"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Panics (in `handle`, killing the actor) on the first delivery of 3.
struct BlockingPanicky {
    log: Log,
    armed: Arc<AtomicBool>,
}

impl Actor for BlockingPanicky {
    type Context = Context<Self>;
}

impl Handler<Delivery<Job>> for BlockingPanicky {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Job>, _: &mut Context<Self>) -> Self::Result {
        self.log
            .0
            .lock()
            .unwrap()
            .push((0, d.event().0, d.attempt()));
        if d.event().0 == 3 && self.armed.swap(false, Ordering::SeqCst) {
            panic!("blocking handler bug on 3 (expected by the test)");
        }
        Ok(())
    }
}

#[actix::test]
async fn a_blocking_member_that_panics_is_replaced_on_its_thread() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let armed = Arc::new(AtomicBool::new(true));
    let (l, a) = (log.clone(), armed.clone());
    let sub = bus
        .subscribe::<Job>("g")
        .retry(RetryPolicy::fixed(Duration::from_millis(10), 5))
        .blocking_members(2, move || BlockingPanicky {
            log: l.clone(),
            armed: a.clone(),
        })
        .start()
        .await
        .unwrap();
    for n in 0..20 {
        bus.publish(&Job(n)).await.unwrap();
    }
    caught_up(&bus, "g", Job::TOPIC).await;
    assert!(!armed.load(Ordering::SeqCst), "the handler panicked once");
    let entries = log.entries();
    let threes: Vec<u32> = entries.iter().filter(|e| e.1 == 3).map(|e| e.2).collect();
    assert_eq!(threes, vec![1, 2]);
    for n in (0..20).filter(|n| *n != 3) {
        assert_eq!(entries.iter().filter(|e| e.1 == n).count(), 1, "{n} once");
    }
    assert!(sub.is_running());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
