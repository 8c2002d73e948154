//! Crash recovery (harness = false: this binary is both the test and the
//! child it kills).
//!
//! The test starts this same binary as a child process that publishes with
//! `Durability::Flushed` from several concurrent publishers and prints each
//! receipt, kills it with SIGKILL mid-stream, reopens the data directory and
//! checks that every message whose receipt was printed is there, at its
//! queue and offset, and that each queue's offsets are dense. Two rounds: the
//! second child appends to the recovered store.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weirmq::prelude::*;

mod support;

const CHILD_ENV: &str = "WEIRMQ_CRASH_CHILD_DIR";
const TOPIC: &str = "crash-test";

#[derive(Serialize, Deserialize, Debug)]
struct Tick {
    publisher: u32,
    seq: u64,
}

impl Event for Tick {
    const TOPIC: &'static str = TOPIC;
}

fn main() {
    support::self_exec_main(
        "crash_recovery",
        "crash recovery",
        CHILD_ENV,
        |dir| child(&dir),
        crash_recovery,
    );
}

/// Publishes forever, printing `queue offset id` for every receipt.
fn child(dir: &str) {
    let sys = actix::System::new();
    sys.block_on(async {
        let bus = Bus::builder().data_dir(dir).open().await.expect("open");
        let mut tasks = Vec::new();
        for publisher in 0..8u32 {
            let bus = bus.clone();
            tasks.push(actix::spawn(async move {
                for seq in 0.. {
                    let r = bus
                        .publish_with(
                            &Tick { publisher, seq },
                            Publish::new().durability(Durability::Flushed),
                        )
                        .await
                        .expect("publish");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{} {} {}", r.queue, r.offset, r.message_id).expect("stdout");
                    out.flush().expect("stdout");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn crash_recovery() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut receipts: Vec<(u32, u64, String)> = Vec::new();
    for round in 0..2 {
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().expect("current exe"))
                .env(CHILD_ENV, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child"),
        );
        let stdout = child.0.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let before = receipts.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Read receipts until enough are printed, then kill mid-stream.
        while receipts.len() < before + 3000 {
            assert!(Instant::now() < deadline, "child too slow");
            match lines.next() {
                Some(Ok(line)) => receipts.push(parse(&line)),
                other => panic!("child stopped early: {other:?}"),
            }
        }
        child.0.kill().expect("SIGKILL");
        child.0.wait().expect("wait");
        // Everything the child printed before it died counts.
        for line in lines.map_while(Result::ok) {
            if let Some(r) = try_parse(&line) {
                receipts.push(r);
            }
        }
        println!(
            "crash round {round}: killed after {} receipts",
            receipts.len() - before
        );
        verify(dir.path(), &receipts);
    }
}

/// Kills the child if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn parse(line: &str) -> (u32, u64, String) {
    try_parse(line).unwrap_or_else(|| panic!("bad receipt line {line:?}"))
}

fn try_parse(line: &str) -> Option<(u32, u64, String)> {
    let mut it = line.split(' ');
    let q = it.next()?.parse().ok()?;
    let o = it.next()?.parse().ok()?;
    let id = it.next()?;
    (id.len() == 32 && it.next().is_none()).then(|| (q, o, id.to_string()))
}

fn verify(dir: &std::path::Path, receipts: &[(u32, u64, String)]) {
    let sys = actix::System::new();
    sys.block_on(async {
        let bus = Bus::builder().data_dir(dir).open().await.expect("reopen");
        let queues = bus
            .topics()
            .await
            .into_iter()
            .find(|t| t.name() == TOPIC)
            .expect("topic recovered")
            .queue_count();
        let mut stored: Vec<Vec<String>> = Vec::new();
        for q in 0..queues {
            let mut ids = Vec::new();
            loop {
                let batch = bus
                    .read_queue(TOPIC, q, ids.len() as u64, 1000)
                    .await
                    .expect("read");
                if batch.is_empty() {
                    break;
                }
                for m in batch {
                    assert_eq!(m.offset(), ids.len() as u64, "queue {q} not dense");
                    ids.push(m.id().to_string());
                }
            }
            stored.push(ids);
        }
        for (q, o, id) in receipts {
            let at = stored[*q as usize].get(*o as usize);
            assert_eq!(
                at,
                Some(id),
                "receipt queue {q} offset {o} id {id}: lost after SIGKILL"
            );
        }
        let total: usize = stored.iter().map(Vec::len).sum();
        println!(
            "verified {} receipts against {} stored messages",
            receipts.len(),
            total
        );
        bus.shutdown().await.expect("shutdown");
    });
}
