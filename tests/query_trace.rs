//! Query by message id and by key, and message trace.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use weirmq::prelude::*;
use weirmq::{MessageId, Resend, ResendOutcome, TraceKind};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct Other {
    n: u64,
}

impl Event for Other {
    const TOPIC: &'static str = "others";
}

#[actix::test]
async fn messages_are_found_by_id_and_by_key_across_topics_and_a_reopen() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    // Concurrent publishes: records of many messages each.
    let receipts = futures::future::join_all((0..3000u64).map(|n| {
        let bus = bus.clone();
        async move {
            bus.publish_with(&Num { n }, Publish::new().key(format!("order-{}", n % 100)))
                .await
                .unwrap()
        }
    }))
    .await;
    for n in 0..10 {
        bus.publish_with(&Other { n }, Publish::new().key("order-7"))
            .await
            .unwrap();
    }
    check_queries(&bus, &receipts).await;
    bus.shutdown().await.unwrap();
    drop(bus);
    // The index is on disk: the same answers after a reopen.
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    check_queries(&bus, &receipts).await;
    bus.shutdown().await.unwrap();
}

async fn check_queries(bus: &Bus, receipts: &[weirmq::SendReceipt]) {
    for (n, r) in receipts.iter().enumerate().step_by(61) {
        let m = bus.query_id(r.message_id).await.unwrap().expect("stored");
        assert_eq!(
            (m.topic(), m.queue(), m.offset()),
            (Num::TOPIC, r.queue, r.offset)
        );
        assert_eq!(Num::decode(m.body()).unwrap(), Num { n: n as u64 });
    }
    assert!(bus
        .query_id(MessageId::from_u128(0xdead_beef))
        .await
        .unwrap()
        .is_none());
    let found = bus.query_key(Num::TOPIC, "order-7", 100).await.unwrap();
    assert!(found.windows(2).all(|w| w[0].born_at() <= w[1].born_at()));
    let mut ns: Vec<u64> = found
        .iter()
        .map(|m| Num::decode(m.body()).unwrap().n)
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..30).map(|i| i * 100 + 7).collect::<Vec<_>>());
    assert_eq!(
        bus.query_key(Num::TOPIC, "order-7", 5).await.unwrap().len(),
        5
    );
    assert_eq!(
        bus.query_key(Other::TOPIC, "order-7", 100)
            .await
            .unwrap()
            .len(),
        10
    );
    assert!(bus
        .query_key(Num::TOPIC, "order-100", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(bus.query_key("no-such-topic", "order-7", 10).await.is_err());
}

/// Waits until the trace of `id` holds `n` events; returns it.
async fn trace_of(bus: &Bus, id: MessageId, n: usize) -> weirmq::MessageTrace {
    wait_until(
        &format!("the trace of {id} has {n} events"),
        Duration::from_secs(20),
        || async move {
            bus.trace(id)
                .await
                .unwrap()
                .is_some_and(|t| t.events.len() >= n)
        },
    )
    .await;
    bus.trace(id).await.unwrap().unwrap()
}

#[actix::test]
async fn the_trace_shows_retries_acks_dead_letters_and_resends() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC).trace(true))
        .await
        .unwrap();
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 3))
        .members(
            2,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| match d.event().n {
                    7 if d.attempt() <= 2 => Err(HandlerError::retry("boom")),
                    99 if !h.load(Ordering::SeqCst) => Err(HandlerError::retry("poison")),
                    _ => Ok(()),
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in [1, 7, 99] {
        ids.push(bus.publish(&Num { n }).await.unwrap().message_id);
    }
    caught_up(&bus, "g", Num::TOPIC).await;

    let plain = trace_of(&bus, ids[0], 3).await;
    assert!(plain.traced);
    assert_eq!(
        plain.kinds(),
        [TraceKind::Published, TraceKind::Delivered, TraceKind::Acked]
    );

    let retried = trace_of(&bus, ids[1], 7).await;
    use TraceKind::*;
    assert_eq!(
        retried.kinds(),
        [Published, Delivered, Retried, Delivered, Retried, Delivered, Acked]
    );
    let attempts: Vec<u32> = retried.events.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [0, 1, 1, 2, 2, 3, 3]);
    assert!(retried.events[1..]
        .iter()
        .all(|e| e.group.as_deref() == Some("g")));
    assert!(retried.events[2]
        .detail
        .as_deref()
        .unwrap()
        .contains("boom"));
    assert!(retried.events.windows(2).all(|w| w[0].at <= w[1].at));

    // Dead-lettered after three attempts, then resent and acked.
    let dead = trace_of(&bus, ids[2], 7).await;
    assert_eq!(
        dead.kinds(),
        [
            Published,
            Delivered,
            Retried,
            Delivered,
            Retried,
            Delivered,
            DeadLettered
        ]
    );
    assert!(dead.events[6].detail.as_deref().unwrap().contains("poison"));
    healed.store(true, Ordering::SeqCst);
    let reports = bus.resend_dead_letters("g", Resend::All).await.unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].outcome, ResendOutcome::Resent);
    let resent = trace_of(&bus, ids[2], 10).await;
    assert_eq!(
        resent.kinds()[6..],
        [DeadLettered, Resent, Delivered, Acked]
    );
    assert_eq!(resent.events[8].attempt, 1);

    // A topic without trace: the message is found, the trace is empty.
    let other = bus.publish(&Other { n: 1 }).await.unwrap();
    let t = bus.trace(other.message_id).await.unwrap().unwrap();
    assert!(!t.traced && t.events.is_empty());
    assert_eq!((t.topic.as_str(), t.offset), (Other::TOPIC, other.offset));
    assert!(bus.trace(MessageId::from_u128(1)).await.unwrap().is_none());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
