//! Retention: expired messages are removed (by age and by size), queries
//! stop finding them, groups behind them continue at the first kept
//! message with the loss counted, messages with scheduled retries are kept,
//! offsets never go back after a reopen, and the disk space is reused.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use support::*;
use weirmq::prelude::*;
use weirmq::{ResetTo, Retention, SendReceipt};

/// Publishes `range` to `Num`'s topic, each with key `k<n>`.
async fn publish_keyed(bus: &Bus, range: std::ops::Range<u64>) -> Vec<SendReceipt> {
    let mut out = Vec::new();
    for n in range {
        out.push(
            bus.publish_with(&Num { n }, Publish::new().key(format!("k{n}")))
                .await
                .unwrap(),
        );
    }
    out
}

/// Waits until the wall clock is `d` past `t`.
async fn clock_past(t: SystemTime, d: Duration) {
    wait_until(
        "the clock moved on",
        Duration::from_secs(10),
        || async move { SystemTime::now() > t + d },
    )
    .await;
}

/// A retention whose cutoff (now − age) falls at `t`.
fn age_cutting_at(t: SystemTime) -> Retention {
    Retention::forever().max_age(SystemTime::now().duration_since(t).unwrap())
}

#[actix::test]
async fn age_retention_removes_old_messages_and_a_group_behind_continues_at_the_first_kept() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let old = publish_keyed(&bus, 0..200).await;
    // A group that consumed nothing yet: its position is stored at 0.
    bus.reset_offsets("laggard", Num::TOPIC, ResetTo::Earliest)
        .await
        .unwrap();
    let last_old = SystemTime::now();
    clock_past(last_old, Duration::from_millis(250)).await;
    let cut = SystemTime::now();
    clock_past(cut, Duration::from_millis(250)).await;
    let new = publish_keyed(&bus, 200..300).await;

    bus.create_topic(TopicConfig::new(Num::TOPIC).retention(age_cutting_at(cut)))
        .await
        .unwrap();
    let report = bus.enforce_retention().await.unwrap();
    assert_eq!(report.messages, 200, "{report:?}");
    assert_eq!(report.queues, 4, "{report:?}");
    assert!(report.bytes > 200 * 10, "{report:?}");

    // Queries: removed messages are not found, kept ones are.
    for r in old.iter().step_by(17) {
        assert!(bus.query_id(r.message_id).await.unwrap().is_none());
    }
    assert!(bus
        .query_key(Num::TOPIC, "k5", 10)
        .await
        .unwrap()
        .is_empty());
    for r in new.iter().step_by(7) {
        let m = bus.query_id(r.message_id).await.unwrap().expect("kept");
        assert_eq!((m.queue(), m.offset()), (r.queue, r.offset));
    }
    assert_eq!(
        bus.query_key(Num::TOPIC, "k250", 10).await.unwrap().len(),
        1
    );
    // Reading a queue from 0 starts at the first kept message.
    let q0 = bus.read_queue(Num::TOPIC, 0, 0, 1000).await.unwrap();
    let first_new_q0 = new.iter().filter(|r| r.queue == 0).map(|r| r.offset).min();
    assert_eq!(q0.first().map(|m| m.offset()), first_new_q0);
    // A second pass finds nothing more to remove.
    assert_eq!(bus.enforce_retention().await.unwrap().messages, 0);

    // The stopped group's positions skip the removed messages.
    let lag_before: u64 = bus
        .positions("laggard", Num::TOPIC)
        .await
        .unwrap()
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag_before, 100);
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("laggard")
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log, 100).await;
    caught_up(&bus, "laggard", Num::TOPIC).await;
    let mut seen: Vec<u64> = log.entries().iter().map(|e| e.1).collect();
    seen.sort_unstable();
    assert_eq!(seen, (200..300).collect::<Vec<_>>());
    // The loss is counted.
    assert_eq!(bus.group_stats("laggard", Num::TOPIC).await.expired, 200);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_running_group_behind_removed_data_counts_the_loss() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC).queues(1))
        .await
        .unwrap();
    publish_keyed(&bus, 0..50).await;
    clock_past(SystemTime::now(), Duration::from_millis(10)).await;
    let cut = SystemTime::now();
    clock_past(cut, Duration::from_millis(100)).await;
    // A slow group: 20 deliveries a second, 5 in flight.
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("slow")
        .start_from(StartFrom::Earliest)
        .max_in_flight(5)
        .rate_limit(20)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log, 1).await;
    bus.create_topic(
        TopicConfig::new(Num::TOPIC)
            .queues(1)
            .retention(age_cutting_at(cut)),
    )
    .await
    .unwrap();
    assert_eq!(bus.enforce_retention().await.unwrap().messages, 50);
    publish_keyed(&bus, 50..60).await;
    caught_up(&bus, "slow", Num::TOPIC).await;
    let stats = bus.group_stats("slow", Num::TOPIC).await;
    let counts = log.counts();
    let delivered_old = (0..50).filter(|n| counts.contains_key(n)).count() as u64;
    assert!((50..60).all(|n| counts.contains_key(&n)), "{counts:?}");
    assert!(stats.expired > 0, "{stats:?}");
    assert_eq!(
        delivered_old + stats.expired,
        50,
        "every old message was either delivered or counted as expired: {stats:?}"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_message_with_a_scheduled_retry_is_kept_until_the_retry_is_delivered() {
    // On the test kit's virtual clock: the 3 s retry takes no real time.
    let bus = weirmq::testing::TestBus::start().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC).queues(1))
        .await
        .unwrap();
    let first = publish_keyed(&bus, 0..1).await.remove(0);
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("retrier")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_secs(3), 5))
        .members(
            1,
            recorders(
                &log,
                std::sync::Arc::new(|d: &Delivery<Num>| {
                    if d.attempt() == 1 {
                        Err(HandlerError::retry("not yet"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(
        bus.group_stats("retrier", Num::TOPIC)
            .await
            .scheduled_retries,
        1,
        "the retry is scheduled"
    );
    // 100 ms later the message is past a 50 ms age limit.
    bus.advance(Duration::from_millis(100)).await.unwrap();
    bus.create_topic(
        TopicConfig::new(Num::TOPIC)
            .queues(1)
            .retention(Retention::forever().max_age(Duration::from_millis(50))),
    )
    .await
    .unwrap();
    assert_eq!(bus.enforce_retention().await.unwrap().messages, 0);
    assert!(bus.query_id(first.message_id).await.unwrap().is_some());
    // The retry comes at 3 s (virtual) and is acked.
    bus.advance(Duration::from_secs(3)).await.unwrap();
    assert_eq!(
        log.entries().iter().map(|e| e.2).collect::<Vec<_>>(),
        [1, 2]
    );
    // Settled (the retry entry's removal written, the bus idle): now it
    // goes, in one pass.
    assert_eq!(bus.enforce_retention().await.unwrap().messages, 1);
    assert!(bus.query_id(first.message_id).await.unwrap().is_none());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn offsets_never_go_back_after_a_queue_was_emptied_and_reopened() {
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        bus.create_topic(TopicConfig::new(Num::TOPIC).queues(1))
            .await
            .unwrap();
        publish_keyed(&bus, 0..30).await;
        clock_past(SystemTime::now(), Duration::from_millis(10)).await;
        let cut = SystemTime::now();
        clock_past(cut, Duration::from_millis(10)).await;
        bus.create_topic(
            TopicConfig::new(Num::TOPIC)
                .queues(1)
                .retention(age_cutting_at(cut)),
        )
        .await
        .unwrap();
        assert_eq!(bus.enforce_retention().await.unwrap().messages, 30);
        bus.shutdown().await.unwrap();
    }
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    // The retention setting survived the reopen.
    let topic = bus
        .topics()
        .await
        .into_iter()
        .find(|t| t.name() == Num::TOPIC)
        .unwrap();
    assert!(topic.retention_limits().age().unwrap() < Duration::from_secs(60));
    let r = bus.publish(&Num { n: 30 }).await.unwrap();
    assert_eq!(r.offset, 30, "offsets continue after the removed ones");
    let p = bus.positions("newcomer", Num::TOPIC).await.unwrap();
    assert_eq!(p[0].max, 31);
    bus.shutdown().await.unwrap();
}

#[derive(Serialize, Deserialize, Debug)]
struct Bulk {
    data: String,
}

impl Event for Bulk {
    const TOPIC: &'static str = "bulk";
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

#[actix::test]
async fn size_retention_keeps_each_queue_near_its_limit_and_the_disk_space_is_reused() {
    const LIMIT: u64 = 1 << 20;
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    bus.create_topic(
        TopicConfig::new("bulk")
            .queues(1)
            .retention(Retention::forever().max_bytes(LIMIT)),
    )
    .await
    .unwrap();
    let round = |bus: Bus| async move {
        // 16 MiB per round, in batches (records of up to 64 KiB). Retention
        // removes whole index spans (up to ~320 KiB here), so a queue keeps
        // between its limit less one span and its limit.
        let batch: Vec<Bulk> = (0..256)
            .map(|_| Bulk {
                data: "x".repeat(2000),
            })
            .collect();
        for _ in 0..(16 << 20) / (2000 * 256) {
            bus.publish_batch(&batch).await.unwrap();
        }
        bus.enforce_retention().await.unwrap()
    };
    let first = round(bus.clone()).await;
    assert!(first.messages > 7000, "{first:?}");
    let kept = bus.read_queue("bulk", 0, 0, 100_000).await.unwrap();
    let kept_bytes: u64 = kept.iter().map(|m| m.body().len() as u64).sum();
    assert!(first.bytes > (14 << 20), "{first:?}");
    assert!(
        kept_bytes <= LIMIT && kept_bytes > LIMIT - 400 * 1024,
        "kept {kept_bytes} bytes for a {LIMIT}-byte limit"
    );
    let after_first = dir_bytes(dir.path());
    for _ in 0..3 {
        round(bus.clone()).await;
    }
    let after_four = dir_bytes(dir.path());
    // 64 MiB written in all; without reuse the store would hold ~4x the
    // first round's footprint.
    assert!(
        after_four < after_first * 2,
        "data dir grew from {after_first} to {after_four} bytes over three more rounds"
    );
    bus.shutdown().await.unwrap();
}
