//! Flow control: rate limits (on the test kit's virtual clock), in-flight
//! bounds, producer backpressure, and memory that does not grow with the
//! backlog.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use support::*;
use weirmq::prelude::*;
use weirmq::testing::TestBus;
use weirmq::{Clock, Error};

/// Records when each delivery was handled, by the bus's clock.
struct Stamper(Arc<Mutex<Vec<SystemTime>>>, Clock);

impl Actor for Stamper {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Stamper {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, _: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.0.lock().unwrap().push(self.1.now());
        Ok(())
    }
}

#[actix::test]
async fn a_rate_limited_group_never_exceeds_its_rate_in_any_one_second_window() {
    let bus = TestBus::start().await.unwrap();
    const RATE: u32 = 300;
    const N: u64 = 1000;
    let events: Vec<Num> = (0..N).map(|n| Num { n }).collect();
    bus.publish_batch(&events).await.unwrap();
    let stamps = Arc::new(Mutex::new(Vec::new()));
    let (s, clock) = (stamps.clone(), bus.clock().clock().clone());
    let sub = bus
        .subscribe::<Num>("limited")
        .start_from(StartFrom::Earliest)
        .rate_limit(RATE)
        .members(4, move || Stamper(s.clone(), clock.clone()))
        .start()
        .await
        .unwrap();
    // 1000 at 300/s: not all by 3 s, all by 3.4 s (virtual).
    bus.advance(Duration::from_secs(3)).await.unwrap();
    assert!(stamps.lock().unwrap().len() < N as usize);
    bus.advance(Duration::from_millis(400)).await.unwrap();
    let mut t = stamps.lock().unwrap().clone();
    assert_eq!(t.len(), N as usize);
    t.sort();
    // Count deliveries in every window [t_i, t_i + 1 s).
    let mut worst = 0;
    let mut j = 0;
    for i in 0..t.len() {
        while j < t.len() && t[j] < t[i] + Duration::from_secs(1) {
            j += 1;
        }
        worst = worst.max(j - i);
    }
    assert!(
        worst as f64 <= RATE as f64 * 1.1,
        "{worst} deliveries in one second, limit {RATE}"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Counts handler calls in progress (async handlers that take a while).
struct Concurrent {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    done: Log,
}

impl Actor for Concurrent {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Concurrent {
    type Result = ResponseFuture<Result<(), HandlerError>>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let (now, max, done) = (self.now.clone(), self.max.clone(), self.done.clone());
        let in_progress = now.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(in_progress, Ordering::SeqCst);
        Box::pin(async move {
            // Simulated work, so calls overlap.
            actix::clock::sleep(Duration::from_millis(2)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            done.0.lock().unwrap().push((0, d.event().n, d.attempt()));
            Ok(())
        })
    }
}

#[actix::test]
async fn max_in_flight_is_never_exceeded() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let events: Vec<Num> = (0..2000).map(|n| Num { n }).collect();
    bus.publish_batch(&events).await.unwrap();
    for (members, per_member, window) in [(4, 8, 10), (3, 4, 1000)] {
        let now = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let done = Log::default();
        let (n, m, d) = (now.clone(), max.clone(), done.clone());
        let group = format!("g{window}");
        let sub = bus
            .subscribe::<Num>(group.clone())
            .start_from(StartFrom::Earliest)
            .max_in_flight(window)
            .max_in_flight_per_member(per_member)
            .members(members, move || Concurrent {
                now: n.clone(),
                max: m.clone(),
                done: d.clone(),
            })
            .start()
            .await
            .unwrap();
        caught_up(&bus, &group, Num::TOPIC).await;
        assert_eq!(done.len(), 2000);
        let bound = window.min(members * per_member);
        let seen = max.load(Ordering::SeqCst);
        assert!(
            seen <= bound,
            "{seen} concurrent handler calls, bound {bound}"
        );
        assert!(
            seen > 1,
            "handlers never overlapped: the test proves nothing"
        );
        sub.drain().await.unwrap();
    }
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn try_publish_returns_busy_with_the_event_when_the_pipeline_is_full() {
    let bus = Bus::builder()
        .in_memory()
        .max_pending_messages(1)
        .open()
        .await
        .unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC))
        .await
        .unwrap();
    // A publish holds the only place in the pipeline until it is polled again.
    let mut first = Box::pin(bus.publish(&Num { n: 1 }));
    assert!((&mut first).now_or_never().is_none());
    let busy = bus.try_publish(Num { n: 2 }).await.unwrap_err();
    assert!(busy.is_busy(), "{}", busy.error);
    assert!(matches!(busy.error, Error::Busy { pending: 1 }));
    assert_eq!(busy.event, Num { n: 2 }, "the event is handed back");
    first.await.unwrap();
    // Once there is room, it goes through; nothing was stored for the busy one.
    let r = bus.try_publish(busy.event).await.unwrap();
    assert_eq!(
        r.offset, 0,
        "queue {} holds only the first publish",
        r.queue
    );
    let stored: u64 = bus
        .positions("probe", Num::TOPIC)
        .await
        .unwrap()
        .iter()
        .map(|p| p.max)
        .sum();
    assert_eq!(stored, 2);
    bus.shutdown().await.unwrap();
}

fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[actix::test]
async fn memory_stays_bounded_while_500k_messages_back_up() {
    let dir = temp_dir();
    let bus = Bus::builder()
        .data_dir(dir.path())
        .durability(Durability::Buffered)
        .open()
        .await
        .unwrap();
    let log = Log::default();
    // A consumer far slower than the producer: the backlog builds up on disk.
    let sub = bus
        .subscribe::<Num>("slow")
        .rate_limit(1000)
        .max_in_flight(256)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let before = rss_mib().expect("/proc/self/status");
    let mut peak: f64 = before;
    const N: u64 = 500_000;
    let chunk: Vec<u64> = (0..1000).collect();
    for c in 0..N / 1000 {
        let events: Vec<Num> = chunk.iter().map(|i| Num { n: c * 1000 + i }).collect();
        bus.publish_batch(&events).await.unwrap();
        if c % 50 == 0 {
            peak = peak.max(rss_mib().unwrap());
        }
    }
    peak = peak.max(rss_mib().unwrap());
    let backlog: u64 = lag(&bus, "slow", Num::TOPIC).await;
    eprintln!("RSS before {before:.0} MiB, peak {peak:.0} MiB, backlog {backlog}");
    assert!(backlog > N / 2, "the backlog did build up ({backlog})");
    // Generous: the messages alone are ~30 MiB encoded and all of them must
    // not be held; the group holds at most 256 in memory (seen here: +32 MiB).
    assert!(
        peak - before < 200.0,
        "RSS grew by {:.0} MiB with a backlog of {backlog}",
        peak - before
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
