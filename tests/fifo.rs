//! Ordered (FIFO) messages: per message group, in publish order, one at a
//! time, retried in place; groups in parallel; a poison message goes to the
//! DLQ and its group continues; order survives panics and restarts.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use weirmq::prelude::*;
use weirmq::Ordering;

const PER_GROUP: u64 = 1000;

/// Publishes `rounds` messages to each of `groups` message groups,
/// interleaved: round i publishes message i of every group concurrently,
/// after round i-1 is stored. Message n = group * 1000 + i.
async fn publish_interleaved(bus: &Bus, groups: u64, rounds: u64) {
    for i in 0..rounds {
        futures::future::join_all((0..groups).map(|g| {
            let bus = bus.clone();
            async move {
                bus.publish_with(
                    &Num {
                        n: g * PER_GROUP + i,
                    },
                    Publish::new().message_group(format!("order-{g}")),
                )
                .await
                .unwrap()
            }
        }))
        .await;
    }
}

/// For each group, the message indexes in the order they were acked
/// (handled without error).
fn acked_order(log: &Log, failed: &dyn Fn(u64, u32) -> bool) -> HashMap<u64, Vec<u64>> {
    let mut by_group: HashMap<u64, Vec<u64>> = HashMap::new();
    for (_, n, attempt) in log.entries() {
        if !failed(n, attempt) {
            by_group
                .entry(n / PER_GROUP)
                .or_default()
                .push(n % PER_GROUP);
        }
    }
    by_group
}

/// A deterministic ~15% of (message, attempt) pairs fail; never the 4th try.
fn flaky(n: u64, attempt: u32) -> bool {
    attempt < 4 && (n.wrapping_mul(2_654_435_761) ^ (attempt as u64 * 40_503)) % 100 < 15
}

