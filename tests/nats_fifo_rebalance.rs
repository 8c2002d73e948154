//! A FIFO consumer group's queues spread over its live processes and move
//! when one joins or leaves (issue 17, point 3), with every message group's
//! order kept across each handover (harness = false: this binary is the
//! test and the three workers).
//!
//! The test starts its own `nats-server` and publishes jobs in 16 message
//! groups at a steady rate for the whole test. Workers A and B start (each
//! must come to own queues of the 4), C joins late (it must come to own
//! queues, taken from A and B without a pause in their groups' order), and
//! B is SIGKILLed (its queues must move to A and C once its heartbeat and
//! leases expire). Each worker writes `done <n> <queue> <attempt> <ns>` as
//! it finishes a job; afterwards every job must have been done, and each
//! message group's jobs, ordered by when they were done across the three
//! processes, must come in publish order — a job may be done again only
//! right after itself (B died before its ack reached the server).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weirmq::nats::NatsConfig;
use weirmq::prelude::*;

mod support;

const CHILD_ENV: &str = "WEIRMQ_FIFO_REBALANCE_WORKER";
const ACK_WAIT: Duration = Duration::from_secs(2);
const GROUPS: u64 = 16;
const QUEUES: u32 = 4;

#[derive(Serialize, Deserialize, Debug)]
struct Job {
    n: u64,
}

impl Event for Job {
    const TOPIC: &'static str = "fifo-jobs";
}

fn main() {
    support::self_exec_main(
        "fifo_queues_spread_over_live_processes_and_move_in_order",
        "nats fifo rebalance",
        CHILD_ENV,
        |arg| worker(&arg),
        fifo_queues_spread_over_live_processes_and_move_in_order,
    );
}

fn config(url: &str) -> NatsConfig {
    let mut c = NatsConfig::new(url);
    c.ack_wait = ACK_WAIT;
    c
}

fn unix_ns(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

struct Worker {
    out: Arc<Mutex<std::fs::File>>,
}

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<Delivery<Job>> for Worker {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, d: Delivery<Job>, _: &mut Context<Self>) -> Self::Result {
        // The work: slow enough that a group's next job waits behind it.
        std::thread::sleep(Duration::from_millis(3));
        let line = format!(
            "done {} {} {} {}\n",
            d.event().n,
            d.message().queue(),
            d.attempt(),
            unix_ns(SystemTime::now())
        );
        self.out.lock().unwrap().write_all(line.as_bytes()).unwrap();
        Ok(())
    }
}

/// `<url> <output file>`: works on `fifo-jobs` in group `workers`, FIFO,
/// until killed.
fn worker(arg: &str) {
    let (url, path) = arg.split_once(' ').expect("<url> <path>");
    let out = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("output file"),
    ));
    actix::System::new().block_on(async move {
        let bus = Bus::builder()
            .nats_config(config(url))
            .open()
            .await
            .expect("open");
        let _sub = bus
            .subscribe::<Job>("workers")
            .start_from(StartFrom::Earliest)
            .ordering(weirmq::Ordering::Fifo)
            .members(4, move || Worker { out: out.clone() })
            .start()
            .await
            .expect("subscribe");
        std::future::pending::<()>().await;
    });
}

fn spawn_worker(url: &str, out: &std::path::Path) -> support::Kill {
    support::Kill(
        Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, format!("{url} {}", out.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn worker"),
    )
}

/// One finished job.
#[derive(Clone, Copy, Debug)]
struct Done {
    n: u64,
    queue: u32,
    at_ns: u128,
}

/// The jobs a worker finished (complete lines only: it may be writing
/// one, or have been killed in the middle of one).
fn read(path: &std::path::Path) -> Vec<Done> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end]
        .lines()
        .map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            assert_eq!(p.len(), 5, "a worker's line: {l:?}");
            Done {
                n: p[1].parse().unwrap(),
                queue: p[2].parse().unwrap(),
                at_ns: p[4].parse().unwrap(),
            }
        })
        .collect()
}

/// The queues each worker owns once the group has settled: from `since`
/// on, windows in which every worker did at least 20 jobs are taken one
/// after another until, in one of them, no queue's jobs were done by two
/// workers (a handover still under way when a window opens — a slow
/// process start on a loaded machine — puts a queue's jobs on both sides
/// of it; the group must settle within the deadline).
fn owners_after(
    what: &str,
    workers: &[(&str, &std::path::Path)],
    since: SystemTime,
) -> Vec<BTreeSet<u32>> {
    let mut since = unix_ns(since);
    let mut owned: Vec<BTreeSet<u32>> = Vec::new();
    let disjoint = |owned: &[BTreeSet<u32>]| {
        let mut all = BTreeSet::new();
        owned.iter().all(|q| q.iter().all(|x| all.insert(*x)))
    };
    support::wait_for_blocking(
        &format!("{what}, each owning queues no other worker does"),
        Duration::from_secs(90),
        || {
            let done: Vec<Vec<Done>> = workers
                .iter()
                .map(|(_, p)| read(p).into_iter().filter(|d| d.at_ns > since).collect())
                .collect();
            if done.iter().any(|d| d.len() < 20) {
                return false;
            }
            owned = done
                .iter()
                .map(|d| d.iter().map(|d| d.queue).collect())
                .collect();
            if disjoint(&owned) {
                return true;
            }
            // A handover was under way in this window: take the next one.
            since = unix_ns(SystemTime::now());
            false
        },
    );
    for (i, q) in owned.iter().enumerate() {
        println!("  {}: queues {q:?}", workers[i].0);
    }
    owned
}

