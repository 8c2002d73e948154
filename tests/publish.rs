//! Publishing: receipts, dense offsets, concurrent publishers on several
//! threads sharing group commits, and cancellation safety.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use support::*;
use weirmq::prelude::*;

#[actix::test]
async fn publishers_on_several_arbiters_get_dense_offsets_and_every_message_is_stored() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let arbiters: Vec<actix::Arbiter> = (0..3).map(|_| actix::Arbiter::new()).collect();
    let mut results = Vec::new();
    for (a, arbiter) in arbiters.iter().enumerate() {
        for p in 0..8u64 {
            let bus = bus.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            arbiter.spawn(async move {
                let mut receipts = Vec::new();
                for i in 0..200u64 {
                    let n = (a as u64 * 8 + p) * 1000 + i;
                    receipts.push((n, bus.publish(&Num { n }).await.unwrap()));
                }
                let _ = tx.send(receipts);
            });
            results.push(rx);
        }
    }
    let mut all = Vec::new();
    for rx in results {
        all.extend(rx.await.unwrap());
    }
    assert_eq!(all.len(), 3 * 8 * 200);
    let mut by_queue: HashMap<u32, Vec<u64>> = HashMap::new();
    for (_, r) in &all {
        by_queue.entry(r.queue).or_default().push(r.offset);
    }
    for (q, mut offsets) in by_queue {
        offsets.sort_unstable();
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as u64),
            "queue {q}: offsets not dense"
        );
    }
    for (n, r) in all.iter().step_by(97) {
        let m = bus
            .read_queue(Num::TOPIC, r.queue, r.offset, 1)
            .await
            .unwrap();
        assert_eq!(m[0].id(), r.message_id);
        assert_eq!(serde_json::from_slice::<Num>(m[0].body()).unwrap().n, *n);
    }
    for a in arbiters {
        a.stop();
    }
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_publish_dropped_mid_way_does_not_strand_other_publishes() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC))
        .await
        .unwrap();
    // Poll a publish once (it parks its message for the shared send) and drop it.
    assert!(bus.publish(&Num { n: 1 }).now_or_never().is_none());
    let r = tokio::time::timeout(Duration::from_secs(10), bus.publish(&Num { n: 2 }))
        .await
        .expect("a later publish is not stuck")
        .unwrap();
    // The dropped publish may still have been stored (at-least-once): its
    // message went out with the shared send.
    assert!(r.offset <= 1);
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn batches_keep_their_order_in_receipts_and_empty_batches_are_fine() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    assert!(bus.publish_batch::<Num>(&[]).await.unwrap().is_empty());
    let events: Vec<Num> = (0..10).map(|n| Num { n }).collect();
    let receipts = bus.publish_batch(&events).await.unwrap();
    assert_eq!(receipts.len(), 10);
    for (e, r) in events.iter().zip(&receipts) {
        let m = bus
            .read_queue(Num::TOPIC, r.queue, r.offset, 1)
            .await
            .unwrap();
        assert_eq!(serde_json::from_slice::<Num>(m[0].body()).unwrap(), *e);
    }
    bus.shutdown().await.unwrap();
}

#[test]
fn bus_and_subscription_handles_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_send_sync::<Bus>();
    assert_send::<Subscription>();
    assert_send::<weirmq::Error>();
}

#[actix::test]
async fn positions_of_a_running_group_count_every_acknowledged_publish() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .max_in_flight(1)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let mut total = 0;
    for round in 0..50u64 {
        let events: Vec<Num> = (0..100).map(|i| Num { n: round * 100 + i }).collect();
        total += bus.publish_batch(&events).await.unwrap().len() as u64;
        // No waiting: a receipt means the message is counted at once.
        let max: u64 = bus
            .positions("g", Num::TOPIC)
            .await
            .unwrap()
            .iter()
            .map(|p| p.max)
            .sum();
        assert_eq!(max, total, "round {round}");
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
