//! The local outbox and the inbox under SIGKILL (harness = false: this
//! binary is both the tests and the children it kills).
//!
//! **Outbox.**
//! Each round starts a child that writes orders with
//! `Bus::publish_with_state` — the order row and its `OrderCreated` message
//! in one commit — as fast as it can from 8 tasks, and kills it after a
//! random delay (so at a random point of a commit). After each kill the
//! store is reopened and every order row must have its message and every
//! message its row: both or neither, never one of them. Five rounds, each
//! child continuing the same store.
//!
//! **Inbox.** Each of twelve rounds starts a child that publishes 400 more
//! numbers and consumes the topic with an inbox subscription whose handler
//! increments a per-message counter (read, then `commit_state` of the
//! value + 1), and kills it at a random point of the consumption. At the
//! end the parent consumes the rest; every message's counter must be
//! exactly 1 — a message processed twice (its state committed, its ack
//! lost in the kill) would show 2 — and no message may be missing one.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use weirmq::prelude::*;
use weirmq::StateBatch;

mod support;

const CHILD_ENV: &str = "WEIRMQ_OUTBOX_CHILD_DIR";
const ROUND_ENV: &str = "WEIRMQ_OUTBOX_ROUND";
const INBOX_CHILD_ENV: &str = "WEIRMQ_INBOX_CHILD_DIR";
/// Numbers published per inbox round.
const PER_ROUND: u64 = 400;
const INBOX_ROUNDS: u64 = 12;

#[derive(Serialize, Deserialize, Debug)]
struct OrderCreated {
    order: String,
}

impl Event for OrderCreated {
    const TOPIC: &'static str = "outbox-orders";
}

#[derive(Serialize, Deserialize, Debug)]
struct Counted {
    n: u64,
}

impl Event for Counted {
    const TOPIC: &'static str = "inbox-counted";
}

fn main() {
    // A child runs its part only (the other test's `self_exec_main` must
    // not run the parent's test inside it).
    if let Ok(dir) = std::env::var(INBOX_CHILD_ENV) {
        let round = std::env::var(ROUND_ENV).unwrap_or_default();
        inbox_child(&dir, round.parse().unwrap_or(0));
        return;
    }
    support::self_exec_main(
        "outbox_is_all_or_nothing_under_sigkill",
        "outbox crash",
        CHILD_ENV,
        |dir| child(&dir, std::env::var(ROUND_ENV).unwrap_or_default()),
        outbox_is_all_or_nothing_under_sigkill,
    );
    if std::env::var(CHILD_ENV).is_err() {
        support::self_exec_main(
            "inbox_counts_every_message_exactly_once_under_sigkill",
            "inbox crash",
            INBOX_CHILD_ENV,
            |_| {},
            inbox_counts_every_message_exactly_once_under_sigkill,
        );
    }
}

/// Increments `count/<n>` of each message through the inbox: read the
/// counter, then commit the value + 1 with the delivery.
struct Counter {
    bus: Bus,
    handled: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<Delivery<Counted>> for Counter {
    type Result = ResponseFuture<Result<(), HandlerError>>;

    fn handle(&mut self, d: Delivery<Counted>, _: &mut Context<Self>) -> Self::Result {
        let (bus, handled) = (self.bus.clone(), self.handled.clone());
        Box::pin(async move {
            let key = format!("count/{:08}", d.event().n);
            let old = match bus.state_get(key.as_bytes()).await? {
                Some(v) => String::from_utf8_lossy(&v).parse::<u64>()?,
                None => 0,
            };
            d.commit_state(StateBatch::new().put(key, (old + 1).to_string()))?;
            if handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                // Tell the parent consumption has begun.
                println!("consuming");
            }
            Ok(())
        })
    }
}

