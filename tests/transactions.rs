//! Transactional messages: invisible until committed, never visible after a
//! rollback, `Unknown` resolved by the topic's checker (commit and
//! rollback), rolled back after the last check, and resolved after a clean
//! restart. (A producer killed mid-transaction: tests/transaction_crash.rs.)
//! Checks run on the test kit's virtual clock (each at its exact time); the
//! restart test runs in real time on a data directory.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use weirmq::prelude::*;
use weirmq::testing::TestBus;
use weirmq::{Message, TransactionChecker, TransactionConfig, TransactionOutcome};

/// Answers per message key; counts calls per key.
#[derive(Clone, Default)]
struct Checker {
    answers: Arc<Mutex<HashMap<String, TransactionOutcome>>>,
    calls: Arc<Mutex<HashMap<String, u32>>>,
}

impl Checker {
    fn answer(&self, key: &str, outcome: TransactionOutcome) {
        self.answers.lock().unwrap().insert(key.into(), outcome);
    }
    fn calls(&self, key: &str) -> u32 {
        self.calls.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

#[weirmq::async_trait]
impl TransactionChecker for Checker {
    async fn check(&self, message: &Message) -> TransactionOutcome {
        let key = message.keys()[0].clone();
        *self.calls.lock().unwrap().entry(key.clone()).or_default() += 1;
        self.answers
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(TransactionOutcome::Unknown)
    }
}

fn fast() -> TransactionConfig {
    TransactionConfig {
        check_immunity: Duration::from_millis(100),
        check_interval: Duration::from_millis(50),
        max_checks: 3,
    }
}

#[actix::test]
async fn committed_messages_appear_only_after_the_commit_and_rolled_back_ones_never() {
    let bus = TestBus::start().await.unwrap();
    let checker = Checker::default();
    // First checks 1 s after each half message: ample time to end both.
    let config = TransactionConfig {
        check_immunity: Duration::from_secs(1),
        ..fast()
    };
    bus.register_checker::<Num>(checker.clone(), config)
        .unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let b = bus.bus().clone();
    let tx = bus
        .publish_transactional(&Num { n: 1 }, Publish::new().key("k1"), |half| async move {
            // Stored, but not in its topic, and nobody received it.
            assert!(b.query_key(Num::TOPIC, "k1", 10).await.unwrap().is_empty());
            let stored = b.query_id(half.message_id).await.unwrap().unwrap();
            assert!(stored.is_half());
            TransactionOutcome::Commit
        })
        .await
        .unwrap();
    let receipt = tx.receipt.expect("committed");
    assert_eq!(receipt.message_id, tx.half.message_id, "the id is kept");
    let rolled = bus
        .publish_transactional(&Num { n: 2 }, Publish::new().key("k2"), |_| async {
            TransactionOutcome::Rollback
        })
        .await
        .unwrap();
    assert_eq!(rolled.receipt, None);
    bus.wait_idle().await.unwrap();
    assert_eq!(log.len(), 1);
    // Well past the first check time: the rolled-back one never comes, and
    // the checker was never asked about either (resolved ones are not).
    bus.advance(Duration::from_millis(1500)).await.unwrap();
    assert_eq!(log.entries().iter().map(|e| e.1).collect::<Vec<_>>(), [1]);
    assert_eq!((checker.calls("k1"), checker.calls("k2")), (0, 0));
    // Ending it again does nothing.
    assert_eq!(
        bus.end_transaction(&tx.half, TransactionOutcome::Commit)
            .await
            .unwrap(),
        None,
        "a resolved transaction stays resolved"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn unknown_outcomes_are_resolved_by_the_checker_both_ways() {
    let bus = TestBus::start().await.unwrap();
    let checker = Checker::default();
    checker.answer("commit-me", TransactionOutcome::Commit);
    checker.answer("roll-me-back", TransactionOutcome::Rollback);
    bus.register_checker::<Num>(checker.clone(), fast())
        .unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    for (n, key) in [(1, "commit-me"), (2, "roll-me-back")] {
        let tx = bus
            .publish_transactional(&Num { n }, Publish::new().key(key), |_| async {
                TransactionOutcome::Unknown
            })
            .await
            .unwrap();
        assert_eq!(tx.receipt, None);
    }
    // Nothing is checked before the immunity (100 ms) is over.
    bus.advance(Duration::from_millis(99)).await.unwrap();
    assert_eq!(
        (
            checker.calls("commit-me"),
            checker.calls("roll-me-back"),
            log.len()
        ),
        (0, 0, 0)
    );
    bus.advance(Duration::from_millis(1)).await.unwrap();
    assert_eq!(
        (
            checker.calls("commit-me"),
            checker.calls("roll-me-back"),
            log.len()
        ),
        (1, 1, 1),
        "both checked at 100 ms, the committed one delivered then"
    );
    bus.advance(Duration::from_millis(300)).await.unwrap();
    assert_eq!(log.entries().iter().map(|e| e.1).collect::<Vec<_>>(), [1]);
    // Resolved ones are not checked again (no check storms).
    assert_eq!(
        (checker.calls("commit-me"), checker.calls("roll-me-back")),
        (1, 1)
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_transaction_unknown_after_the_last_check_is_rolled_back() {
    let bus = TestBus::start().await.unwrap();
    let checker = Checker::default();
    bus.register_checker::<Num>(checker.clone(), fast())
        .unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    bus.publish_transactional(
        &Num { n: 1 },
        Publish::new().key("never-known"),
        |_| async { TransactionOutcome::Unknown },
    )
    .await
    .unwrap();
    // Checks at 100 ms (immunity), 150 ms and 200 ms (interval 50 ms).
    bus.advance(Duration::from_millis(199)).await.unwrap();
    assert_eq!(checker.calls("never-known"), 2);
    bus.advance(Duration::from_millis(1)).await.unwrap();
    assert_eq!(checker.calls("never-known"), 3);
    // Long enough for a fourth check, were there one.
    bus.advance(Duration::from_millis(300)).await.unwrap();
    assert_eq!(checker.calls("never-known"), 3);
    // Even a late "commit" from the checker's owner changes nothing now.
    checker.answer("never-known", TransactionOutcome::Commit);
    bus.advance(Duration::from_millis(200)).await.unwrap();
    assert_eq!(log.len(), 0);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn half_messages_and_their_checks_survive_a_restart() {
    let dir = temp_dir();
    let checks = Arc::new(AtomicU32::new(0));
    {
        // This run's checker never knows; it sets the first check time.
        let bus = Bus::builder()
            .data_dir(dir.path())
            .transaction_checker::<Num>(Checker::default(), fast())
            .open()
            .await
            .unwrap();
        // The producer never decides (its process goes away).
        bus.publish_transactional(&Num { n: 5 }, Publish::new().key("later"), |_| async {
            TransactionOutcome::Unknown
        })
        .await
        .unwrap();
        bus.shutdown().await.unwrap();
    }
    let checker = Checker::default();
    checker.answer("later", TransactionOutcome::Commit);
    let bus = Bus::builder()
        .data_dir(dir.path())
        .transaction_checker::<Num>(checker.clone(), fast())
        .open()
        .await
        .unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .start_from(StartFrom::Earliest)
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    delivered(&log, 1).await;
    assert_eq!(log.entries()[0].1, 5);
    checks.fetch_add(checker.calls("later"), Ordering::SeqCst);
    assert_eq!(checks.load(Ordering::SeqCst), 1);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn application_state_is_written_read_and_survives_a_reopen() {
    let dir = temp_dir();
    {
        let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
        bus.write_state(
            weirmq::StateBatch::new()
                .put("order/1", "created")
                .put("order/2", "created")
                .put("user/9", "x"),
        )
        .await
        .unwrap();
        bus.write_state(
            weirmq::StateBatch::new()
                .put("order/1", "paid")
                .delete("order/2"),
        )
        .await
        .unwrap();
        bus.shutdown().await.unwrap();
    }
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    assert_eq!(bus.state_get(b"order/1").await.unwrap().unwrap(), b"paid");
    assert_eq!(bus.state_get(b"order/2").await.unwrap(), None);
    let orders = bus.state_scan(b"order/").await.unwrap();
    assert_eq!(orders, vec![(b"order/1".to_vec(), b"paid".to_vec())]);
    bus.shutdown().await.unwrap();
}
