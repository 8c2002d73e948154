//! The conformance suite: one body per behaviour, run against every
//! backend (the embedded store on disk and in memory, and NATS JetStream), so a backend cannot
//! silently diverge. What a backend cannot do must be a typed
//! `Error::Unsupported` (checked at the end).
//!
//! `on_every_backend!` (tests/support) turns each `async fn name(b: Backend)` below into
//! `embedded::name`, `memory::name` (the in-memory store) and `nats::name`
//! tests; a test that restarts the bus runs on the durable two only.

#[macro_use]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use support::backend::Backend;
use support::*;
use weirmq::prelude::*;
use weirmq::{
    Durability, Error, Ordering, OutgoingMessage, Resend, ResendOutcome, ResetTo, SendReceipt,
    TopicConfig, TraceContext, TransactionConfig, TransactionOutcome,
};

on_every_backend!(
    publish_then_consume_each_message_once,
    members_of_a_group_share_the_work,
    a_failed_message_is_retried_with_its_attempt_count,
    a_poison_message_is_dead_lettered_and_resent_to_its_group_only,
    fifo_keeps_publish_order_per_message_group,
    fifo_a_slow_message_group_holds_back_only_itself,
    fifo_replays_in_order_after_a_reset,
    delayed_messages_arrive_in_due_order_never_early,
    transactions_commit_roll_back_and_are_checked,
    tag_and_sql_filters_select_per_group,
    broadcast_gives_every_member_every_message,
    reset_replays_from_earliest_a_time_or_skips_to_latest,
    unsettled_deliveries_stay_within_max_in_flight,
    bad_input_is_a_typed_error_and_unsupported_features_say_so,
    the_trace_context_follows_a_message_through_retry_delay_transaction_and_resend,
    a_dedupe_key_stores_one_message_within_its_window,
    a_dedupe_window_closes_once_however_often_the_key_is_resent,
    an_inbox_commits_state_once_per_message_and_skips_what_it_processed,
    an_inbox_handler_one_at_a_time_reads_what_the_one_before_committed,
    a_cancelled_delayed_message_is_never_delivered_and_a_delivered_one_never_cancelled,
    a_backlog_is_delivered_highest_priority_first,
    a_bus_shut_down_as_it_opens_stops_promptly;
    durable: offsets_survive_a_restart,
    a_cancel_survives_a_restart,
    a_dedupe_key_is_remembered_across_a_restart,
    priority_lanes_survive_a_restart,
);

async fn publish(bus: &Bus, range: std::ops::Range<u64>) {
    let events: Vec<Num> = range.map(|n| Num { n }).collect();
    for chunk in events.chunks(100) {
        bus.publish_batch(chunk).await.expect("publish");
    }
}

/// Publishes message `i` of every message group `order-<g>` before
/// message `i + 1` of any: n = g * 1000 + i.
async fn publish_in_message_groups(bus: &Bus, groups: u64, each: u64) {
    for i in 0..each {
        for g in 0..groups {
            bus.publish_with(
                &Num { n: g * 1000 + i },
                Publish::new().message_group(format!("order-{g}")),
            )
            .await
            .unwrap();
        }
    }
}

fn ns(log: &Log) -> Vec<u64> {
    let mut v: Vec<u64> = log.entries().iter().map(|e| e.1).collect();
    v.sort_unstable();
    v
}