#[actix::test]
async fn each_group_is_acked_in_publish_order_despite_failures_and_panics() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("fulfilment")
        .ordering(Ordering::Fifo)
        .retry(RetryPolicy::fixed(Duration::from_millis(5), 10))
        .members(
            4,
            recorders(
                &log,
                Arc::new(|d: &Delivery<Num>| {
                    let n = d.event().n;
                    if n % 997 == 3 && d.attempt() == 1 {
                        panic!("handler bug on {n} (expected by the test)");
                    }
                    if flaky(n, d.attempt()) {
                        Err(HandlerError::retry("transient"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    publish_interleaved(&bus, 200, 50).await;
    caught_up(&bus, "fulfilment", Num::TOPIC).await;
    let order = acked_order(&log, &|n, attempt| {
        flaky(n, attempt) || (n % 997 == 3 && attempt == 1)
    });
    assert_eq!(order.len(), 200);
    for (g, seq) in &order {
        assert_eq!(*seq, (0..50).collect::<Vec<_>>(), "group {g}");
    }
    let stats = bus.group_stats("fulfilment", Num::TOPIC).await;
    assert!(stats.retried > 500, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_slow_group_does_not_hold_back_the_others() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    // Group 0's first message keeps failing (a slow downstream) until the
    // test has seen every other group finish.
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = released.clone();
    let sub = bus
        .subscribe::<Num>("fulfilment")
        .ordering(Ordering::Fifo)
        .retry(RetryPolicy::fixed(Duration::from_millis(50), 10_000))
        .members(
            2,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    if d.event().n == 0 && !r.load(AtomicOrdering::SeqCst) {
                        Err(HandlerError::retry("slow downstream"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    let stuck = |log: &Log| {
        let released = released.clone();
        acked_order(log, &move |n, _| {
            n == 0 && !released.load(AtomicOrdering::SeqCst)
        })
    };
    publish_interleaved(&bus, 50, 20).await;
    wait_until("the other groups are done", Duration::from_secs(60), || {
        let order = stuck(&log);
        async move { (1..50).all(|g| order.get(&g).is_some_and(|s| s.len() == 20)) }
    })
    .await;
    // Group 0 is still on its first message: nothing of it was handled.
    let attempts_on_first = log.entries().iter().filter(|e| e.1 == 0).count();
    assert!(attempts_on_first >= 1);
    assert!(
        log.entries()
            .iter()
            .all(|e| e.1 / PER_GROUP != 0 || e.1 == 0),
        "group 0 moved on before its first message succeeded"
    );
    released.store(true, AtomicOrdering::SeqCst);
    caught_up(&bus, "fulfilment", Num::TOPIC).await;
    let last_failure = log.entries().iter().rposition(|e| e.1 == 0).unwrap();
    let group0: Vec<u64> = log.entries()[last_failure..]
        .iter()
        .filter(|e| e.1 / PER_GROUP == 0)
        .map(|e| e.1 % PER_GROUP)
        .collect();
    assert_eq!(group0, (0..20).collect::<Vec<_>>());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_poison_message_is_dead_lettered_and_its_group_continues() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let poison = 3 * PER_GROUP + 4;
    let sub = bus
        .subscribe::<Num>("fulfilment")
        .ordering(Ordering::Fifo)
        .retry(RetryPolicy::fixed(Duration::from_millis(5), 3))
        .members(
            2,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    if d.event().n == poison {
                        Err(HandlerError::retry("cannot parse the address"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    publish_interleaved(&bus, 5, 10).await;
    caught_up(&bus, "fulfilment", Num::TOPIC).await;
    let order = acked_order(&log, &|n, _| n == poison);
    assert_eq!(order[&3], [0, 1, 2, 3, 5, 6, 7, 8, 9]);
    let attempts: Vec<u32> = log
        .entries()
        .iter()
        .filter(|e| e.1 == poison)
        .map(|e| e.2)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    // Its successor was handled only after it was dead-lettered.
    let pos = |n: u64| log.entries().iter().rposition(|e| e.1 == n).unwrap();
    assert!(pos(poison) < pos(poison + 1));
    assert_eq!(bus.dead_letter_count("fulfilment").await.unwrap(), 1);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn order_survives_a_restart_mid_way() {
    let dir = temp_dir();
    let log = Log::default();
    // Every success of both runs, in order.
    let acked = Arc::new(Mutex::new(Vec::new()));
    // The first run succeeds exactly 150 times, then every delivery fails
    // and waits in place (as if the downstream went away mid-way).
    let limit = Arc::new(AtomicUsize::new(150));
    let behaviour = |limit: Arc<AtomicUsize>, acked: Arc<Mutex<Vec<u64>>>| -> Behaviour {
        Arc::new(move |d: &Delivery<Num>| {
            let mut acked = acked.lock().unwrap();
            if acked.len() >= limit.load(AtomicOrdering::SeqCst) {
                Err(HandlerError::retry("downstream gone"))
            } else {
                acked.push(d.event().n);
                Ok(())
            }
        })
    };
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        let sub = bus
            .subscribe::<Num>("fulfilment")
            .ordering(Ordering::Fifo)
            .retry(RetryPolicy::fixed(Duration::from_millis(20), 1000))
            .members(2, recorders(&log, behaviour(limit.clone(), acked.clone())))
            .start()
            .await
            .unwrap();
        publish_interleaved(&bus, 20, 20).await;
        wait_until("150 handled", Duration::from_secs(30), || {
            let n = acked.lock().unwrap().len();
            async move { n >= 150 }
        })
        .await;
        sub.drain().await.unwrap();
        bus.shutdown().await.unwrap();
    }
    assert_eq!(acked.lock().unwrap().len(), 150);
    limit.store(usize::MAX, AtomicOrdering::SeqCst);
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let sub = bus
        .subscribe::<Num>("fulfilment")
        .ordering(Ordering::Fifo)
        .members(2, recorders(&log, behaviour(limit.clone(), acked.clone())))
        .start()
        .await
        .unwrap();
    caught_up(&bus, "fulfilment", Num::TOPIC).await;
    let mut by_group: HashMap<u64, Vec<u64>> = HashMap::new();
    for n in acked.lock().unwrap().iter() {
        by_group
            .entry(n / PER_GROUP)
            .or_default()
            .push(n % PER_GROUP);
    }
    for g in 0..20 {
        assert_eq!(by_group[&g], (0..20).collect::<Vec<_>>(), "group {g}");
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
