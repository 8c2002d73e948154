//! Consumer groups (clustering): every group gets every message, one member
//! of each group handles it, members share the work.

mod support;

use std::collections::HashSet;

use support::*;
use weirmq::prelude::*;

#[actix::test]
async fn two_groups_of_three_members_each_get_100k_messages_exactly_once() {
    init_tracing();
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC).queues(4))
        .await
        .unwrap();
    let logs = [Log::default(), Log::default()];
    let mut subs = Vec::new();
    for (g, log) in ["billing", "analytics"].iter().zip(&logs) {
        subs.push(
            bus.subscribe::<Num>(*g)
                .members(3, recorders(log, ack_all()))
                .start()
                .await
                .unwrap(),
        );
    }

    const N: u64 = 100_000;
    // Four concurrent publishers, batches of 500, fsync'd (the default).
    let mut tasks = Vec::new();
    for p in 0..4u64 {
        let bus = bus.clone();
        tasks.push(actix::spawn(async move {
            let mut receipts = Vec::new();
            let mine: Vec<u64> = (0..N).filter(|n| n % 4 == p).collect();
            for chunk in mine.chunks(500) {
                let events: Vec<Num> = chunk.iter().map(|&n| Num { n }).collect();
                receipts.extend(bus.publish_batch(&events).await.unwrap());
            }
            receipts
        }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.extend(t.await.unwrap());
    }
    assert_eq!(receipts.len(), N as usize);
    // Offsets are dense per queue and every queue was used.
    let mut per_queue = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for r in &receipts {
        per_queue[r.queue as usize].push(r.offset);
    }
    for (q, offsets) in per_queue.iter_mut().enumerate() {
        offsets.sort_unstable();
        assert!(!offsets.is_empty(), "queue {q} unused");
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as u64),
            "queue {q} offsets not dense"
        );
    }

    for (g, log) in ["billing", "analytics"].iter().zip(&logs) {
        delivered(log, N as usize).await;
        caught_up(&bus, g, Num::TOPIC).await;
    }
    for (g, log) in ["billing", "analytics"].iter().zip(&logs) {
        let entries = log.entries();
        assert_eq!(entries.len(), N as usize, "group {g}: duplicates");
        let distinct: HashSet<u64> = entries.iter().map(|e| e.1).collect();
        assert_eq!(distinct.len(), N as usize, "group {g}: lost or duplicated");
        for member in 0..3 {
            let share = entries.iter().filter(|e| e.0 == member).count();
            assert!(
                share > N as usize / 10,
                "group {g}: member {member} handled only {share} of {N}"
            );
        }
        let stats = bus.group_stats(g, Num::TOPIC).await;
        assert_eq!(stats.acked, N);
        assert_eq!(stats.in_flight, 0);
    }
    for s in subs {
        s.drain().await.unwrap();
    }
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_new_group_starts_at_the_latest_offset_unless_asked_for_earliest() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    for n in 0..10 {
        bus.publish(&Num { n }).await.unwrap();
    }
    let latest = Log::default();
    let earliest = Log::default();
    let s1 = bus
        .subscribe::<Num>("late")
        .members(1, recorders(&latest, ack_all()))
        .start()
        .await
        .unwrap();
    let s2 = bus
        .subscribe::<Num>("replay")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&earliest, ack_all()))
        .start()
        .await
        .unwrap();
    bus.publish(&Num { n: 10 }).await.unwrap();
    delivered(&earliest, 11).await;
    delivered(&latest, 1).await;
    caught_up(&bus, "late", Num::TOPIC).await;
    caught_up(&bus, "replay", Num::TOPIC).await;
    assert_eq!(earliest.len(), 11);
    assert_eq!(
        latest.entries().iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![10]
    );
    s1.drain().await.unwrap();
    s2.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn subscribing_a_group_twice_in_one_process_is_refused() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let s = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let again = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await;
    assert!(matches!(
        again,
        Err(weirmq::Error::AlreadySubscribed { .. })
    ));
    s.drain().await.unwrap();
    // Once drained, the group can subscribe again.
    let s = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    s.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_group_behind_a_large_backlog_reads_it_back_within_its_in_flight_window() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    const N: u64 = 20_000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        let events: Vec<Num> = chunk.iter().map(|&n| Num { n }).collect();
        bus.publish_batch(&events).await.unwrap();
    }
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("slow")
        .start_from(StartFrom::Earliest)
        .max_in_flight(32)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let mut max_seen = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while log.len() < N as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "backlog not drained in time"
        );
        let stats = sub.stats().await;
        max_seen = max_seen.max(stats.in_flight);
        assert!(stats.in_flight <= 32, "window exceeded: {stats:?}");
        actix::clock::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert!(max_seen > 0, "the window was never observed in use");
    caught_up(&bus, "slow", Num::TOPIC).await;
    let distinct: HashSet<u64> = log.entries().iter().map(|e| e.1).collect();
    assert_eq!(distinct.len(), N as usize);
    assert_eq!(log.len(), N as usize, "no duplicates");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
