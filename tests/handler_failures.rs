//! Handler failures never lose a message and never take the bus down:
//! errors are retried, panics restart the member, undecodable bodies are
//! dead-lettered (never acked silently).

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use weirmq::prelude::*;
use weirmq::OutgoingMessage;

async fn bus() -> Bus {
    init_tracing();
    Bus::builder().in_memory().open().await.unwrap()
}

#[actix::test]
async fn a_handler_that_fails_once_sees_the_message_again() {
    let bus = bus().await;
    let log = Log::default();
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let behaviour: Behaviour = Arc::new(move |d| {
        if d.event().n == 3 && !f.swap(true, Ordering::SeqCst) {
            Err(HandlerError::retry("transient"))
        } else {
            Ok(())
        }
    });
    let sub = bus
        .subscribe::<Num>("g")
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 10))
        .members(2, recorders(&log, behaviour))
        .start()
        .await
        .unwrap();
    for n in 0..10 {
        bus.publish(&Num { n }).await.unwrap();
    }
    caught_up(&bus, "g", Num::TOPIC).await;
    let threes: Vec<u32> = log
        .entries()
        .iter()
        .filter(|e| e.1 == 3)
        .map(|e| e.2)
        .collect();
    assert_eq!(threes, vec![1, 2], "attempt 1 failed, attempt 2 acked");
    assert_eq!(log.len(), 11);
    let stats = sub.stats().await;
    assert_eq!((stats.acked, stats.retried), (10, 1));
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Panics on its first delivery of n == 7 (in `handle`, killing the actor).
struct Panicky {
    log: Log,
    armed: Arc<AtomicBool>,
}

impl Actor for Panicky {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Panicky {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        if d.event().n == 7 && self.armed.swap(false, Ordering::SeqCst) {
            panic!("handler bug on message 7 (expected by the test)");
        }
        self.log
            .0
            .lock()
            .unwrap()
            .push((0, d.event().n, d.attempt()));
        Ok(())
    }
}

#[actix::test]
async fn a_panicking_handler_is_restarted_and_the_bus_keeps_delivering() {
    let bus = bus().await;
    let log = Log::default();
    let armed = Arc::new(AtomicBool::new(true));
    let (l, a) = (log.clone(), armed.clone());
    let sub = bus
        .subscribe::<Num>("g")
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 10))
        .members(1, move || Panicky {
            log: l.clone(),
            armed: a.clone(),
        })
        .start()
        .await
        .unwrap();
    for n in 0..20 {
        bus.publish(&Num { n }).await.unwrap();
    }
    caught_up(&bus, "g", Num::TOPIC).await;
    assert!(!armed.load(Ordering::SeqCst), "the handler never panicked");
    let seen: HashSet<u64> = log.entries().iter().map(|e| e.1).collect();
    assert_eq!(seen, (0..20).collect::<HashSet<u64>>());
    let seven = log.entries().into_iter().find(|e| e.1 == 7).unwrap();
    assert!(seven.2 >= 2, "7 was handled on a later attempt: {seven:?}");
    // The bus still works after the panic.
    bus.publish(&Num { n: 20 }).await.unwrap();
    delivered(&log, 21).await;
    assert!(sub.is_running());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn an_undecodable_body_is_dead_lettered_and_the_group_keeps_going() {
    let bus = bus().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    bus.publish(&Num { n: 1 }).await.unwrap();
    let bad = bus
        .publish_raw(
            OutgoingMessage::new(Num::TOPIC, b"{not json".to_vec()).key("bad-one"),
            Durability::Flushed,
        )
        .await
        .unwrap();
    bus.publish(&Num { n: 2 }).await.unwrap();
    caught_up(&bus, "g", Num::TOPIC).await;
    assert_eq!(
        log.entries().iter().map(|e| e.1).collect::<HashSet<_>>(),
        HashSet::from([1, 2])
    );
    let dead = bus.dead_letters("g", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.message.body(), b"{not json");
    assert_eq!(d.message.keys(), ["bad-one".to_string()]);
    assert_eq!(d.original_id(), Some(bad.message_id));
    assert_eq!(
        (d.origin_queue(), d.origin_offset()),
        (Some(bad.queue), Some(bad.offset))
    );
    assert!(!d.resent);
    let p = d.message.properties();
    assert_eq!(p["DLQ_ORIGIN_TOPIC"], Num::TOPIC);
    assert_eq!(p["DLQ_ORIGIN_MSG_ID"], bad.message_id.to_string());
    assert_eq!(p["DLQ_ORIGIN_OFFSET"], bad.offset.to_string());
    assert!(p["DLQ_REASON"].starts_with("decode: json codec"), "{p:?}");
    assert_eq!(sub.stats().await.dead_lettered, 1);
    // Other groups are not affected.
    assert!(bus.dead_letters("other", 0, 10).await.unwrap().is_empty());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_handler_can_dead_letter_at_once() {
    let bus = bus().await;
    let log = Log::default();
    let behaviour: Behaviour = Arc::new(|d| {
        if d.event().n == 0 {
            Err(HandlerError::dead_letter("n must be positive"))
        } else {
            Ok(())
        }
    });
    let sub = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, behaviour))
        .start()
        .await
        .unwrap();
    bus.publish(&Num { n: 0 }).await.unwrap();
    bus.publish(&Num { n: 1 }).await.unwrap();
    caught_up(&bus, "g", Num::TOPIC).await;
    let dead = bus.dead_letters("g", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].message.properties()["DLQ_REASON"],
        "n must be positive"
    );
    assert_eq!(dead[0].message.properties()["DLQ_ATTEMPTS"], "1");
    assert_eq!(log.len(), 2, "dead-lettered without a retry");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Holds each delivery until released, to test drain.