async fn publish_then_consume_each_message_once(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("billing")
        .start_from(StartFrom::Earliest)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    publish(&bus, 0..500).await;
    delivered(&log, 500).await;
    caught_up(&bus, "billing", Num::TOPIC).await;
    assert_eq!(ns(&log), (0..500).collect::<Vec<_>>(), "{}", b.name());
    assert!(
        log.entries().iter().all(|e| e.2 == 1),
        "first attempts only"
    );
    let stats = sub.stats().await;
    assert_eq!((stats.delivered, stats.acked), (500, 500));
    // Stored messages can be read back per queue.
    let topics = bus.topics().await;
    let t = topics.iter().find(|t| t.name() == Num::TOPIC).unwrap();
    let mut read = 0;
    for q in 0..t.queue_count() {
        read += bus.read_queue(Num::TOPIC, q, 0, 1000).await.unwrap().len();
    }
    assert_eq!(read, 500);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn members_of_a_group_share_the_work(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let slow: Behaviour = Arc::new(|_| {
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    });
    let sub = bus
        .subscribe::<Num>("shipping")
        .start_from(StartFrom::Earliest)
        .members(4, recorders(&log, slow))
        .start()
        .await
        .unwrap();
    publish(&bus, 0..400).await;
    delivered(&log, 400).await;
    caught_up(&bus, "shipping", Num::TOPIC).await;
    assert_eq!(ns(&log), (0..400).collect::<Vec<_>>());
    let members: HashSet<usize> = log.entries().iter().map(|e| e.0).collect();
    assert!(members.len() >= 2, "work spread over members: {members:?}");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn a_failed_message_is_retried_with_its_attempt_count(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("coupons")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_millis(50), 5))
        .members(
            2,
            recorders(
                &log,
                Arc::new(|d: &Delivery<Num>| {
                    if d.event().n % 2 == 0 && d.attempt() < 3 {
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
    let started = Instant::now();
    publish(&bus, 0..40).await;
    delivered(&log, 80).await;
    caught_up(&bus, "coupons", Num::TOPIC).await;
    let mut attempts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (_, n, a) in log.entries() {
        attempts.entry(n).or_default().push(a);
    }
    for (n, mut a) in attempts {
        a.sort_unstable();
        let want: Vec<u32> = if n % 2 == 0 { vec![1, 2, 3] } else { vec![1] };
        assert_eq!(a, want, "attempts of {n} on {}", b.name());
    }
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "two 50 ms delays"
    );
    let stats = sub.stats().await;
    assert_eq!(stats.retried, 40);
    assert_eq!(stats.acked, 40);
    assert_eq!(bus.dead_letter_count("coupons").await.unwrap(), 0);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn a_poison_message_is_dead_lettered_and_resent_to_its_group_only(b: Backend) {
    let bus = b.open().await;
    let healed = Arc::new(AtomicU32::new(0));
    let log = Log::default();
    let other = Log::default();
    let h = healed.clone();
    let sub = bus
        .subscribe::<Num>("invoices")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 3))
        .members(
            2,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    if d.event().n % 10 == 0 && h.load(AtomicOrdering::SeqCst) == 0 {
                        Err(HandlerError::retry(format!("bad invoice {}", d.event().n)))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    let bystander = bus
        .subscribe::<Num>("audit")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&other, ack_all()))
        .start()
        .await
        .unwrap();
    publish(&bus, 0..50).await;
    wait_until("5 dead letters", Duration::from_secs(30), || async {
        bus.dead_letter_count("invoices").await.unwrap() == 5
    })
    .await;
    caught_up(&bus, "invoices", Num::TOPIC).await;
    delivered(&other, 50).await;
    let dls = bus.dead_letters("invoices", 0, 100).await.unwrap();
    assert_eq!(dls.len(), 5);
    for d in &dls {
        assert_eq!(d.attempts(), Some(3));
        assert_eq!(d.origin_topic(), Some(Num::TOPIC));
        assert!(
            d.reason().unwrap().contains("bad invoice"),
            "{:?}",
            d.reason()
        );
        assert!(!d.resent);
    }
    let ids: Vec<_> = dls.iter().map(|d| d.original_id().unwrap()).collect();
    // Fixed: resend them all.
    healed.store(1, AtomicOrdering::SeqCst);
    let before = log.len();
    let reports = bus
        .resend_dead_letters("invoices", Resend::All)
        .await
        .unwrap();
    assert_eq!(reports.len(), 5);
    assert!(reports.iter().all(|r| r.outcome == ResendOutcome::Resent));
    delivered(&log, before + 5).await;
    caught_up(&bus, "invoices", Num::TOPIC).await;
    let resent: Vec<_> = log.entries()[before..].to_vec();
    assert!(
        resent.iter().all(|e| e.1 % 10 == 0 && e.2 == 1),
        "{resent:?}"
    );
    // Only to its own group.
    caught_up(&bus, "audit", Num::TOPIC).await;
    assert_eq!(other.len(), 50, "the other group did not get the resends");
    let again = bus
        .resend_dead_letters("invoices", Resend::Ids(vec![ids[0]]))
        .await
        .unwrap();
    assert_eq!(again[0].outcome, ResendOutcome::AlreadyResent);
    assert_eq!(bus.purge_dead_letters("invoices").await.unwrap(), 5);
    assert_eq!(bus.dead_letter_count("invoices").await.unwrap(), 0);
    sub.drain().await.unwrap();
    bystander.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn fifo_keeps_publish_order_per_message_group(b: Backend) {
    const GROUPS: u64 = 8;
    const EACH: u64 = 25;
    let bus = b.open().await;
    let log = Log::default();
    let flaky = |n: u64, attempt: u32| attempt < 3 && (n * 7 + attempt as u64) % 5 == 0;
    let sub = bus
        .subscribe::<Num>("fulfilment")
        .start_from(StartFrom::Earliest)
        .ordering(Ordering::Fifo)
        .retry(RetryPolicy::fixed(Duration::from_millis(10), 5))
        .members(
            4,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    if flaky(d.event().n, d.attempt()) {
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
    publish_in_message_groups(&bus, GROUPS, EACH).await;
    wait_until("every message acked", Duration::from_secs(60), || async {
        let acked: HashSet<u64> = log
            .entries()
            .iter()
            .filter(|e| !flaky(e.1, e.2))
            .map(|e| e.1)
            .collect();
        acked.len() as u64 == GROUPS * EACH
    })
    .await;
    let mut order: HashMap<u64, Vec<u64>> = HashMap::new();
    for (_, n, a) in log.entries() {
        if !flaky(n, a) {
            order.entry(n / 1000).or_default().push(n % 1000);
        }
    }
    for g in 0..GROUPS {
        assert_eq!(
            order[&g],
            (0..EACH).collect::<Vec<_>>(),
            "group {g} on {}",
            b.name()
        );
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn fifo_a_slow_message_group_holds_back_only_itself(b: Backend) {
    const GROUPS: u64 = 8;
    const EACH: u64 = 10;
    let bus = b.open().await;
    let log = Log::default();
    // Message 0 of message group 0 fails three times, 300 ms apart.
    let stuck = |n: u64, attempt: u32| n == 0 && attempt <= 3;
    let sub = bus
        .subscribe::<Num>("packing")
        .start_from(StartFrom::Earliest)
        .ordering(Ordering::Fifo)
        .retry(RetryPolicy::fixed(Duration::from_millis(300), 5))
        .members(
            4,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    if stuck(d.event().n, d.attempt()) {
                        Err(HandlerError::retry("warehouse busy"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    publish_in_message_groups(&bus, GROUPS, EACH).await;
    wait_until("every message acked", Duration::from_secs(60), || async {
        let ok: HashSet<u64> = log
            .entries()
            .iter()
            .filter(|e| !stuck(e.1, e.2))
            .map(|e| e.1)
            .collect();
        ok.len() as u64 == GROUPS * EACH
    })
    .await;
    let entries = log.entries();
    let unstuck_at = entries
        .iter()
        .position(|e| e.1 == 0 && !stuck(e.1, e.2))
        .unwrap();
    for g in 1..GROUPS {
        let last = entries.iter().rposition(|e| e.1 / 1000 == g).unwrap();
        assert!(
            last < unstuck_at,
            "message group {g} finished before group 0 got unstuck on {}",
            b.name()
        );
    }
    let group0: Vec<u64> = entries
        .iter()
        .filter(|e| e.1 / 1000 == 0 && !stuck(e.1, e.2))
        .map(|e| e.1)
        .collect();
    assert_eq!(group0, (0..EACH).collect::<Vec<_>>(), "group 0 in order");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn fifo_replays_in_order_after_a_reset(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("ledger-fifo")
        .start_from(StartFrom::Earliest)
        .ordering(Ordering::Fifo)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    publish_in_message_groups(&bus, 4, 10).await;
    delivered(&log, 40).await;
    caught_up(&bus, "ledger-fifo", Num::TOPIC).await;
    bus.reset_offsets("ledger-fifo", Num::TOPIC, ResetTo::Earliest)
        .await
        .unwrap();
    delivered(&log, 80).await;
    caught_up(&bus, "ledger-fifo", Num::TOPIC).await;
    let replay = &log.entries()[40..];
    for g in 0..4u64 {
        let order: Vec<u64> = replay
            .iter()
            .filter(|e| e.1 / 1000 == g)
            .map(|e| e.1 % 1000)
            .collect();
        assert_eq!(
            order,
            (0..10).collect::<Vec<_>>(),
            "group {g} on {}",
            b.name()
        );
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn delayed_messages_arrive_in_due_order_never_early(b: Backend) {
    let bus = b.open().await;
    let arrivals: Arc<Mutex<Vec<(u64, SystemTime)>>> = Arc::default();
    let log = Log::default();
    let a = arrivals.clone();
    let sub = bus
        .subscribe::<Num>("reminders")
        .start_from(StartFrom::Earliest)
        .members(
            1,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    a.lock().unwrap().push((d.event().n, SystemTime::now()));
                    Ok(())
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    let now = SystemTime::now();
    let due = [
        (2, now + Duration::from_millis(1500)),
        (1, now + Duration::from_millis(400)),
        (0, now),
    ];
    for (n, at) in due {
        let r = bus
            .publish_with(&Num { n }, Publish::new().deliver_at(at))
            .await
            .unwrap();
        assert_eq!(r.deliver_at.is_some(), n > 0);
    }
    if let Backend::Nats(server) = &b {
        // The path the delays took: the server's schedules where asked for
        // and offered (2.12+), weirmq's forwarder otherwise.
        let (version, staged) = server.version_and_staged_delays().await;
        let minor: u32 = version
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        let native = support::backend::native_schedules_asked() && minor >= 12;
        assert_eq!(
            staged == 0,
            native,
            "server {version}: {staged} staged in the forwarder"
        );
    }
    delivered(&log, 3).await;
    let got = arrivals.lock().unwrap().clone();
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    for (n, at) in &got {
        let due_at = due.iter().find(|d| d.0 == *n).unwrap().1;
        // Due times are kept to the millisecond.
        assert!(
            *at + Duration::from_millis(1) >= due_at,
            "{n} arrived {:?} early on {}",
            due_at.duration_since(*at).unwrap_or_default(),
            b.name()
        );
    }
    let too_far = bus
        .publish_with(
            &Num { n: 9 },
            Publish::new().delay(Duration::from_secs(48 * 3600)),
        )
        .await;
    assert!(
        matches!(too_far, Err(Error::DelayTooLong { .. })),
        "{too_far:?}"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

struct CommitEven(Arc<Mutex<Vec<u64>>>);

#[weirmq::async_trait]
impl weirmq::TransactionChecker for CommitEven {
    async fn check(&self, m: &weirmq::Message) -> TransactionOutcome {
        let n: Num = serde_json::from_slice(m.body()).unwrap();
        self.0.lock().unwrap().push(n.n);
        if n.n % 2 == 0 {
            TransactionOutcome::Commit
        } else {
            TransactionOutcome::Rollback
        }
    }
}

async fn transactions_commit_roll_back_and_are_checked(b: Backend) {
    let bus = b.open().await;
    let checked: Arc<Mutex<Vec<u64>>> = Arc::default();
    bus.register_checker::<Num>(
        CommitEven(checked.clone()),
        TransactionConfig {
            check_immunity: Duration::from_millis(300),
            check_interval: Duration::from_millis(200),
            max_checks: 3,
        },
    )
    .unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("ledger")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let outcomes = [
        (100, TransactionOutcome::Commit),
        (101, TransactionOutcome::Rollback),
        (102, TransactionOutcome::Unknown),
        (103, TransactionOutcome::Unknown),
    ];
    let mut ids = HashMap::new();
    for (n, outcome) in outcomes {
        let tx = bus
            .publish_transactional(&Num { n }, Publish::new(), |_| async move { outcome })
            .await
            .unwrap();
        assert_eq!(tx.receipt.is_some(), outcome == TransactionOutcome::Commit);
        ids.insert(n, tx.half.message_id);
    }
    // 100 committed at once; 102 committed by the checker; 101 and 103 never.
    delivered(&log, 2).await;
    wait_until("both unknowns checked", Duration::from_secs(20), || async {
        checked.lock().unwrap().len() >= 2
    })
    .await;
    let mut seen = ns(&log);
    seen.dedup();
    assert_eq!(seen, vec![100, 102], "{}", b.name());
    let mut c = checked.lock().unwrap().clone();
    c.sort_unstable();
    assert_eq!(c, vec![102, 103], "each unknown checked once");
    // Ending an already resolved transaction does nothing.
    let again = bus
        .publish_transactional(&Num { n: 104 }, Publish::new(), |_| async {
            TransactionOutcome::Commit
        })
        .await
        .unwrap();
    assert_eq!(
        bus.end_transaction(&again.half, TransactionOutcome::Commit)
            .await
            .unwrap(),
        None
    );
    delivered(&log, 3).await;
    let ids_seen: HashSet<_> = ids.values().collect();
    assert_eq!(ids_seen.len(), 4);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn tag_and_sql_filters_select_per_group(b: Backend) {
    let bus = b.open().await;
    let (tags, sql) = (Log::default(), Log::default());
    let by_tag = bus
        .subscribe::<Num>("vip-desk")
        .start_from(StartFrom::Earliest)
        .filter(Filter::tags("vip || gold").unwrap())
        .members(1, recorders(&tags, ack_all()))
        .start()
        .await
        .unwrap();
    let by_sql = bus
        .subscribe::<Num>("big-orders")
        .start_from(StartFrom::Earliest)
        .filter(Filter::sql("amount > 100 AND region IN ('eu', 'us')").unwrap())
        .members(1, recorders(&sql, ack_all()))
        .start()
        .await
        .unwrap();
    let tag_of = |n: u64| ["vip", "gold", "plain", "bronze"][(n % 4) as usize];
    let region_of = |n: u64| ["eu", "us", "apac"][(n % 3) as usize];
    for n in 0..60u64 {
        bus.publish_with(
            &Num { n },
            Publish::new()
                .tag(tag_of(n))
                .property("amount", (n * 5).to_string())
                .property("region", region_of(n)),
        )
        .await
        .unwrap();
    }
    let want_tags: Vec<u64> = (0..60).filter(|n| n % 4 < 2).collect();
    let want_sql: Vec<u64> = (0..60).filter(|n| n * 5 > 100 && n % 3 < 2).collect();
    delivered(&tags, want_tags.len()).await;
    delivered(&sql, want_sql.len()).await;
    caught_up(&bus, "vip-desk", Num::TOPIC).await;
    caught_up(&bus, "big-orders", Num::TOPIC).await;
    assert_eq!(ns(&tags), want_tags, "tags on {}", b.name());
    assert_eq!(ns(&sql), want_sql, "sql on {}", b.name());
    assert_eq!(by_tag.stats().await.filtered, 30);
    by_tag.drain().await.unwrap();
    by_sql.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn broadcast_gives_every_member_every_message(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("caches")
        .start_from(StartFrom::Earliest)
        .broadcast(["node-a", "node-b", "node-c"])
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    publish(&bus, 0..100).await;
    delivered(&log, 300).await;
    for g in sub.position_groups() {
        caught_up(&bus, g, Num::TOPIC).await;
    }
    let mut per_member: HashMap<usize, Vec<u64>> = HashMap::new();
    for (m, n, _) in log.entries() {
        per_member.entry(m).or_default().push(n);
    }
    assert_eq!(per_member.len(), 3);
    for (m, mut v) in per_member {
        v.sort_unstable();
        assert_eq!(
            v,
            (0..100).collect::<Vec<_>>(),
            "member {m} on {}",
            b.name()
        );
    }
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn reset_replays_from_earliest_a_time_or_skips_to_latest(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let start = |log: &Log| {
        bus.subscribe::<Num>("replay")
            .start_from(StartFrom::Earliest)
            .members(1, recorders(log, ack_all()))
            .start()
    };
    let sub = start(&log).await.unwrap();
    publish(&bus, 0..30).await;
    delivered(&log, 30).await;
    caught_up(&bus, "replay", Num::TOPIC).await;
    // Replay everything, on a running group.
    bus.reset_offsets("replay", Num::TOPIC, ResetTo::Earliest)
        .await
        .unwrap();
    delivered(&log, 60).await;
    caught_up(&bus, "replay", Num::TOPIC).await;
    let counts = log.counts();
    assert!((0..30).all(|n| counts[&n] == 2), "{counts:?}");
    sub.drain().await.unwrap();

    // From a point in time: exactly the messages published at or after it.
    let before = SystemTime::now();
    wait_until("the clock moved on", Duration::from_secs(1), || async {
        SystemTime::now() > before + Duration::from_millis(20)
    })
    .await;
    let t = SystemTime::now();
    publish(&bus, 100..110).await;
    bus.reset_offsets("replay", Num::TOPIC, ResetTo::Time(t))
        .await
        .unwrap();
    let log2 = Log::default();
    let sub = start(&log2).await.unwrap();
    delivered(&log2, 10).await;
    caught_up(&bus, "replay", Num::TOPIC).await;
    assert_eq!(ns(&log2), (100..110).collect::<Vec<_>>(), "{}", b.name());
    sub.drain().await.unwrap();

    // Skip a backlog built while the group was stopped.
    publish(&bus, 200..250).await;
    let positions = bus
        .reset_offsets("replay", Num::TOPIC, ResetTo::Latest)
        .await
        .unwrap();
    assert_eq!(positions.iter().map(|p| p.lag).sum::<u64>(), 0);
    let log3 = Log::default();
    let sub = start(&log3).await.unwrap();
    publish(&bus, 300..305).await;
    delivered(&log3, 5).await;
    caught_up(&bus, "replay", Num::TOPIC).await;
    assert_eq!(ns(&log3), (300..305).collect::<Vec<_>>());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn offsets_survive_a_restart(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("mailer")
        .start_from(StartFrom::Earliest)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    publish(&bus, 0..100).await;
    delivered(&log, 100).await;
    caught_up(&bus, "mailer", Num::TOPIC).await;
    sub.drain().await.unwrap();
    publish(&bus, 100..150).await;
    bus.shutdown().await.unwrap();

    let bus = b.open().await;
    assert_eq!(lag(&bus, "mailer", Num::TOPIC).await, 50, "{}", b.name());
    let log2 = Log::default();
    let sub = bus
        .subscribe::<Num>("mailer")
        .members(2, recorders(&log2, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log2, 50).await;
    caught_up(&bus, "mailer", Num::TOPIC).await;
    assert_eq!(
        ns(&log2),
        (100..150).collect::<Vec<_>>(),
        "no replay, nothing lost"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn unsettled_deliveries_stay_within_max_in_flight(b: Backend) {
    const WINDOW: usize = 16;
    let bus = b.open().await;
    publish(&bus, 0..1500).await;
    let log = Log::default();
    let slow: Behaviour = Arc::new(|_| {
        std::thread::sleep(Duration::from_micros(300));
        Ok(())
    });
    let sub = bus
        .subscribe::<Num>("throttled")
        .start_from(StartFrom::Earliest)
        .max_in_flight(WINDOW)
        .members(2, recorders(&log, slow))
        .start()
        .await
        .unwrap();
    // The backlog stays in the store: sample the backend's count of
    // unsettled deliveries while it drains.
    let mut most = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while log.len() < 1500 {
        assert!(Instant::now() < end, "backlog not drained within 60 s");
        most = most.max(sub.stats().await.in_flight);
        // The sampling interval, not a synchronisation.
        actix::clock::sleep(Duration::from_millis(1)).await;
    }
    caught_up(&bus, "throttled", Num::TOPIC).await;
    assert!(
        most as usize <= WINDOW,
        "{most} unsettled on {}, limit {WINDOW}",
        b.name()
    );
    assert!(
        most > 1,
        "never more than one in flight: the test proves nothing"
    );
    assert_eq!(ns(&log), (0..1500).collect::<Vec<_>>());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn bad_input_is_a_typed_error_and_unsupported_features_say_so(b: Backend) {
    let bus = b
        .builder()
        .limits(weirmq::Limits {
            max_body_bytes: 1024,
            ..Default::default()
        })
        .open()
        .await
        .unwrap();
    let big = bus
        .publish_raw(
            OutgoingMessage::new("blobs", vec![0u8; 2048]),
            Durability::Flushed,
        )
        .await;
    assert!(matches!(big, Err(e) if matches!(e.error, Error::BodyTooLarge { .. })));
    let bad = bus
        .publish_raw(
            OutgoingMessage::new("bad topic!", b"x".to_vec()),
            Durability::Flushed,
        )
        .await;
    assert!(matches!(bad, Err(e) if matches!(e.error, Error::InvalidName { .. })));
    let r = bus
        .subscribe::<Num>("bad group!")
        .members(1, recorders(&Log::default(), ack_all()))
        .start()
        .await;
    assert!(matches!(r, Err(Error::InvalidName { .. })));
    assert!(matches!(
        bus.create_topic(TopicConfig::new("wide").queues(0)).await,
        Err(Error::InvalidConfig { .. })
    ));
    bus.create_topic(TopicConfig::new("wide").queues(8))
        .await
        .unwrap();
    assert!(matches!(
        bus.create_topic(TopicConfig::new("wide").queues(4)).await,
        Err(Error::TopicConflict { .. })
    ));
    // Idempotency keys: 1 to 256 bytes, not on a delayed message; a window
    // of 1 ms to 7 days, not longer than the topic keeps its messages.
    for key in [String::new(), "k".repeat(weirmq::MAX_DEDUPE_KEY_BYTES + 1)] {
        let r = bus
            .publish_with(&Num { n: 1 }, Publish::new().dedupe_key(key))
            .await;
        assert!(
            matches!(
                r,
                Err(Error::InvalidName {
                    kind: weirmq::NameKind::DedupeKey,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    let r = bus
        .publish_with(
            &Num { n: 1 },
            Publish::new().dedupe_key("k").delay(Duration::from_secs(1)),
        )
        .await;
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    for config in [
        TopicConfig::new("windows").dedupe_window(Duration::ZERO),
        TopicConfig::new("windows").dedupe_window(weirmq::MAX_DEDUPE_WINDOW * 2),
        TopicConfig::new("windows")
            .retention(weirmq::Retention::default().max_age(Duration::from_secs(60)))
            .dedupe_window(Duration::from_secs(61)),
    ] {
        let r = bus.create_topic(config).await;
        assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{r:?}");
    }
    // What the backend does not do is a typed `Unsupported`, never a
    // silent difference.
    let r = bus.publish(&Num { n: 1 }).await.unwrap();
    let unsupported = |e: &Error| matches!(e, Error::Unsupported { .. });
    let query = bus.query_id(r.message_id).await;
    let outbox = bus
        .publish_with_state(
            &Num { n: 2 },
            Publish::new(),
            weirmq::StateBatch::new().put("k", "v"),
        )
        .await;
    let retention = bus.enforce_retention().await;
    // ... and the backend says so before it is asked.
    let caps = bus.capabilities();
    assert_eq!(caps.outbox, !b.is_nats(), "{caps:?}");
    assert_eq!(caps.history, !b.is_nats(), "{caps:?}");
    if b.is_nats() {
        assert_eq!(caps.backend, "NATS JetStream");
        assert!(matches!(&query, Err(e) if unsupported(e)), "{query:?}");
        assert!(matches!(&outbox, Err(e) if unsupported(e)), "{outbox:?}");
        assert!(
            matches!(&retention, Err(e) if unsupported(e)),
            "{retention:?}"
        );
        let msg = query.unwrap_err().to_string();
        assert!(msg.contains("docs/scaling.md"), "{msg}");
    } else {
        assert!(query.unwrap().is_some());
        outbox.unwrap();
        retention.unwrap();
    }
    bus.shutdown().await.unwrap();
}

/// The W3C trace context a message is published in reaches its handler
/// unchanged — on a retry, after a delay, through a transaction, and after
/// a dead letter is resent — and a follow-up published with
/// `Publish::trace_parent(delivery context)` stays in the trace.
async fn the_trace_context_follows_a_message_through_retry_delay_transaction_and_resend(
    b: Backend,
) {
    let bus = b.open().await;
    /// (n, attempt, context seen by the handler)
    type Seen = Vec<(u64, u32, Option<TraceContext>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let healed = Arc::new(AtomicU32::new(0));
    let (s, h) = (seen.clone(), healed.clone());
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("traced")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 3))
        .members(
            1,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    let n = d.event().n;
                    s.lock().unwrap().push((n, d.attempt(), d.trace_context()));
                    match n {
                        1 if d.attempt() == 1 => Err(HandlerError::retry("first attempt fails")),
                        2 if h.load(AtomicOrdering::SeqCst) == 0 => {
                            Err(HandlerError::dead_letter("poison until healed"))
                        }
                        _ => Ok(()),
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    let roots: Vec<TraceContext> = (0..5).map(|_| TraceContext::new_root()).collect();
    let traced = |n: usize| Publish::new().trace_parent(&roots[n]);
    bus.publish_with(&Num { n: 1 }, traced(1)).await.unwrap();
    bus.publish_with(&Num { n: 2 }, traced(2)).await.unwrap();
    bus.publish_with(&Num { n: 3 }, traced(3).delay(Duration::from_millis(300)))
        .await
        .unwrap();
    let tx = bus
        .publish_transactional(&Num { n: 4 }, traced(4), |_| async {
            TransactionOutcome::Commit
        })
        .await
        .unwrap();
    assert!(tx.receipt.is_some());
    // 1 twice, 2 once (dead-lettered), 3 and 4 once.
    delivered(&log, 5).await;
    wait_until(
        "the poison message dead-lettered",
        Duration::from_secs(20),
        || async { bus.dead_letter_count("traced").await.unwrap() == 1 },
    )
    .await;
    let dl = bus.dead_letters("traced", 0, 10).await.unwrap();
    let dl_ctx = dl[0]
        .message
        .trace_context()
        .expect("the dead letter keeps the context");
    assert_eq!(dl_ctx.trace_id(), roots[2].trace_id(), "{}", b.name());
    healed.store(1, AtomicOrdering::SeqCst);
    let reports = bus
        .resend_dead_letters("traced", Resend::All)
        .await
        .unwrap();
    assert_eq!(reports[0].outcome, ResendOutcome::Resent);
    delivered(&log, 6).await;
    caught_up(&bus, "traced", Num::TOPIC).await;

    let seen = seen.lock().unwrap().clone();
    let mut by_n: BTreeMap<u64, Vec<(u32, TraceContext)>> = BTreeMap::new();
    for (n, attempt, ctx) in seen {
        let ctx = ctx.unwrap_or_else(|| panic!("{n} attempt {attempt} arrived without context"));
        by_n.entry(n).or_default().push((attempt, ctx));
    }
    for (n, deliveries) in &by_n {
        let root = &roots[*n as usize];
        let want = if *n == 1 || *n == 2 { 2 } else { 1 };
        assert_eq!(deliveries.len(), want, "deliveries of {n} on {}", b.name());
        for (attempt, ctx) in deliveries {
            assert_eq!(
                ctx.trace_id(),
                root.trace_id(),
                "{n} attempt {attempt} on {}",
                b.name()
            );
            // The context is the publish span's: a child of the given parent,
            // the same one on every delivery of the message.
            assert_ne!(ctx.span_id(), root.span_id());
            assert_eq!(ctx.span_id(), deliveries[0].1.span_id());
        }
    }
    assert_eq!(by_n[&1].iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2]);
    // A follow-up published as a child of what a handler saw stays in the trace.
    let follow_up = by_n[&1][0].1.child();
    bus.publish_with(&Num { n: 0 }, Publish::new().trace_parent(&follow_up))
        .await
        .unwrap();
    let stored = bus.read_queue(Num::TOPIC, 0, 0, 1000).await.unwrap();
    let mut all = stored;
    for q in 1..4 {
        all.extend(bus.read_queue(Num::TOPIC, q, 0, 1000).await.unwrap());
    }
    let zero = all
        .iter()
        .find(|m| serde_json::from_slice::<Num>(m.body()).ok() == Some(Num { n: 0 }))
        .expect("the follow-up is stored");
    assert_eq!(
        zero.trace_context().unwrap().trace_id(),
        roots[1].trace_id()
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Publishes `n` under idempotency key `key`.
async fn publish_keyed(bus: &Bus, n: u64, key: &str) -> SendReceipt {
    bus.publish_with(&Num { n }, Publish::new().dedupe_key(key))
        .await
        .expect("publish with a dedupe key")
}

async fn a_dedupe_key_stores_one_message_within_its_window(b: Backend) {
    let bus = b.open().await;
    bus.create_topic(TopicConfig::new(Num::TOPIC).dedupe_window(Duration::from_secs(3600)))
        .await
        .unwrap();
    let first = publish_keyed(&bus, 1, "order-1").await;
    // A resend, and a resend with another body: the first receipt, nothing stored.
    assert_eq!(
        publish_keyed(&bus, 1, "order-1").await,
        first,
        "{}",
        b.name()
    );
    assert_eq!(publish_keyed(&bus, 99, "order-1").await, first);
    // Racing publishes of one key store one message; all get its receipt.
    let racing = futures::future::join_all((0..8).map(|_| publish_keyed(&bus, 2, "order-2"))).await;
    assert!(racing.iter().all(|r| *r == racing[0]), "{racing:?}");
    assert_ne!(racing[0].message_id, first.message_id);
    // Keys are per topic.
    let other = bus
        .publish_raw(
            Publish::new()
                .dedupe_key("order-1")
                .into_message("other-topic", b"{}".to_vec()),
            Durability::Flushed,
        )
        .await
        .unwrap();
    assert_ne!(other.message_id, first.message_id);

    // Consumed, each stored message once: 1 and 2 — no 99, no second 2.
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("keyed")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log, 2).await;
    caught_up(&bus, "keyed", Num::TOPIC).await;
    let mut got = ns(&log);
    got.sort_unstable();
    assert_eq!(got, vec![1, 2], "{}", b.name());
    // Acked and consumed: the key still answers with its first receipt.
    assert_eq!(publish_keyed(&bus, 1, "order-1").await, first);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn a_dedupe_window_closes_once_however_often_the_key_is_resent(b: Backend) {
    // Real time on every backend (the exact millisecond edges are in
    // tests/testing_kit.rs on a virtual clock): the key is resent every
    // 50 ms; if a duplicate moved the window it would never close.
    let window = Duration::from_secs(1);
    let bus = b.open().await;
    bus.create_topic(TopicConfig::new(Num::TOPIC).dedupe_window(window))
        .await
        .unwrap();
    let started = Instant::now();
    let first = publish_keyed(&bus, 1, "k").await;
    let mut resends = 0;
    let second = loop {
        let r = publish_keyed(&bus, 2, "k").await;
        if r != first {
            break r;
        }
        resends += 1;
        assert!(
            started.elapsed() < window + Duration::from_secs(10),
            "{}: the window never closed ({resends} resends)",
            b.name()
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        started.elapsed() >= window,
        "{}: a new message after {:?}, inside the {window:?} window",
        b.name(),
        started.elapsed()
    );
    assert!(resends > 0, "{}: no duplicate inside the window", b.name());
    // The second publish opened a window of its own.
    assert_eq!(publish_keyed(&bus, 3, "k").await, second);
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("keyed")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log, 2).await;
    caught_up(&bus, "keyed", Num::TOPIC).await;
    assert_eq!(ns(&log), vec![1, 2], "{}", b.name());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn a_dedupe_key_is_remembered_across_a_restart(b: Backend) {
    let bus = b.open().await;
    let first = publish_keyed(&bus, 1, "order-1").await;
    bus.shutdown().await.unwrap();
    let bus = b.open().await;
    assert_eq!(
        publish_keyed(&bus, 1, "order-1").await,
        first,
        "{}",
        b.name()
    );
    assert_ne!(publish_keyed(&bus, 2, "order-2").await, first);
    bus.shutdown().await.unwrap();
}

/// A bus shut down the moment it opened: its own tasks may not have run
/// yet (on NATS the delay forwarder and the transaction checker, which
/// once missed the stop signal and ran on, so `shutdown` never returned —
/// a hang in CI). Every round must end well within its deadline.
async fn a_bus_shut_down_as_it_opens_stops_promptly(b: Backend) {
    for round in 0..5 {
        let bus = b.open().await;
        let done = actix::clock::timeout(Duration::from_secs(30), bus.shutdown()).await;
        let Ok(result) = done else {
            panic!(
                "{}: round {round}: shutdown did not return within 30 s",
                b.name()
            )
        };
        result.unwrap();
        let after = bus.publish(&Num { n: round }).await;
        assert!(
            matches!(after, Err(Error::Closed)),
            "{}: {after:?}",
            b.name()
        );
    }
}

/// The inbox subscription of `group`: each message commits its row
/// `row/<n>` = attempt; odd ones fail their first attempt after writing.
fn inbox_subscription(bus: &Bus, log: &Log) -> weirmq::SubscribeBuilder<Num, Recorder> {
    let behaviour: Behaviour = Arc::new(|d| {
        let n = d.event().n;
        d.commit_state(
            weirmq::StateBatch::new().put(format!("row/{n:04}"), d.attempt().to_string()),
        )?;
        if n % 2 == 1 && d.attempt() == 1 {
            return Err(HandlerError::retry("the first attempt of an odd one fails"));
        }
        Ok(())
    });
    bus.subscribe::<Num>("inbox")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_millis(10), 3))
        .inbox()
        .members(2, recorders(log, behaviour))
}

async fn an_inbox_commits_state_once_per_message_and_skips_what_it_processed(b: Backend) {
    let bus = b.open().await;
    let log = Log::default();
    let started = inbox_subscription(&bus, &log).start().await;
    if b.is_nats() {
        // JetStream keeps no application state: said before anything runs.
        let Err(e) = started else {
            panic!("an inbox on NATS must be refused")
        };
        assert!(matches!(&e, Error::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("docs/exactly-once.md"), "{e}");
        bus.shutdown().await.unwrap();
        return;
    }
    let sub = started.unwrap();
    publish(&bus, 0..20).await;
    delivered(&log, 30).await; // 20 first attempts, 10 retries
    caught_up(&bus, "inbox", Num::TOPIC).await;
    let rows = bus.state_scan(b"row/").await.unwrap();
    assert_eq!(rows.len(), 20, "{}", b.name());
    for (k, v) in &rows {
        let n: u64 = String::from_utf8_lossy(&k[4..]).parse().unwrap();
        let want = if n % 2 == 1 { "2" } else { "1" };
        assert_eq!(
            v,
            want.as_bytes(),
            "row {n}: only the attempt that succeeded wrote"
        );
    }
    let marks = bus.state_scan(weirmq::INBOX_PREFIX).await.unwrap();
    assert_eq!(marks.len(), 20, "one processed mark per message");
    sub.drain().await.unwrap();

    // A replay of everything: each message is marked, none reaches a handler.
    bus.reset_offsets("inbox", Num::TOPIC, ResetTo::Earliest)
        .await
        .unwrap();
    assert_eq!(lag(&bus, "inbox", Num::TOPIC).await, 20);
    let sub = inbox_subscription(&bus, &log).start().await.unwrap();
    caught_up(&bus, "inbox", Num::TOPIC).await;
    assert_eq!(log.len(), 30, "a processed message was handed out again");
    sub.drain().await.unwrap();

    // State with a delivery needs an inbox subscription.
    let refused = Arc::new(Mutex::new(None));
    let seen = refused.clone();
    let plain = Log::default();
    let sub = bus
        .subscribe::<Num>("plain")
        .start_from(StartFrom::Earliest)
        .members(
            1,
            recorders(
                &plain,
                Arc::new(move |d| {
                    let r = d.commit_state(weirmq::StateBatch::new().put("x", "y"));
                    *seen.lock().unwrap() = Some(matches!(r, Err(Error::InvalidConfig { .. })));
                    Ok(())
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    delivered(&plain, 20).await;
    assert_eq!(*refused.lock().unwrap(), Some(true));
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Recall racing delivery (real time): 200 delayed messages due over
/// 400 ms, each cancelled at a moment spread over the same span, so many
/// cancels land at their message's due instant. Each message is either
/// cancelled or delivered, never both, never neither.
async fn a_cancelled_delayed_message_is_never_delivered_and_a_delivered_one_never_cancelled(
    b: Backend,
) {
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("recall")
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let mut receipts = Vec::new();
    for n in 0..200u64 {
        let r = bus
            .publish_with(
                &Num { n },
                Publish::new().delay(Duration::from_millis(100 + 2 * n)),
            )
            .await
            .unwrap();
        receipts.push((n, r));
    }
    if b.is_nats() {
        let r = bus.cancel_delayed(&receipts[0].1).await;
        assert!(matches!(&r, Err(Error::Unsupported { .. })), "{r:?}");
        delivered(&log, 200).await;
        sub.drain().await.unwrap();
        bus.shutdown().await.unwrap();
        return;
    }
    let started = Instant::now();
    let mut cancelled = BTreeSet::new();
    let mut too_late = BTreeSet::new();
    // Cancels in a scrambled order, paced over ~the span the messages fall due in.
    let mut order: Vec<usize> = (0..200).collect();
    order.sort_by_key(|i| (i * 7919) % 200);
    for (k, i) in order.into_iter().enumerate() {
        let at = Duration::from_millis(100 + 2 * k as u64);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            actix::clock::sleep(wait).await;
        }
        let (n, r) = &receipts[i];
        match bus.cancel_delayed(r).await.unwrap() {
            weirmq::CancelOutcome::Cancelled => cancelled.insert(*n),
            weirmq::CancelOutcome::AlreadyDelivered => too_late.insert(*n),
        };
    }
    delivered(&log, too_late.len()).await;
    caught_up(&bus, "recall", Num::TOPIC).await;
    // Anything cancelled wrongly would have been due by now.
    let positions = bus.positions("recall", Num::TOPIC).await.unwrap();
    let stored: u64 = positions.iter().map(|p| p.max).sum();
    let got: BTreeSet<u64> = ns(&log).into_iter().collect();
    assert_eq!(
        got,
        too_late,
        "{}: delivered = the ones too late to cancel",
        b.name()
    );
    assert_eq!(
        stored as usize,
        too_late.len(),
        "nothing cancelled reached the topic"
    );
    assert_eq!(cancelled.len() + too_late.len(), 200);
    assert!(!cancelled.is_empty(), "no cancel came in time");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

async fn a_cancel_survives_a_restart(b: Backend) {
    let bus = b.open().await;
    let r = bus
        .publish_with(
            &Num { n: 1 },
            Publish::new().delay(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let cancelled = bus.cancel_delayed(&r).await;
    if b.is_nats() {
        assert!(
            matches!(&cancelled, Err(Error::Unsupported { .. })),
            "{cancelled:?}"
        );
        bus.shutdown().await.unwrap();
        return;
    }
    assert_eq!(cancelled.unwrap(), weirmq::CancelOutcome::Cancelled);
    bus.shutdown().await.unwrap();
    let bus = b.open().await;
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("recall")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    // Its time comes and goes: a marker due after it (delayed messages
    // fall due in due order) arrives alone.
    bus.publish_with(
        &Num { n: 2 },
        Publish::new().delay(Duration::from_millis(400)),
    )
    .await
    .unwrap();
    delivered(&log, 1).await;
    caught_up(&bus, "recall", Num::TOPIC).await;
    assert_eq!(ns(&log), vec![2]);
    assert_eq!(
        bus.cancel_delayed(&r).await.unwrap(),
        weirmq::CancelOutcome::AlreadyDelivered
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// The priority of message n in the priority tests: 9, 4 or 0 in turn.
fn priority_of(n: u64) -> u8 {
    [9, 0, 4, 0][(n % 4) as usize]
}

/// Publishes n in `range`, each with `priority_of(n)`, one at a time (in
/// publish order); on NATS checks the refusal instead and returns false.
async fn publish_prioritised(bus: &Bus, b: &Backend, range: std::ops::Range<u64>) -> bool {
    let too_high = bus
        .publish_with(&Num { n: 0 }, Publish::new().priority(10))
        .await;
    assert!(
        matches!(&too_high, Err(Error::InvalidConfig { reason }) if reason.contains("0 (the default, lowest) to 9")),
        "{}: {too_high:?}",
        b.name()
    );
    for n in range {
        let r = bus
            .publish_with(&Num { n }, Publish::new().priority(priority_of(n)))
            .await;
        if b.is_nats() && priority_of(n) > 0 {
            assert!(
                matches!(&r, Err(Error::Unsupported { feature }) if feature.contains("priority")),
                "{r:?}"
            );
            return false;
        }
        r.unwrap();
    }
    true
}

/// Subscribes one member with a window of one to a backlog, records each
/// delivery's priority, and returns the priorities in delivery order
/// (checked against what each was published with).
async fn drain_one_at_a_time(bus: &Bus, group: &str, n: usize) -> Vec<(u8, u64)> {
    let log = Log::default();
    let wrong = Arc::new(AtomicU32::new(0));
    let w = wrong.clone();
    let check: Behaviour = Arc::new(move |d| {
        if d.priority() != priority_of(d.event().n) {
            w.fetch_add(1, AtomicOrdering::SeqCst);
        }
        Ok(())
    });
    let sub = bus
        .subscribe::<Num>(group)
        .start_from(StartFrom::Earliest)
        .max_in_flight(1)
        .members(1, recorders(&log, check))
        .start()
        .await
        .unwrap();
    delivered(&log, n).await;
    caught_up(bus, group, Num::TOPIC).await;
    sub.drain().await.unwrap();
    assert_eq!(
        wrong.load(AtomicOrdering::SeqCst),
        0,
        "a delivery lost its priority"
    );
    log.entries()
        .iter()
        .map(|e| (priority_of(e.1), e.1))
        .collect()
}

/// The order a backlog of mixed priorities must come in: priorities
/// falling, publish order within each lane (priority 0 is spread over the
/// topic's queues, so only its set is fixed).
fn assert_priority_order(got: &[(u8, u64)], n: u64, backend: &str) {
    let levels: Vec<u8> = got.iter().map(|e| e.0).collect();
    assert!(
        levels.windows(2).all(|w| w[0] >= w[1]),
        "{backend}: priorities not falling: {levels:?}"
    );
    for p in [9, 4] {
        let lane: Vec<u64> = got.iter().filter(|e| e.0 == p).map(|e| e.1).collect();
        let want: Vec<u64> = (0..n).filter(|&m| priority_of(m) == p).collect();
        assert_eq!(lane, want, "{backend}: priority {p} in publish order");
    }
    let mut all: Vec<u64> = got.iter().map(|e| e.1).collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "{backend}: each once");
}

/// A backlog of priorities 9, 4 and 0 published interleaved is delivered
/// 9s first, then 4s, then 0s; each delivery carries its priority; the
/// lanes show in the topic's stats and positions. NATS refuses priorities
/// (Unsupported); every backend refuses a priority above 9.
async fn a_backlog_is_delivered_highest_priority_first(b: Backend) {
    const N: u64 = 120;
    let bus = b.open().await;
    if !publish_prioritised(&bus, &b, 0..N).await {
        bus.shutdown().await.unwrap();
        return;
    }
    let got = drain_one_at_a_time(&bus, "ranked", N as usize).await;
    assert_priority_order(&got, N, b.name());
    // The topic's 4 queues, then the two lanes used (4: queue 7; 9: queue 12).
    let stats = bus.topic_stats(Num::TOPIC).await.unwrap();
    let queues: Vec<(u32, u64)> = stats.queues.iter().map(|q| (q.queue, q.end)).collect();
    assert_eq!(queues.len(), 6, "{queues:?}");
    assert_eq!(&queues[4..], &[(7, N / 4), (12, N / 4)]);
    assert_eq!(weirmq::priority_queue(4, 9), Some(12));
    let positions = bus.positions("ranked", Num::TOPIC).await.unwrap();
    assert_eq!(positions.len(), 6);
    assert!(positions.iter().all(|p| p.lag == 0), "{positions:?}");
    // A FIFO subscription ignores priority: a message group keeps its
    // publish order whatever the priorities.
    let log = Log::default();
    let fifo = bus
        .subscribe::<Num>("fifo-ranked")
        .ordering(Ordering::Fifo)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    for n in 1000..1020 {
        bus.publish_with(
            &Num { n },
            Publish::new().message_group("one").priority(priority_of(n)),
        )
        .await
        .unwrap();
    }
    delivered(&log, 20).await;
    let order: Vec<u64> = log.entries().iter().map(|e| e.1).collect();
    assert_eq!(order, (1000..1020).collect::<Vec<_>>());
    fifo.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// Priority lanes are queues of the store: their messages and ends come
/// back after a restart, and so do a group's positions in them.
async fn priority_lanes_survive_a_restart(b: Backend) {
    const N: u64 = 40;
    let bus = b.open().await;
    if !publish_prioritised(&bus, &b, 0..N).await {
        bus.shutdown().await.unwrap();
        return;
    }
    bus.shutdown().await.unwrap();
    let bus = b.open().await;
    let got = drain_one_at_a_time(&bus, "ranked", N as usize).await;
    assert_priority_order(&got, N, b.name());
    bus.shutdown().await.unwrap();
    let bus = b.open().await;
    let positions = bus.positions("ranked", Num::TOPIC).await.unwrap();
    let lanes: Vec<(u32, u64, u64)> = positions
        .iter()
        .filter(|p| p.queue >= 4)
        .map(|p| (p.queue, p.committed, p.lag))
        .collect();
    assert_eq!(lanes, [(7, N / 4, 0), (12, N / 4, 0)], "{positions:?}");
    bus.shutdown().await.unwrap();
}

/// Counts its deliveries in one key: reads the tally, commits tally + 1.
struct Tally(Bus);
impl Actor for Tally {
    type Context = Context<Self>;
}
impl Handler<Delivery<Num>> for Tally {
    type Result = ResponseFuture<Result<(), HandlerError>>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let bus = self.0.clone();
        Box::pin(async move {
            let tally: u64 = match bus.state_get(b"tally").await? {
                Some(v) => String::from_utf8_lossy(&v).parse().unwrap(),
                None => 0,
            };
            d.commit_state(weirmq::StateBatch::new().put("tally", (tally + 1).to_string()))?;
            Ok(())
        })
    }
}

/// A read-modify-write inbox handler run one at a time (one member, one
/// delivery in its hands) loses no update: the member's slot is held until
/// its attempt's writes are committed, so the next delivery reads them.
/// (Before, the slot was freed when the handler returned and the next
/// attempt could read the tally before the previous commit: lost updates.)
async fn an_inbox_handler_one_at_a_time_reads_what_the_one_before_committed(b: Backend) {
    if b.is_nats() {
        return; // no inbox on NATS: the refusal is checked above
    }
    let bus = b.open().await;
    let h = bus.clone();
    let sub = bus
        .subscribe::<Num>("tally")
        .start_from(StartFrom::Earliest)
        .inbox()
        .members(1, move || Tally(h.clone()))
        .max_in_flight_per_member(1)
        .start()
        .await
        .unwrap();
    publish(&bus, 0..300).await;
    caught_up(&bus, "tally", Num::TOPIC).await;
    wait_until(
        "every message was acked",
        Duration::from_secs(60),
        || async { lag(&bus, "tally", Num::TOPIC).await == 0 },
    )
    .await;
    assert_eq!(
        bus.state_get(b"tally").await.unwrap().as_deref(),
        Some(&b"300"[..]),
        "{}: an update was lost",
        b.name()
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