fn fifo_queues_spread_over_live_processes_and_move_in_order() {
    let Some(server) = support::backend::NatsServer::start() else {
        return;
    };
    let dir = support::temp_dir();
    let (a_out, b_out, c_out) = (
        dir.path().join("a.log"),
        dir.path().join("b.log"),
        dir.path().join("c.log"),
    );
    // The producer: a job every 4 ms in 16 message groups, until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let producer = {
        let (url, stop, published) = (server.url.clone(), stop.clone(), published.clone());
        std::thread::spawn(move || {
            actix::System::new().block_on(async move {
                let bus = Bus::builder()
                    .nats_config(config(&url))
                    .open()
                    .await
                    .unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    bus.publish_with(
                        &Job { n },
                        Publish::new().message_group(format!("g{}", n % GROUPS)),
                    )
                    .await
                    .unwrap();
                    n += 1;
                    published.store(n, Ordering::Relaxed);
                    // Pacing the producer, not synchronisation.
                    actix_rt::time::sleep(Duration::from_millis(4)).await;
                }
                bus.shutdown().await.unwrap();
            });
        })
    };

    // A and B: each comes to own some of the 4 queues.
    let a = spawn_worker(&server.url, &a_out);
    let b = spawn_worker(&server.url, &b_out);
    let started = SystemTime::now();
    println!("A and B:");
    let two = owners_after(
        "A and B each do jobs",
        &[("A", &a_out), ("B", &b_out)],
        started + Duration::from_secs(2),
    );
    assert!(two.iter().all(|q| !q.is_empty()));

    // C joins late: it takes queues over from A and B.
    let c = spawn_worker(&server.url, &c_out);
    let joined = SystemTime::now();
    println!("C joined:");
    let three = owners_after(
        "A, B and C each do jobs",
        &[("A", &a_out), ("B", &b_out), ("C", &c_out)],
        joined + Duration::from_secs(3),
    );
    assert!(three.iter().all(|q| !q.is_empty()), "{three:?}");

    // B dies: its queues go to A and C once its heartbeat and leases expire
    // (the ack wait + 2 s).
    let mut b = b;
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    let killed = SystemTime::now();
    println!("B killed:");
    let survivors = owners_after(
        "A and C do every queue's jobs",
        &[("A", &a_out), ("C", &c_out)],
        killed + ACK_WAIT + Duration::from_secs(4),
    );
    let all: BTreeSet<u32> = survivors.iter().flatten().copied().collect();
    assert_eq!(all, (0..QUEUES).collect(), "every queue owned again");
    assert!(survivors.iter().all(|q| !q.is_empty()), "{survivors:?}");

    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let total = published.load(Ordering::Relaxed);
    let done = || -> Vec<Done> {
        let mut all: Vec<Done> = [&a_out, &b_out, &c_out]
            .iter()
            .flat_map(|p| read(p))
            .collect();
        all.sort_by_key(|d| d.at_ns);
        all
    };
    support::wait_for_blocking(
        "every published job is done",
        Duration::from_secs(60),
        || done().iter().map(|d| d.n).collect::<BTreeSet<_>>().len() as u64 == total,
    );
    let done = done();
    let ns: BTreeSet<u64> = done.iter().map(|d| d.n).collect();
    assert_eq!(ns, (0..total).collect(), "no job lost");

    // Per message group, in the order the jobs were done: each the next one,
    // or (only right after itself) the one B finished but could not ack.
    let mut by_group: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for d in &done {
        by_group.entry(d.n % GROUPS).or_default().push(d.n / GROUPS);
    }
    let mut redone = 0;
    for (g, steps) in &by_group {
        let mut last: Option<u64> = None;
        for &s in steps {
            match last {
                Some(l) if s == l => redone += 1,
                Some(l) => assert_eq!(s, l + 1, "group g{g}: step {s} done after step {l}"),
                None => assert_eq!(s, 0, "group g{g} began with step {s}"),
            }
            last = Some(s);
        }
    }
    println!(
        "fifo rebalance: {total} jobs in {GROUPS} groups over 3 processes (one late, one \
         killed), every group in order; {redone} done twice (B's unacked)"
    );
    drop((a, c));
}