struct Slow {
    log: Log,
    release: Arc<tokio::sync::Notify>,
}

impl Actor for Slow {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Slow {
    type Result = ResponseFuture<Result<(), HandlerError>>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let log = self.log.clone();
        let release = self.release.clone();
        Box::pin(async move {
            log.0.lock().unwrap().push((0, d.event().n, d.attempt()));
            if d.event().n == 0 {
                release.notified().await;
            }
            Ok(())
        })
    }
}

#[actix::test]
async fn drain_finishes_deliveries_in_hand_before_it_returns() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let log = Log::default();
    let release = Arc::new(tokio::sync::Notify::new());
    let (l, r) = (log.clone(), release.clone());
    let sub = bus
        .subscribe::<Num>("g")
        .max_in_flight_per_member(1)
        .members(1, move || Slow {
            log: l.clone(),
            release: r.clone(),
        })
        .start()
        .await
        .unwrap();
    for n in 0..5 {
        bus.publish(&Num { n }).await.unwrap();
    }
    delivered(&log, 1).await;
    let drain = actix::spawn(sub.drain());
    // Everything here runs on the test's one thread: a few yields let the
    // drain request reach the supervisor before the handler may finish.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    release.notify_one();
    drain.await.unwrap().unwrap();
    assert_eq!(log.len(), 1, "drain handed out no new deliveries");
    let positions = bus.positions("g", Num::TOPIC).await.unwrap();
    let committed: u64 = positions.iter().map(|p| p.committed).sum();
    assert_eq!(
        committed, 1,
        "the delivery in hand was acked: {positions:?}"
    );
    bus.shutdown().await.unwrap();
}

/// How [`Bomb`] panics on message 3.
#[derive(Clone, Copy, Debug)]
enum PanicIn {
    /// In `handle`, with the delivery in hand: the actor dies.
    Handle,
    /// In `handle`, after taking the event out (`into_event`): the actor
    /// dies, and the delivery was dropped before the panic.
    HandleAfterIntoEvent,
    /// In the future `handle` returned: the actor lives, the reply is lost.
    Future,
}

/// Logs every delivery it starts; always panics on message 3.
struct Bomb {
    log: Log,
    how: PanicIn,
}

impl Actor for Bomb {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Bomb {
    type Result = ResponseFuture<Result<(), HandlerError>>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.log
            .0
            .lock()
            .unwrap()
            .push((0, d.event().n, d.attempt()));
        match self.how {
            PanicIn::Handle if d.event().n == 3 => panic!("bomb on 3 (expected by the test)"),
            PanicIn::HandleAfterIntoEvent => {
                let n = d.into_event().n;
                if n == 3 {
                    panic!("bomb on 3 after into_event (expected by the test)");
                }
                Box::pin(async { Ok(()) })
            }
            PanicIn::Future => Box::pin(async move {
                if d.event().n == 3 {
                    panic!("bomb on 3 in the future (expected by the test)");
                }
                Ok(())
            }),
            PanicIn::Handle => Box::pin(async { Ok(()) }),
        }
    }
}

/// Regression (issue 13, defect 1): when a member panicked, every delivery
/// queued in its mailbox failed with it — with one member and a backlog,
/// ~7 innocent messages were dead-lettered after 3 "attempts" their handler
/// never ran. Now only the delivery that panicked counts an attempt; the
/// others go to a live member with their attempt unchanged, at once.
#[actix::test]
async fn a_panicking_handler_costs_only_its_own_message_an_attempt() {
    for how in [
        PanicIn::Handle,
        PanicIn::HandleAfterIntoEvent,
        PanicIn::Future,
    ] {
        for members in [1, 4] {
            let bus = bus().await;
            // One queue (so the first batch is 0, 1, 2, ... in that order)
            // and a backlog, so message 3's member has later ones queued in
            // its mailbox when it panics.
            bus.create_topic(TopicConfig::new(Num::TOPIC).queues(1))
                .await
                .unwrap();
            for n in 0..40 {
                bus.publish(&Num { n }).await.unwrap();
            }
            let log = Log::default();
            let l = log.clone();
            let sub = bus
                .subscribe::<Num>("g")
                .start_from(StartFrom::Earliest)
                .retry(RetryPolicy::fixed(Duration::from_millis(10), 3))
                .members(members, move || Bomb {
                    log: l.clone(),
                    how,
                })
                .start()
                .await
                .unwrap();
            caught_up(&bus, "g", Num::TOPIC).await;
            let case = format!("{how:?} with {members} member(s)");
            let dead = bus.dead_letters("g", 0, 100).await.unwrap();
            let dead_ns: Vec<u64> = dead
                .iter()
                .map(|d| serde_json::from_slice::<Num>(d.message.body()).unwrap().n)
                .collect();
            assert_eq!(
                dead_ns,
                vec![3],
                "{case}: only the poison message is dead: {dead:?}"
            );
            assert_eq!(dead[0].attempts(), Some(3), "{case}");
            let entries = log.entries();
            let threes: Vec<u32> = entries.iter().filter(|e| e.1 == 3).map(|e| e.2).collect();
            assert_eq!(threes, vec![1, 2, 3], "{case}: 3 ran once per attempt");
            for n in (0..40).filter(|n| *n != 3) {
                let runs: Vec<u32> = entries.iter().filter(|e| e.1 == n).map(|e| e.2).collect();
                assert_eq!(runs, vec![1], "{case}: message {n} ran once, as attempt 1");
            }
            let stats = sub.stats().await;
            assert_eq!(
                (stats.acked, stats.retried, stats.dead_lettered),
                (39, 2, 1),
                "{case}"
            );
            sub.drain().await.unwrap();
            bus.shutdown().await.unwrap();
        }
    }
}