/// Subscribes the counting inbox group on `bus`.
async fn count_with_inbox(
    bus: &Bus,
    handled: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> weirmq::Subscription {
    let b = bus.clone();
    bus.subscribe::<Counted>("counter")
        .start_from(weirmq::StartFrom::Earliest)
        .inbox()
        .members(4, move || Counter {
            bus: b.clone(),
            handled: handled.clone(),
        })
        .start()
        .await
        .expect("subscribe")
}

fn inbox_child(dir: &str, round: u64) {
    let sys = actix::System::new();
    sys.block_on(async move {
        let bus = Bus::builder().data_dir(dir).open().await.expect("open");
        let events: Vec<Counted> = (round * PER_ROUND..(round + 1) * PER_ROUND)
            .map(|n| Counted { n })
            .collect();
        bus.publish_batch(&events).await.expect("publish");
        let _sub = count_with_inbox(&bus, Default::default()).await;
        // Consume until killed.
        std::future::pending::<()>().await;
    });
}

fn inbox_counts_every_message_exactly_once_under_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut in_window = 0;
    for round in 0..INBOX_ROUNDS {
        let mut child = support::Kill(
            Command::new(std::env::current_exe().expect("current exe"))
                .env(INBOX_CHILD_ENV, dir.path())
                .env(ROUND_ENV, round.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child"),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().expect("child stdout"))
            .read_line(&mut line)
            .expect("child stdout");
        assert_eq!(
            line.trim(),
            "consuming",
            "round {round}: child did not start"
        );
        let ms = seed.wrapping_mul(round + 3).wrapping_add(round * 7919) % 300;
        std::thread::sleep(Duration::from_millis(ms));
        child.0.kill().expect("SIGKILL");
        child.0.wait().expect("wait");
        let (marked_unacked, counted) = inbox_state(dir.path());
        in_window += marked_unacked;
        println!(
            "inbox round {round}: killed {ms} ms into consuming; {counted} counted so far, \
             {marked_unacked} processed but not acked"
        );
    }
    // The rest, consumed by the parent; then every counter.
    let sys = actix::System::new();
    sys.block_on(async {
        let bus = Bus::builder()
            .data_dir(dir.path())
            .open()
            .await
            .expect("reopen");
        // Counting from 1: the parent prints no "consuming".
        let sub = count_with_inbox(&bus, std::sync::Arc::new(1.into())).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let lag: u64 = bus
                .positions("counter", Counted::TOPIC)
                .await
                .expect("positions")
                .iter()
                .map(|p| p.lag)
                .sum();
            if lag == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{lag} messages never consumed"
            );
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        sub.drain().await.expect("drain");
        let published = published_numbers(&bus).await;
        let counts: Vec<(u64, u64)> = bus
            .state_scan(b"count/")
            .await
            .expect("scan")
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k[6..]).parse().unwrap(),
                    String::from_utf8_lossy(&v).parse().unwrap(),
                )
            })
            .collect();
        let twice: Vec<_> = counts.iter().filter(|(_, c)| *c != 1).collect();
        assert!(twice.is_empty(), "counted more than once: {twice:?}");
        let counted: BTreeSet<u64> = counts.iter().map(|(n, _)| *n).collect();
        let missing: Vec<_> = published.difference(&counted).collect();
        assert!(missing.is_empty(), "never counted: {missing:?}");
        assert_eq!(counted.len(), published.len());
        println!(
            "inbox: {} messages over {INBOX_ROUNDS} killed rounds, each counted exactly once; \
             {in_window} were processed but not acked at a kill",
            published.len()
        );
        bus.shutdown().await.expect("shutdown");
    });
    assert!(
        in_window > 0,
        "no kill landed between a commit and its ack: the test did not test the inbox"
    );
}

/// After a kill: how many messages are marked processed but not acked (the
/// window the inbox closes), and how many counters exist.
fn inbox_state(dir: &std::path::Path) -> (usize, usize) {
    let sys = actix::System::new();
    sys.block_on(async {
        let bus = Bus::builder().data_dir(dir).open().await.expect("reopen");
        let positions = bus
            .positions("counter", Counted::TOPIC)
            .await
            .unwrap_or_default();
        let mut marked_unacked = 0;
        for p in &positions {
            let mut from = p.committed;
            loop {
                let batch = bus
                    .read_queue(Counted::TOPIC, p.queue, from, 1000)
                    .await
                    .expect("read");
                let Some(last) = batch.last() else { break };
                from = last.offset() + 1;
                for m in &batch {
                    let key = weirmq::inbox_key(Counted::TOPIC, "counter", m.id());
                    if bus.state_get(&key).await.expect("mark").is_some() {
                        marked_unacked += 1;
                    }
                }
            }
        }
        let counted = bus.state_scan(b"count/").await.expect("scan").len();
        bus.shutdown().await.expect("shutdown");
        (marked_unacked, counted)
    })
}

/// Every number stored in the topic.
async fn published_numbers(bus: &Bus) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for q in 0..weirmq::TopicConfig::new(Counted::TOPIC).queue_count() {
        let mut from = 0;
        loop {
            let batch = bus
                .read_queue(Counted::TOPIC, q, from, 1000)
                .await
                .expect("read");
            let Some(last) = batch.last() else { break };
            from = last.offset() + 1;
            for m in &batch {
                out.insert(Counted::decode(m.body()).unwrap().n);
            }
        }
    }
    out
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
