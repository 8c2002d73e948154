//! Shared helpers for the integration tests: events, recording handlers,
//! temp dirs, and waiting for a condition with a deadline (never a bare sleep).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod backend;

/// Turns each `async fn name(b: Backend)` of the test file into the tests
/// `embedded::name`, `memory::name` and `nats::name`; the names after
/// `durable:` (tests that restart the bus and find what it kept) into
/// `embedded::name` and `nats::name` only. The file imports `Backend` and
/// `init_tracing`; `#[macro_use] mod support;`.
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        on_every_backend!($($name),*; durable:);
    };
    ($($name:ident),* $(,)? ; durable: $($kept:ident),* $(,)?) => {
        mod embedded {
            $(
                #[actix::test]
                async fn $name() {
                    super::init_tracing();
                    super::within_deadline(stringify!($name), super::$name(super::Backend::embedded())).await
                }
            )*
            $(
                #[actix::test]
                async fn $kept() {
                    super::init_tracing();
                    super::within_deadline(stringify!($kept), super::$kept(super::Backend::embedded())).await
                }
            )*
        }
        mod memory {
            $(
                #[actix::test]
                async fn $name() {
                    super::init_tracing();
                    super::within_deadline(stringify!($name), super::$name(super::Backend::memory())).await
                }
            )*
        }
        mod nats {
            $(
                #[actix::test]
                async fn $name() {
                    super::init_tracing();
                    let Some(b) = super::Backend::nats().await else { return };
                    super::within_deadline(stringify!($name), super::$name(b)).await
                }
            )*
            $(
                #[actix::test]
                async fn $kept() {
                    super::init_tracing();
                    let Some(b) = super::Backend::nats().await else { return };
                    super::within_deadline(stringify!($kept), super::$kept(b)).await
                }
            )*
        }
    };
}

use weirmq::prelude::*;

/// A numbered test event.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Num {
    pub n: u64,
}

impl Event for Num {
    const TOPIC: &'static str = "numbers";
}

/// A 4 KiB event (tests that fill a disk or a memory budget).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Blob {
    pub n: u64,
    pub pad: String,
}

impl Event for Blob {
    const TOPIC: &'static str = "blobs";
}

/// Blob number `n`.
pub fn blob(n: u64) -> Blob {
    Blob {
        n,
        pad: "x".repeat(4096),
    }
}

/// Logs to the test writer when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// An example binary of this package, next to the running test's in the
/// target directory (`cargo test` builds the examples).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("examples").join(name)
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("weirmq-test-")
        .tempdir()
        .expect("temp dir")
}

/// How long one test may take before it counts as hung (the
/// conformance suite and the NATS test files wrap every test in
/// [`within_deadline`]; each takes well under a minute today).
pub const TEST_DEADLINE: Duration = Duration::from_secs(240);

/// Runs a test's body, failing it (naming it) if it has not finished
/// within [`TEST_DEADLINE`]: a hang fails the one test, with its name,
/// instead of stalling the whole run until CI's own limit.
pub async fn within_deadline<F: Future<Output = ()>>(name: &str, body: F) {
    if actix::clock::timeout(TEST_DEADLINE, body).await.is_err() {
        panic!("{name} did not finish within {TEST_DEADLINE:?}: it hung");
    }
}

/// Polls `cond` until it holds or `deadline` passes; panics with `what` then.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !holds_within(deadline, cond).await {
        panic!("timed out after {deadline:?} waiting until {what}");
    }
}

/// Polls `cond` until it holds (`true`) or `deadline` passes (`false`), for
/// a test that reports a timeout itself.
pub async fn holds_within<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
}

/// What a recording handler saw: (member, n, attempt) per delivery.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<(usize, u64, u32)>>>);

impl Log {
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn entries(&self) -> Vec<(usize, u64, u32)> {
        self.0.lock().unwrap().clone()
    }
    /// How many times each n was seen.
    pub fn counts(&self) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for (_, n, _) in self.0.lock().unwrap().iter() {
            *m.entry(*n).or_default() += 1;
        }
        m
    }
}

/// What a recording handler does with a delivery.
pub type Behaviour = Arc<dyn Fn(&Delivery<Num>) -> Result<(), HandlerError> + Send + Sync>;

/// Records every delivery it handles, then applies `behaviour`.
pub struct Recorder {
    pub member: usize,
    pub log: Log,
    pub behaviour: Behaviour,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Recorder {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.log
            .0
            .lock()
            .unwrap()
            .push((self.member, d.event().n, d.attempt()));
        (self.behaviour)(&d)
    }
}

/// A factory of recorders numbered 0, 1, 2, ... (restarted members get new numbers).
pub fn recorders(log: &Log, behaviour: Behaviour) -> impl Fn() -> Recorder + 'static {
    let log = log.clone();
    let next = Arc::new(Mutex::new(0usize));
    move || {
        let mut n = next.lock().unwrap();
        *n += 1;
        Recorder {
            member: *n - 1,
            log: log.clone(),
            behaviour: behaviour.clone(),
        }
    }
}

pub fn ack_all() -> Behaviour {
    Arc::new(|_| Ok(()))
}

/// Sum of lag over all queues of the group.
pub async fn lag(bus: &Bus, group: &str, topic: &str) -> u64 {
    bus.positions(group, topic)
        .await
        .expect("positions")
        .iter()
        .map(|p| p.lag)
        .sum()
}

/// Waits (up to 60 s) until the group has settled everything in the topic:
/// no lag, nothing in flight, no retry scheduled.
pub async fn caught_up(bus: &Bus, group: &str, topic: &str) {
    wait_until(
        &format!("group {group} has settled everything on {topic}"),
        Duration::from_secs(60),
        || async move {
            let stats = bus.group_stats(group, topic).await;
            stats.in_flight == 0
                && stats.scheduled_retries == 0
                && lag(bus, group, topic).await == 0
        },
    )
    .await;
}

/// Waits (up to 120 s) until `log` holds at least `n` deliveries.
pub async fn delivered(log: &Log, n: usize) {
    wait_until(
        &format!("{n} deliveries were handled"),
        Duration::from_secs(120),
        || {
            let len = log.len();
            async move { len >= n }
        },
    )
    .await;
}

/// `main` of a `harness = false` test that re-executes itself as its own
/// child process: with `child_env` set it is the child and runs `child`
/// with that value; otherwise it runs `test` (named `name`, so a
/// `cargo test <filter>` that does not match skips it) and prints a
/// libtest-like summary labelled `label`.
pub fn self_exec_main(
    name: &str,
    label: &str,
    child_env: &str,
    child: impl FnOnce(String),
    test: impl FnOnce(),
) {
    if let Ok(value) = std::env::var(child_env) {
        child(value);
        return;
    }
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
        println!("{label}: 0 passed, 0 failed");
        return;
    }
    test();
    println!("{label}: 1 passed, 0 failed");
}

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves no worker behind.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Blocks until `cond` holds, polling every 10 ms; fails the test naming
/// `what` after `deadline` (for tests that run no async runtime).
pub fn wait_for_blocking(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
