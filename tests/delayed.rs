//! Delayed messages: stored at once, visible at their time, never before;
//! in due order; kept across a restart; a delay beyond the limit is a typed
//! error. Timing runs on the test kit's virtual clock (each message exactly
//! at its time); the restart test runs in real time on a data directory.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use support::*;
use weirmq::prelude::*;
use weirmq::testing::TestBus;
use weirmq::{Clock, Error, Limits, SCHEDULE_TOPIC};

/// One delivery: (n, received at, the message's due time).
type Arrival = (u64, SystemTime, Option<SystemTime>);

/// What a timing handler saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Arrival>>>);

/// Records each delivery with the bus's clock.
struct Timer(Seen, Clock);

impl Actor for Timer {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Timer {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let due = d.message().deliver_at();
        self.0
             .0
            .lock()
            .unwrap()
            .push((d.event().n, self.1.now(), due));
        Ok(())
    }
}

async fn seen_n(seen: &Seen, n: usize) {
    wait_until(&format!("{n} deliveries"), Duration::from_secs(30), || {
        let len = seen.0.lock().unwrap().len();
        async move { len >= n }
    })
    .await;
}

#[actix::test]
async fn delayed_messages_arrive_in_due_order_and_never_before_their_time() {
    let bus = TestBus::start().await.unwrap();
    let seen = Seen::default();
    let (s, clock) = (seen.clone(), bus.clock().clock().clone());
    let sub = bus
        .subscribe::<Num>("timing")
        .members(1, move || Timer(s.clone(), clock.clone()))
        .start()
        .await
        .unwrap();
    let start = bus.clock().now();
    // Published in the reverse of their due order.
    let mut wanted = Vec::new();
    for (n, delay) in [(3u64, 1000u64), (2, 200), (1, 0)] {
        let due = start + Duration::from_millis(delay);
        let r = bus
            .publish_with(&Num { n }, Publish::new().deliver_at(due))
            .await
            .unwrap();
        if delay > 0 {
            // Its time, rounded up to the millisecond.
            let at = r.deliver_at.unwrap();
            assert!(
                at >= due && at < due + Duration::from_millis(1),
                "{at:?} {due:?}"
            );
            // Stored in the schedule at once.
            let staged = bus
                .read_queue(SCHEDULE_TOPIC, 0, r.offset, 1)
                .await
                .unwrap();
            assert_eq!(staged[0].id(), r.message_id);
            assert_eq!(staged[0].destination(), Some(Num::TOPIC));
        } else {
            assert_eq!(r.deliver_at, None, "a delay already past is no delay");
        }
        wanted.push((n, due, r.message_id));
    }
    // One millisecond short of the last one's time: two arrived.
    bus.advance(Duration::from_millis(999)).await.unwrap();
    assert_eq!(seen.0.lock().unwrap().len(), 2);
    bus.advance(Duration::from_millis(1)).await.unwrap();
    let got = seen.0.lock().unwrap().clone();
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "due order"
    );
    for (n, at, _) in &got {
        let (_, due, id) = wanted.iter().find(|w| w.0 == *n).unwrap();
        assert_eq!(at, due, "message {n} exactly at its time");
        // The delivered message is the one published (same id).
        assert!(bus.query_id(*id).await.unwrap().is_some());
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn many_delayed_messages_all_arrive_each_at_its_time() {
    let bus = TestBus::start().await.unwrap();
    let seen = Seen::default();
    let (s, clock) = (seen.clone(), bus.clock().clock().clone());
    let sub = bus
        .subscribe::<Num>("timing")
        .members(4, move || Timer(s.clone(), clock.clone()))
        .start()
        .await
        .unwrap();
    let start = bus.clock().now();
    let dues: Vec<SystemTime> = (0..2000u64)
        .map(|n| start + Duration::from_millis((n * 7919) % 700))
        .collect();
    futures::future::join_all(dues.iter().enumerate().map(|(n, due)| {
        let bus = bus.bus().clone();
        let due = *due;
        async move {
            bus.publish_with(&Num { n: n as u64 }, Publish::new().deliver_at(due))
                .await
                .unwrap()
        }
    }))
    .await;
    bus.advance(Duration::from_secs(1)).await.unwrap();
    let got = seen.0.lock().unwrap().clone();
    let mut ns: Vec<u64> = got.iter().map(|g| g.0).collect();
    ns.sort_unstable();
    ns.dedup();
    assert_eq!(ns.len(), 2000);
    for (n, at, due) in &got {
        // Due now (offset 0 ms) is no delay: delivered at once.
        assert_eq!(*at, dues[*n as usize], "message {n} at its time");
        assert!(due.is_none() || due.unwrap() == *at);
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn delayed_messages_survive_a_restart_and_fire_after_it() {
    let dir = temp_dir();
    let due;
    let id;
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        // The group exists before the message becomes visible.
        bus.subscribe::<Num>("later")
            .members(1, recorders(&Log::default(), ack_all()))
            .start()
            .await
            .unwrap()
            .drain()
            .await
            .unwrap();
        due = SystemTime::now() + Duration::from_millis(800);
        id = bus
            .publish_with(&Num { n: 1 }, Publish::new().deliver_at(due))
            .await
            .unwrap()
            .message_id;
        // Also one that falls due while the bus is down.
        bus.publish_with(
            &Num { n: 2 },
            Publish::new().delay(Duration::from_millis(50)),
        )
        .await
        .unwrap();
        bus.shutdown().await.unwrap();
    }
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let sub = bus
        .subscribe::<Num>("later")
        .members(1, move || Timer(s.clone(), Clock::system()))
        .start()
        .await
        .unwrap();
    seen_n(&seen, 2).await;
    let got = seen.0.lock().unwrap().clone();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [2, 1]);
    assert!(got[1].1 >= due);
    let m = bus.query_id(id).await.unwrap().unwrap();
    assert_eq!(m.topic(), Num::TOPIC, "found in its topic first");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_delay_beyond_the_limit_is_a_typed_error_and_stores_nothing() {
    let bus = Bus::builder()
        .in_memory()
        .limits(Limits {
            max_delay: Duration::from_secs(3600),
            ..Limits::default()
        })
        .open()
        .await
        .unwrap();
    let e = bus
        .publish_with(
            &Num { n: 1 },
            Publish::new().delay(Duration::from_secs(7200)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::DelayTooLong { max, .. } if max == Duration::from_secs(3600)),
        "{e}"
    );
    assert!(e.to_string().contains("max_delay"), "{e}");
    assert!(bus
        .topics()
        .await
        .iter()
        .all(|t| t.name() != SCHEDULE_TOPIC));
    // Within the limit: fine.
    bus.publish_with(
        &Num { n: 1 },
        Publish::new().delay(Duration::from_secs(3000)),
    )
    .await
    .unwrap();
    bus.shutdown().await.unwrap();
}
