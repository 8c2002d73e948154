//! The local outbox under SIGKILL (harness = false: this binary is both the
//! test and the child it kills).
//!
//! Each round starts a child that writes orders with
//! `Bus::publish_with_state` — the order row and its `OrderCreated` message
//! in one commit — as fast as it can from 8 tasks, and kills it after a
//! random delay (so at a random point of a commit). After each kill the
//! store is reopened and every order row must have its message and every
//! message its row: both or neither, never one of them. Five rounds, each
//! child continuing the same store.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use weirmq::prelude::*;
use weirmq::StateBatch;

mod support;

const CHILD_ENV: &str = "WEIRMQ_OUTBOX_CHILD_DIR";
const ROUND_ENV: &str = "WEIRMQ_OUTBOX_ROUND";

#[derive(Serialize, Deserialize, Debug)]
struct OrderCreated {
    order: String,
}

impl Event for OrderCreated {
    const TOPIC: &'static str = "outbox-orders";
}

fn main() {
    support::self_exec_main(
        "outbox_is_all_or_nothing_under_sigkill",
        "outbox crash",
        CHILD_ENV,
        |dir| child(&dir, std::env::var(ROUND_ENV).unwrap_or_default()),
        outbox_is_all_or_nothing_under_sigkill,
    );
}

fn child(dir: &str, round: String) {
    let sys = actix::System::new();
    sys.block_on(async move {
        let bus = Bus::builder().data_dir(dir).open().await.expect("open");
        let mut tasks = Vec::new();
        for t in 0..8u32 {
            let (bus, round) = (bus.clone(), round.clone());
            tasks.push(actix::spawn(async move {
                for i in 0.. {
                    let order = format!("{round}-{t}-{i}");
                    bus.publish_with_state(
                        &OrderCreated {
                            order: order.clone(),
                        },
                        Publish::new().key(order.clone()),
                        StateBatch::new().put(format!("order/{order}"), "created"),
                    )
                    .await
                    .expect("publish");
                    if t == 0 && i == 0 {
                        // Tell the parent writing has begun.
                        println!("writing");
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn outbox_is_all_or_nothing_under_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A different kill point each round (no rand dependency needed).
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for round in 0..5u64 {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        // Wait until the child has stored its first order, then let it
        // write for a random while: the kill point.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("child stdout"))
            .read_line(&mut line)
            .expect("child stdout");
        assert_eq!(line.trim(), "writing", "round {round}: child did not start");
        let ms = 50 + (seed.wrapping_mul(round + 7).wrapping_add(round * 7919)) % 700;
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        let (rows, messages) = read_back(dir.path());
        let missing_message: Vec<_> = rows.difference(&messages).collect();
        let missing_row: Vec<_> = messages.difference(&rows).collect();
        assert!(
            missing_message.is_empty() && missing_row.is_empty(),
            "round {round}: rows without message {missing_message:?}, messages without row {missing_row:?}"
        );
        assert!(
            !rows.is_empty(),
            "round {round}: the child wrote nothing in {ms} ms"
        );
        println!(
            "outbox round {round}: killed after {ms} ms, {} orders, each with its message",
            rows.len()
        );
    }
}

/// The order ids with a row, and those with a message.
fn read_back(dir: &std::path::Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let sys = actix::System::new();
    sys.block_on(async {
        let bus = Bus::builder().data_dir(dir).open().await.expect("reopen");
        let rows: BTreeSet<String> = bus
            .state_scan(b"order/")
            .await
            .expect("scan")
            .into_iter()
            .map(|(k, _)| String::from_utf8(k[6..].to_vec()).unwrap())
            .collect();
        let mut messages = BTreeSet::new();
        let queues = bus
            .topics()
            .await
            .into_iter()
            .find(|t| t.name() == OrderCreated::TOPIC)
            .map_or(0, |t| t.queue_count());
        for q in 0..queues {
            let mut from = 0;
            loop {
                let batch = bus
                    .read_queue(OrderCreated::TOPIC, q, from, 1000)
                    .await
                    .expect("read");
                let Some(last) = batch.last() else { break };
                from = last.offset() + 1;
                for m in &batch {
                    messages.insert(OrderCreated::decode(m.body()).unwrap().order);
                }
            }
        }
        bus.shutdown().await.expect("shutdown");
        (rows, messages)
    })
}
