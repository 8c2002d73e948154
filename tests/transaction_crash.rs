//! A producer killed between storing its half messages and ending their
//! transactions (harness = false: this binary is both the test and the
//! child it kills).
//!
//! The child stores half messages (`Flushed`) for orders 0..20, prints each
//! id, and never ends the transactions (its local transactions "hang"); the
//! test SIGKILLs it, reopens the data directory with a checker that commits
//! the even orders and rolls back the odd ones, and checks that exactly the
//! even orders are delivered, once each.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weirmq::prelude::*;
use weirmq::{Message, TransactionChecker, TransactionConfig, TransactionOutcome};

mod support;

const CHILD_ENV: &str = "WEIRMQ_TX_CRASH_CHILD_DIR";

#[derive(Serialize, Deserialize, Debug)]
struct OrderPaid {
    order: u64,
}

impl Event for OrderPaid {
    const TOPIC: &'static str = "order-paid";
}

fn main() {
    support::self_exec_main(
        "killed_producer_is_resolved_by_the_checker",
        "transaction crash",
        CHILD_ENV,
        |dir| child(&dir),
        killed_producer_is_resolved_by_the_checker,
    );
}

fn fast() -> TransactionConfig {
    TransactionConfig {
        check_immunity: Duration::from_millis(200),
        check_interval: Duration::from_millis(100),
        max_checks: 5,
    }
}

/// Stores 20 half messages, prints their ids, then waits to be killed.
fn child(dir: &str) {
    let sys = actix::System::new();
    sys.block_on(async {
        let bus = Bus::builder().data_dir(dir).open().await.expect("open");
        for order in 0..20u64 {
            let bus2 = bus.clone();
            actix::spawn(async move {
                let _ = bus2
                    .publish_transactional(
                        &OrderPaid { order },
                        Publish::new()
                            .key(format!("order-{order}"))
                            .durability(Durability::Flushed),
                        |half| async move {
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "{order} {}", half.message_id).expect("stdout");
                            out.flush().expect("stdout");
                            // The local transaction never finishes.
                            std::future::pending::<TransactionOutcome>().await
                        },
                    )
                    .await;
            });
        }
        std::future::pending::<()>().await;
    });
}

/// Commits even orders, rolls back odd ones.
#[derive(Clone, Default)]
struct Ledger {
    asked: Arc<Mutex<Vec<String>>>,
}

#[weirmq::async_trait]
impl TransactionChecker for Ledger {
    async fn check(&self, message: &Message) -> TransactionOutcome {
        let key = message.keys()[0].clone();
        self.asked.lock().unwrap().push(key.clone());
        let order: u64 = key.trim_start_matches("order-").parse().unwrap();
        if order % 2 == 0 {
            TransactionOutcome::Commit
        } else {
            TransactionOutcome::Rollback
        }
    }
}

struct Sink(Arc<Mutex<Vec<u64>>>);

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Delivery<OrderPaid>> for Sink {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<OrderPaid>, _: &mut Context<Self>) -> Self::Result {
        self.0.lock().unwrap().push(d.event().order);
        Ok(())
    }
}

fn killed_producer_is_resolved_by_the_checker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while printed.len() < 20 {
        assert!(Instant::now() < deadline, "child too slow");
        let line = lines
            .next()
            .expect("child stopped early")
            .expect("child stdout");
        let order: u64 = line.split(' ').next().unwrap().parse().unwrap();
        printed.insert(order);
    }
    // Every half message is stored (Flushed) and no transaction ended.
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");

    let ledger = Ledger::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sys = actix::System::new();
    let (ledger2, seen2) = (ledger.clone(), seen.clone());
    sys.block_on(async move {
        let bus = Bus::builder()
            .data_dir(dir.path())
            .transaction_checker::<OrderPaid>(ledger2.clone(), fast())
            .open()
            .await
            .expect("reopen");
        let s = seen2.clone();
        let sub = bus
            .subscribe::<OrderPaid>("billing")
            .start_from(StartFrom::Earliest)
            .members(1, move || Sink(s.clone()))
            .start()
            .await
            .expect("subscribe");
        support::wait_until("the checker resolved them", Duration::from_secs(30), || {
            let done =
                ledger2.asked.lock().unwrap().len() >= 20 && seen2.lock().unwrap().len() >= 10;
            async move { done }
        })
        .await;
        // Past another check interval (100 ms) on the clock: nothing more
        // comes (resolved half messages are not checked again).
        let resolved = std::time::SystemTime::now();
        support::wait_until(
            "the clock moved on",
            Duration::from_secs(10),
            || async move { std::time::SystemTime::now() > resolved + Duration::from_millis(400) },
        )
        .await;
        sub.drain().await.expect("drain");
        bus.shutdown().await.expect("shutdown");
    });
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (0..20).step_by(2).collect::<Vec<u64>>());
    let asked = ledger.asked.lock().unwrap().len();
    assert_eq!(asked, 20, "each half message checked once");
}
