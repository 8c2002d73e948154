//! Retry policy: schedules, max attempts, consume timeouts, dead letters,
//! and independence of groups. Schedules and timeouts run on the test kit's
//! virtual clock (exact times, no waiting); the restart test runs in real
//! time on a data directory. Waits have deadlines.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use support::*;
use weirmq::prelude::*;
use weirmq::testing::TestBus;
use weirmq::Clock;

/// Records (n, attempt, when by the bus's clock) and fails as
/// `fail(n, attempt)` says.
struct Flaky {
    seen: Seen,
    fail: Arc<dyn Fn(u64, u32) -> Option<HandlerError> + Send + Sync>,
    clock: Clock,
}

impl Actor for Flaky {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Flaky {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let n = d.event().n;
        self.seen
            .lock()
            .unwrap()
            .push((n, d.attempt(), self.clock.now()));
        match (self.fail)(n, d.attempt()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

type Seen = Arc<Mutex<Vec<(u64, u32, SystemTime)>>>;

async fn flaky_group(
    bus: &Bus,
    group: &str,
    policy: RetryPolicy,
    fail: impl Fn(u64, u32) -> Option<HandlerError> + Send + Sync + 'static,
) -> (Subscription, Seen) {
    let seen: Seen = Arc::default();
    let fail: Arc<dyn Fn(u64, u32) -> Option<HandlerError> + Send + Sync> = Arc::new(fail);
    let (s, clock) = (seen.clone(), bus.clock().clone());
    let sub = bus
        .subscribe::<Num>(group)
        .retry(policy)
        .members(2, move || Flaky {
            seen: s.clone(),
            fail: fail.clone(),
            clock: clock.clone(),
        })
        .start()
        .await
        .unwrap();
    (sub, seen)
}

#[actix::test]
async fn a_handler_failing_twice_is_retried_on_schedule_without_holding_back_others() {
    init_tracing();
    let bus = TestBus::start().await.unwrap();
    let policy =
        RetryPolicy::schedule(vec![Duration::from_millis(100), Duration::from_millis(200)]);
    let (sub, seen) = flaky_group(&bus, "g", policy, |n, attempt| {
        (n == 0 && attempt < 3).then(|| HandlerError::retry(format!("transient #{attempt}")))
    })
    .await;
    for n in 0..20 {
        bus.publish(&Num { n }).await.unwrap();
    }
    bus.advance(Duration::from_secs(1)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let zero: Vec<(u32, SystemTime)> = seen
        .iter()
        .filter(|s| s.0 == 0)
        .map(|s| (s.1, s.2))
        .collect();
    assert_eq!(zero.iter().map(|z| z.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    // Each retry exactly on schedule (virtual time).
    let gap1 = zero[1].1.duration_since(zero[0].1).unwrap();
    let gap2 = zero[2].1.duration_since(zero[1].1).unwrap();
    assert_eq!(gap1, Duration::from_millis(100));
    assert_eq!(gap2, Duration::from_millis(200));
    assert_eq!(zero[0].1, bus.clock().start(), "first delivery at once");
    // The others went through while 0 waited.
    let last_other = seen.iter().filter(|s| s.0 != 0).map(|s| s.2).max().unwrap();
    assert!(
        last_other < zero[1].1,
        "later messages were held back by the retry"
    );
    assert_eq!(seen.iter().filter(|s| s.0 != 0).count(), 19);
    let stats = sub.stats().await;
    assert_eq!(
        (stats.acked, stats.retried, stats.dead_lettered),
        (20, 2, 0)
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn an_always_failing_message_is_tried_max_attempts_times_then_dead_lettered() {
    let bus = TestBus::start().await.unwrap();
    let policy = RetryPolicy::fixed(Duration::from_millis(20), 3);
    let (sub, seen) = flaky_group(&bus, "g", policy, |n, attempt| {
        (n == 7).then(|| HandlerError::retry(format!("bad input on attempt {attempt}")))
    })
    .await;
    let bad = bus.publish(&Num { n: 7 }).await.unwrap();
    bus.publish(&Num { n: 8 }).await.unwrap();
    bus.advance(Duration::from_secs(1)).await.unwrap();
    let attempts: Vec<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.0 == 7)
        .map(|s| s.1)
        .collect();
    assert_eq!(attempts, vec![1, 2, 3], "exactly max_attempts deliveries");
    let dead = bus.dead_letters("g", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let p = dead[0].message.properties();
    assert_eq!(p["DLQ_ATTEMPTS"], "3");
    assert_eq!(p["DLQ_ORIGIN_MSG_ID"], bad.message_id.to_string());
    assert!(p["DLQ_REASON"].contains("bad input on attempt 3"), "{p:?}");
    assert!(p["DLQ_REASON"].contains("3 of 3 attempts"), "{p:?}");
    let first: u64 = p["DLQ_FIRST_FAILED_AT_MS"].parse().unwrap();
    let dead_at: u64 = p["DLQ_DEAD_LETTERED_AT_MS"].parse().unwrap();
    // First failure at once, dead-lettered after two 20 ms retries.
    assert_eq!(
        first,
        bus.clock()
            .start()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        "{first} {dead_at}"
    );
    assert_eq!(dead_at - first, 40, "{first} {dead_at}");
    let stats = sub.stats().await;
    assert_eq!((stats.retried, stats.dead_lettered), (2, 1));
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Never answers deliveries of n == 0 (a stuck handler); acks the rest.
struct Stuck {
    seen: Log,
}

impl Actor for Stuck {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Stuck {
    type Result = ResponseFuture<Result<(), HandlerError>>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.seen
            .0
            .lock()
            .unwrap()
            .push((0, d.event().n, d.attempt()));
        let stuck = d.event().n == 0;
        Box::pin(async move {
            if stuck {
                futures::future::pending::<()>().await;
            }
            Ok(())
        })
    }
}

#[actix::test]
async fn a_consume_timeout_counts_as_a_failure() {
    let bus = TestBus::start().await.unwrap();
    let log = Log::default();
    let l = log.clone();
    let sub = bus
        .subscribe::<Num>("g")
        .consume_timeout(Duration::from_millis(100))
        .retry(RetryPolicy::fixed(Duration::from_millis(10), 2))
        .members(1, move || Stuck { seen: l.clone() })
        .start()
        .await
        .unwrap();
    for n in 0..5 {
        bus.publish(&Num { n }).await.unwrap();
    }
    bus.advance(Duration::from_secs(1)).await.unwrap();
    let at: Vec<u128> = bus
        .handled("g")
        .await
        .unwrap()
        .iter()
        .filter(|h| h.offset == 0 && h.queue == 0)
        .map(|h| h.at.as_millis())
        .collect();
    // Timed out at 100 ms; retried 10 ms later; timed out again at 210 ms.
    assert_eq!(at, [100, 210]);
    let zero: Vec<u32> = log
        .entries()
        .iter()
        .filter(|e| e.1 == 0)
        .map(|e| e.2)
        .collect();
    assert_eq!(zero, vec![1, 2]);
    let dead = bus.dead_letters("g", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].message.properties()["DLQ_REASON"].contains("consume timeout"));
    assert_eq!(
        log.entries().iter().filter(|e| e.1 != 0).count(),
        4,
        "others served"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Panics (in `handle`) on every delivery of n == 0.
struct AlwaysPanics {
    seen: Log,
}

impl Actor for AlwaysPanics {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for AlwaysPanics {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.seen
            .0
            .lock()
            .unwrap()
            .push((0, d.event().n, d.attempt()));
        if d.event().n == 0 {
            panic!("bug on message 0 (expected by the test)");
        }
        Ok(())
    }
}

#[actix::test]
async fn a_message_that_always_panics_the_handler_ends_in_the_dlq() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let l = log.clone();
    let sub = bus
        .subscribe::<Num>("g")
        .retry(RetryPolicy::fixed(Duration::from_millis(10), 3))
        .members(2, move || AlwaysPanics { seen: l.clone() })
        .start()
        .await
        .unwrap();
    for n in 0..10 {
        bus.publish(&Num { n }).await.unwrap();
    }
    caught_up(&bus, "g", Num::TOPIC).await;
    let dead = bus.dead_letters("g", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].message.properties()["DLQ_REASON"].contains("panicked"));
    assert_eq!(dead[0].message.properties()["DLQ_ATTEMPTS"], "3");
    let counts: HashMap<u64, usize> = log.counts();
    assert_eq!(counts[&0], 3);
    assert!((1..10).all(|n| counts[&n] == 1), "{counts:?}");
    assert!(sub.is_running());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn one_groups_retries_and_dead_letters_do_not_touch_another_group() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let (failing, failing_seen) = flaky_group(
        &bus,
        "failing",
        RetryPolicy::fixed(Duration::from_millis(10), 2),
        |_, _| Some(HandlerError::retry("down")),
    )
    .await;
    let (healthy, healthy_seen) =
        flaky_group(&bus, "healthy", RetryPolicy::default(), |_, _| None).await;
    for n in 0..10 {
        bus.publish(&Num { n }).await.unwrap();
    }
    caught_up(&bus, "failing", Num::TOPIC).await;
    caught_up(&bus, "healthy", Num::TOPIC).await;
    assert_eq!(bus.dead_letters("failing", 0, 100).await.unwrap().len(), 10);
    assert!(bus
        .dead_letters("healthy", 0, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(failing_seen.lock().unwrap().len(), 20);
    let healthy_seen = healthy_seen.lock().unwrap().clone();
    assert_eq!(healthy_seen.len(), 10);
    assert!(healthy_seen.iter().all(|s| s.1 == 1));
    failing.drain().await.unwrap();
    healthy.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_restart_in_the_middle_of_a_retry_schedule_keeps_attempt_and_due_time() {
    init_tracing();
    let dir = temp_dir();
    let wait = Duration::from_millis(1500);
    let policy = RetryPolicy::schedule(vec![
        Duration::from_millis(20),
        Duration::from_millis(20),
        Duration::from_millis(20),
        wait,
        wait,
    ]);
    let t4;
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        let (sub, seen) = flaky_group(&bus, "g", policy.clone(), |_, attempt| {
            Some(HandlerError::retry(format!("down (attempt {attempt})")))
        })
        .await;
        bus.publish(&Num { n: 42 }).await.unwrap();
        wait_until(
            "attempt 4 failed and 5 is scheduled",
            Duration::from_secs(10),
            || {
                let (sub, seen) = (&sub, seen.clone());
                async move {
                    let at4 = seen.lock().unwrap().iter().any(|s| s.1 == 4);
                    at4 && sub.stats().await.scheduled_retries == 1
                        && sub.stats().await.in_flight == 0
                }
            },
        )
        .await;
        t4 = seen.lock().unwrap().iter().find(|s| s.1 == 4).unwrap().2;
        // The original is acked: the retry lives in the delay index, not in the window.
        assert_eq!(lag(&bus, "g", Num::TOPIC).await, 0);
        sub.drain().await.unwrap();
        bus.shutdown().await.unwrap();
    }
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let (sub, seen) = flaky_group(&bus, "g", policy, |_, _| None).await;
    wait_until(
        "the retry is delivered after the restart",
        Duration::from_secs(10),
        || {
            let seen = seen.clone();
            async move { !seen.lock().unwrap().is_empty() }
        },
    )
    .await;
    caught_up(&bus, "g", Num::TOPIC).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (n, attempt, at) = seen[0];
    assert_eq!((n, attempt), (42, 5), "attempt 5, not from scratch");
    assert!(
        at >= t4 + wait,
        "delivered {:?} after attempt 4, before its due time",
        at.duration_since(t4).unwrap_or_default()
    );
    assert!(
        at < t4 + wait + Duration::from_secs(3),
        "delivered late: {:?}",
        at.duration_since(t4).unwrap_or_default()
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
