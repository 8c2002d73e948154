//! Restart: reopening a data directory restores topics, queue logs and
//! committed positions; unacked messages are delivered again, acked ones
//! never.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use weirmq::prelude::*;

const N: u64 = 10_000;

/// Acks every message but holds every tenth forever (never settled).
struct HoldsEveryTenth {
    log: Log,
}

impl Actor for HoldsEveryTenth {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for HoldsEveryTenth {
    type Result = ResponseFuture<Result<(), HandlerError>>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.log
            .0
            .lock()
            .unwrap()
            .push((0, d.event().n, d.attempt()));
        let hold = d.event().n % 10 == 0;
        Box::pin(async move {
            if hold {
                futures::future::pending::<()>().await;
            }
            Ok(())
        })
    }
}

#[actix::test]
async fn unacked_messages_come_back_after_a_restart_and_acked_ones_do_not() {
    init_tracing();
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        let events: Vec<Num> = (0..N).map(|n| Num { n }).collect();
        bus.publish_batch(&events).await.unwrap();

        let log = Log::default();
        let l = log.clone();
        let sub = bus
            .subscribe::<Num>("worker")
            .start_from(StartFrom::Earliest)
            .max_in_flight(4096)
            .max_in_flight_per_member(2048)
            .members(2, move || HoldsEveryTenth { log: l.clone() })
            .start()
            .await
            .unwrap();
        delivered(&log, N as usize).await;
        wait_until("all acks are settled", Duration::from_secs(10), || {
            let sub = &sub;
            async move { sub.stats().await.acked == N - N / 10 }
        })
        .await;
        let lag = lag(&bus, "worker", Num::TOPIC).await;
        assert_eq!(lag, N / 10, "lag counts only the unacked messages");
        // Stop with a tenth still in the handlers' hands, never settled.
        bus.shutdown().await.unwrap();
    }

    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    assert_eq!(bus.topics().await, vec![TopicConfig::new(Num::TOPIC)]);
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("worker")
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log, (N / 10) as usize).await;
    caught_up(&bus, "worker", Num::TOPIC).await;
    let seen: Vec<u64> = log.entries().iter().map(|e| e.1).collect();
    let distinct: HashSet<u64> = seen.iter().copied().collect();
    let expected: HashSet<u64> = (0..N).filter(|n| n % 10 == 0).collect();
    assert_eq!(seen.len(), expected.len(), "a message came back twice");
    assert_eq!(distinct, expected, "redelivered exactly the unacked ones");
    sub.drain().await.unwrap();

    // New publishes continue the queues' offsets.
    let r = bus.publish(&Num { n: N }).await.unwrap();
    assert_eq!(r.offset, N / 4);
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_bus_can_be_reopened_many_times_and_keeps_every_message() {
    let dir = temp_dir();
    let mut all = Vec::new();
    for round in 0..5u64 {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        for n in 0..20 {
            all.push(bus.publish(&Num { n: round * 100 + n }).await.unwrap());
        }
        bus.shutdown().await.unwrap();
    }
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    for r in &all {
        let got = bus
            .read_queue(Num::TOPIC, r.queue, r.offset, 1)
            .await
            .unwrap();
        assert_eq!(got[0].id(), r.message_id);
    }
    bus.shutdown().await.unwrap();
}

/// Regression (issue 13, defect 2): a message nacked shortly before a clean
/// drain came back twice after reopening — as attempt 1 (its offset was
/// never committed: the drain wrote positions before the retry entry was
/// stored and the original acked) and as attempt 2 (the retry entry). Now
/// the group waits for its retry entries and dead letters in progress before
/// it writes its final positions.
#[actix::test]
async fn after_a_clean_drain_each_unacked_message_comes_back_exactly_once_with_its_attempt() {
    init_tracing();
    const M: u64 = 2_500;
    for round in 0..3 {
        let dir = temp_dir();
        let first = Log::default();
        {
            let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
            let events: Vec<Num> = (0..M).map(|n| Num { n }).collect();
            bus.publish_batch(&events).await.unwrap();
            // Every fifth message fails its first attempt; its retry is due
            // long after the drain, so it must come back after the reopen.
            let behaviour: Behaviour = Arc::new(|d| {
                if d.event().n % 5 == 0 && d.attempt() == 1 {
                    Err(HandlerError::retry("first attempts of every fifth fail"))
                } else {
                    Ok(())
                }
            });
            let sub = bus
                .subscribe::<Num>("worker")
                .start_from(StartFrom::Earliest)
                .retry(RetryPolicy::fixed(Duration::from_millis(300), 5))
                .members(4, recorders(&first, behaviour))
                .start()
                .await
                .unwrap();
            delivered(&first, 300 + round * 400).await;
            sub.drain().await.unwrap();
            bus.shutdown().await.unwrap();
        }
        // What the first run settled: acked (Ok), or failed at attempt a
        // (so its next delivery must be attempt a + 1).
        let mut acked = HashSet::new();
        let mut failed_at = std::collections::HashMap::new();
        for (_, n, attempt) in first.entries() {
            if n % 5 == 0 && attempt == 1 {
                failed_at.insert(n, attempt);
            } else {
                acked.insert(n);
                failed_at.remove(&n);
            }
        }
        assert!(
            !failed_at.is_empty(),
            "round {round}: some were nacked before the drain"
        );

        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        let second = Log::default();
        let sub = bus
            .subscribe::<Num>("worker")
            .retry(RetryPolicy::fixed(Duration::from_millis(10), 5))
            .members(4, recorders(&second, ack_all()))
            .start()
            .await
            .unwrap();
        caught_up(&bus, "worker", Num::TOPIC).await;
        let mut seen = std::collections::HashMap::new();
        for (_, n, attempt) in second.entries() {
            assert!(
                !acked.contains(&n),
                "round {round}: {n} was acked before the drain"
            );
            if let Some(prev) = seen.insert(n, attempt) {
                panic!("round {round}: {n} came back twice (attempts {prev} and {attempt})");
            }
        }
        for (n, a) in &failed_at {
            assert_eq!(
                seen.get(n),
                Some(&(a + 1)),
                "round {round}: {n} failed at attempt {a} comes back once as attempt {}",
                a + 1
            );
        }
        let all: HashSet<u64> = acked.iter().chain(seen.keys()).copied().collect();
        assert_eq!(all.len() as u64, M, "round {round}: none lost");
        sub.drain().await.unwrap();
        bus.shutdown().await.unwrap();
    }
}
