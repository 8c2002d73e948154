//! weirmq's benchmark harness.
//!
//! Runs named scenarios and prints one JSON object per line per result:
//! `{"scenario", "messages", "payload_bytes", "msgs_per_sec", "p50_us",
//! "p99_us", "p999_us", "peak_rss_mb", "baseline"}`. Baselines (raw sled,
//! raw actix mailbox, and NATS JetStream as a peer) are measured in the same
//! run, so figures can be quoted as ratios on a noisy machine.
//!
//! `cargo run --release -p weirmq-bench -- --quick` (see BENCHMARKS.md).

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use weirmq::prelude::*;

/// Benchmark scenarios for weirmq, with baselines measured in the same run.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Small sizes: a full run in well under 2 minutes (for CI).
    #[arg(long)]
    quick: bool,
    /// Run only scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Skip the NATS scenarios, weirmq's NATS backend and the JetStream
    /// peer (they need `nats-server` on the PATH).
    #[arg(long)]
    no_peer: bool,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// List the scenario names and exit.
    #[arg(long)]
    list: bool,
    /// Run exactly this scenario in this process (used by the harness itself).
    #[arg(long)]
    scenario: Option<String>,
}

/// One result line.
#[derive(Serialize, Debug)]
struct Res {
    scenario: String,
    messages: u64,
    payload_bytes: usize,
    msgs_per_sec: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    peak_rss_mb: f64,
    baseline: bool,
    /// Size of the data directory at the end of the scenario (where it
    /// matters: retention).
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir_mb: Option<f64>,
    /// The data directory before the measured step (retention).
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir_mb_before: Option<f64>,
    /// The memory bound docs/delivery.md states for the scenario's
    /// settings ("Memory": the RSS at start + 2 × cache + 96 MiB working
    /// memory + the in-flight window); the scenario fails above it.
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_bound_mb: Option<f64>,
}

impl Res {
    fn new(scenario: &str, messages: u64, payload: usize, elapsed: Duration) -> Res {
        Res {
            scenario: scenario.to_string(),
            messages,
            payload_bytes: payload,
            msgs_per_sec: (messages as f64 / elapsed.as_secs_f64()).round(),
            p50_us: None,
            p99_us: None,
            p999_us: None,
            peak_rss_mb: rss_mb(),
            baseline: false,
            data_dir_mb: None,
            data_dir_mb_before: None,
            rss_bound_mb: None,
        }
    }

    fn latencies(mut self, mut us: Vec<u32>) -> Res {
        if !us.is_empty() {
            us.sort_unstable();
            let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize] as f64;
            self.p50_us = Some(at(0.50));
            self.p99_us = Some(at(0.99));
            self.p999_us = Some(at(0.999));
        }
        self
    }

    fn baseline(mut self) -> Res {
        self.baseline = true;
        self
    }

    fn print(&self) {
        println!("{}", serde_json::to_string(self).expect("json"));
    }
}

/// Peak resident memory of this process (each scenario runs in its own).
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1024.0 * 10.0).round() / 10.0)
}

/// Nanoseconds since the harness started: the send time travels in events.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn since_us(sent_ns: u64) -> u32 {
    ((now_ns().saturating_sub(sent_ns)) / 1000).min(u32::MAX as u64) as u32
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct BenchEvent {
    sent_ns: u64,
    pad: String,
}

impl Event for BenchEvent {
    const TOPIC: &'static str = "bench";
}

/// Records end-to-end latency and counts deliveries.
struct Sink {
    count: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u32>>>,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Delivery<BenchEvent>> for Sink {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<BenchEvent>, _: &mut Context<Self>) -> Self::Result {
        let us = since_us(d.event().sent_ns);
        self.lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Store {
    Memory,
    Buffered,
    Flushed,
    /// weirmq on NATS JetStream (a server of the scenario's own).
    Nats,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Buffered => "buffered",
            Store::Flushed => "flushed",
            Store::Nats => "nats",
        }
    }
}

#[derive(Debug, Clone)]
struct Run {
    name: String,
    store: Store,
    publishers: usize,
    batch: usize,
    messages: u64,
    groups: usize,
    queues: u32,
    payload: usize,
}

/// A bus on `store`; for NATS, with the server it runs on (keep it alive).
async fn open_on(store: Store, dir: &Path) -> (Bus, Option<NatsServer>) {
    let b = Bus::builder();
    let (b, server) = match store {
        Store::Memory => (b.in_memory().durability(Durability::Buffered), None),
        Store::Buffered => (b.data_dir(dir).durability(Durability::Buffered), None),
        Store::Flushed => (b.data_dir(dir).durability(Durability::Flushed), None),
        Store::Nats => {
            let server = start_nats()
                .await
                .expect("nats-server for the NATS backend");
            let mut config = weirmq::nats::NatsConfig::new(server.url.clone());
            // WEIRMQ_NATS_SCHEDULES=1: delay with the server's message
            // schedules (2.12+) instead of the forwarder, to compare the two
            // paths on one server.
            config.use_message_schedules =
                std::env::var("WEIRMQ_NATS_SCHEDULES").is_ok_and(|v| v == "1");
            (b.nats_config(config), Some(server))
        }
    };
    (b.open().await.expect("open bus"), server)
}

async fn open(store: Store, dir: &Path) -> Bus {
    assert!(store != Store::Nats, "use open_on for NATS");
    open_on(store, dir).await.0
}

/// Publishes `messages` from `publishers` tasks (single or batch publishes),
/// optionally with `groups` consumer groups; reports throughput and latency
/// (per publish call without groups, end to end with them).
async fn weirmq_run(r: Run) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, _server) = open_on(r.store, dir.path()).await;
    bus.create_topic(TopicConfig::new(BenchEvent::TOPIC).queues(r.queues))
        .await
        .expect("topic");
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(r.messages as usize)));
    let mut subs = Vec::new();
    for g in 0..r.groups {
        let (c, l) = (count.clone(), lat.clone());
        subs.push(
            bus.subscribe::<BenchEvent>(format!("group-{g}"))
                .max_in_flight(4096)
                .max_in_flight_per_member(64)
                .members(4, move || Sink {
                    count: c.clone(),
                    lat: l.clone(),
                })
                .start()
                .await
                .expect("subscribe"),
        );
    }
    let pad = "x".repeat(r.payload.saturating_sub(30));
    let per = r.messages / r.publishers as u64;
    let total = per * r.publishers as u64;
    let publish_lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..r.publishers {
        let (bus, pad, pl) = (bus.clone(), pad.clone(), publish_lat.clone());
        let batch = r.batch;
        tasks.push(actix::spawn(async move {
            let mut mine = Vec::new();
            let mut sent = 0;
            while sent < per {
                let n = (batch as u64).min(per - sent);
                let t = now_ns();
                if batch == 1 {
                    let e = BenchEvent {
                        sent_ns: t,
                        pad: pad.clone(),
                    };
                    bus.publish(&e).await.expect("publish");
                } else {
                    let events: Vec<BenchEvent> = (0..n)
                        .map(|_| BenchEvent {
                            sent_ns: t,
                            pad: pad.clone(),
                        })
                        .collect();
                    bus.publish_batch(&events).await.expect("publish");
                }
                mine.push(since_us(t));
                sent += n;
            }
            pl.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let expected = total * r.groups as u64;
    while count.load(Ordering::Relaxed) < expected {
        actix::clock::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = start.elapsed();
    let res = Res::new(&r.name, total, r.payload, elapsed);
    let lats = if r.groups > 0 {
        std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()))
    } else {
        std::mem::take(&mut *publish_lat.lock().unwrap_or_else(|p| p.into_inner()))
    };
    for s in subs {
        s.drain().await.expect("drain");
    }
    bus.shutdown().await.expect("shutdown");
    res.latencies(lats)
}

/// End-to-end latency at a fixed offered load: independent single publishes
/// paced every millisecond.
async fn fixed_load(name: &str, store: Store, rate: u64, secs: f64, payload: usize) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, _server) = open_on(store, dir.path()).await;
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (c, l) = (count.clone(), lat.clone());
    let sub = bus
        .subscribe::<BenchEvent>("latency")
        .members(4, move || Sink {
            count: c.clone(),
            lat: l.clone(),
        })
        .start()
        .await
        .expect("subscribe");
    let pad = "x".repeat(payload.saturating_sub(30));
    let total = (rate as f64 * secs) as u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = actix::clock::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let (bus, e) = (
                bus.clone(),
                BenchEvent {
                    sent_ns: now_ns(),
                    pad: pad.clone(),
                },
            );
            actix::spawn(async move {
                bus.publish(&e).await.expect("publish");
            });
            sent += 1;
        }
    }
    while count.load(Ordering::Relaxed) < total {
        actix::clock::sleep(Duration::from_micros(200)).await;
    }
    let res = Res::new(name, total, payload, start.elapsed());
    let lats = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
    sub.drain().await.expect("drain");
    bus.shutdown().await.expect("shutdown");
    res.latencies(lats)
}

/// Builds a backlog of `n` messages behind a group limited to 5,000 msg/s
/// and reports the process's peak RSS; checks nothing was lost.
async fn peak_shaving_rss(name: &str, n: u64, payload: usize) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = open(Store::Buffered, dir.path()).await;
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (c, l) = (count.clone(), lat.clone());
    let sub = bus
        .subscribe::<BenchEvent>("backend")
        .rate_limit(5000)
        .members(4, move || Sink {
            count: c.clone(),
            lat: l.clone(),
        })
        .start()
        .await
        .expect("subscribe");
    let start = Instant::now();
    publish_in_batches(&bus, n, payload).await;
    let elapsed = start.elapsed();
    let stored: u64 = bus
        .positions("backend", BenchEvent::TOPIC)
        .await
        .expect("positions")
        .iter()
        .map(|p| p.max)
        .sum();
    assert_eq!(stored, n, "messages lost in the peak-shaving scenario");
    let res = Res::new(name, n, payload, elapsed);
    sub.drain().await.expect("drain");
    bus.shutdown().await.expect("shutdown");
    res
}

/// The store's cache in the drain scenario: small, so that the backlog is
/// many times the cache and the bound is tight.
const DRAIN_CACHE_MIB: u64 = 16;

/// A backlog of `n` messages written with no consumer, then read back from
/// the store and consumed by a group starting at the earliest offset, with
/// a 16 MiB cache: peak RSS against the bound docs/delivery.md states.
/// Throughput is the drain's.
async fn backlog_drain_rss(name: &str, n: u64, payload: usize) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = Bus::builder()
        .data_dir(dir.path())
        .durability(Durability::Buffered)
        .cache_capacity(DRAIN_CACHE_MIB * 1024 * 1024)
        .open()
        .await
        .expect("open bus");
    let start_rss = rss_mb();
    publish_in_batches(&bus, n, payload).await;
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (c, l) = (count.clone(), lat.clone());
    let start = Instant::now();
    let sub = bus
        .subscribe::<BenchEvent>("backend")
        .start_from(StartFrom::Earliest)
        .members(4, move || Sink {
            count: c.clone(),
            lat: l.clone(),
        })
        .start()
        .await
        .expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(600);
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "drained {} of {n} in 600 s",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut res = Res::new(name, n, payload, start.elapsed());
    // The default in-flight window (1,024) of decoded messages.
    let window_mb = 1024.0 * (payload + 256) as f64 / (1024.0 * 1024.0);
    res.rss_bound_mb = Some(start_rss + 2.0 * DRAIN_CACHE_MIB as f64 + 96.0 + window_mb);
    sub.drain().await.expect("drain");
    bus.shutdown().await.expect("shutdown");
    res
}

/// Publishes `n` events of `payload` bytes in batches of 1,000, as fast as
/// the bus takes them.
async fn publish_in_batches(bus: &Bus, n: u64, payload: usize) {
    let pad = "x".repeat(payload.saturating_sub(30));
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        let events: Vec<BenchEvent> = (0..k)
            .map(|_| BenchEvent {
                sent_ns: now_ns(),
                pad: pad.clone(),
            })
            .collect();
        bus.publish_batch(&events).await.expect("publish");
        sent += k;
    }
}

fn dir_mb(p: &Path) -> f64 {
    fn bytes(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => bytes(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    (bytes(p) as f64 / (1 << 20) as f64 * 10.0).round() / 10.0
}

/// 64 publishers, single publishes of `n` messages in all; per-publish
/// latencies.
async fn publish_p64(bus: &Bus, n: u64, payload: usize) -> (Duration, Vec<u32>) {
    let pad = "x".repeat(payload.saturating_sub(30));
    let per = n / 64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (bus, pad) = (bus.clone(), pad.clone());
            actix::spawn(async move {
                let mut lat = Vec::with_capacity(per as usize);
                for _ in 0..per {
                    let t = now_ns();
                    bus.publish(&BenchEvent {
                        sent_ns: t,
                        pad: pad.clone(),
                    })
                    .await
                    .expect("publish");
                    lat.push(since_us(t));
                }
                lat
            })
        })
        .collect();
    let mut lats = Vec::new();
    for t in tasks {
        lats.extend(t.await.expect("publisher"));
    }
    (start.elapsed(), lats)
}

/// Retention under load: a backlog of `n` messages expires while 64
/// publishers publish `live` more. Prints three lines: the publishers
/// without a cleaner running (baseline, same store, same run), the same
/// publishers while the cleaner removes the backlog, and the cleaner itself
/// (messages removed per second; data directory before the pass and after
/// the same amount was written again — the freed space is reused).
async fn retention_under_load(name: &str, n: u64, live: u64, payload: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = open(Store::Buffered, dir.path()).await;
    bus.create_topic(TopicConfig::new(BenchEvent::TOPIC).retention(Retention::forever()))
        .await
        .expect("topic");
    let pad = "x".repeat(payload.saturating_sub(30));
    let fill = |bus: Bus, pad: String| async move {
        let mut sent = 0;
        while sent < n {
            let k = 1000.min(n - sent);
            let events: Vec<BenchEvent> = (0..k)
                .map(|_| BenchEvent {
                    sent_ns: 0,
                    pad: pad.clone(),
                })
                .collect();
            bus.publish_batch(&events).await.expect("publish");
            sent += k;
        }
    };
    fill(bus.clone(), pad.clone()).await;
    let (t, lats) = publish_p64(&bus, live, payload).await;
    Res::new(&format!("{name}/publish_p64_no_cleaner"), live, payload, t)
        .latencies(lats)
        .baseline()
        .print();
    // Everything stored so far expires; what is published from now on stays.
    // (Retention removes whole index spans, which cover at most 100 ms of
    // publish time: leave that gap so no span mixes the two.)
    let last = std::time::SystemTime::now();
    while std::time::SystemTime::now() < last + Duration::from_millis(150) {
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let cut = std::time::SystemTime::now();
    while std::time::SystemTime::now() < cut + Duration::from_millis(20) {
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let before = dir_mb(dir.path());
    bus.create_topic(
        TopicConfig::new(BenchEvent::TOPIC).retention(
            Retention::forever().max_age(
                std::time::SystemTime::now()
                    .duration_since(cut)
                    .unwrap_or_default(),
            ),
        ),
    )
    .await
    .expect("configure");
    let cleaner = {
        let bus = bus.clone();
        actix::spawn(async move {
            let t = Instant::now();
            let r = bus.enforce_retention().await.expect("retention");
            (t.elapsed(), r)
        })
    };
    let (t, lats) = publish_p64(&bus, live, payload).await;
    Res::new(
        &format!("{name}/publish_p64_while_cleaning"),
        live,
        payload,
        t,
    )
    .latencies(lats)
    .print();
    let (ct, report) = cleaner.await.expect("cleaner");
    let expired = n + live / 64 * 64;
    assert_eq!(
        report.messages, expired,
        "retention removed {} of {expired} expired messages",
        report.messages
    );
    fill(bus.clone(), pad).await;
    let mut r = Res::new(&format!("{name}/cleaner"), report.messages, payload, ct);
    r.data_dir_mb_before = Some(before);
    r.data_dir_mb = Some(dir_mb(dir.path()));
    r.print();
    bus.shutdown().await.expect("shutdown");
}

/// Records how late each delayed message arrived (µs after its due time;
/// for a message without a delay, after its publish).
struct LateSink {
    count: Arc<AtomicU64>,
    lat: Arc<Mutex<Vec<u32>>>,
}

impl Actor for LateSink {
    type Context = Context<Self>;
}

impl Handler<Delivery<BenchEvent>> for LateSink {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<BenchEvent>, _: &mut Context<Self>) -> Self::Result {
        let us = match d.message().deliver_at() {
            Some(due) => std::time::SystemTime::now()
                .duration_since(due)
                .map_or(0, |late| late.as_micros().min(u32::MAX as u128) as u32),
            None => since_us(d.event().sent_ns),
        };
        self.lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Delayed-message precision: `n` messages due over a `spread`, published
/// at once from 64 tasks; the latencies are how late each arrived after its
/// due time. The baseline, in the same run: the same messages without a
/// delay (publish to handler).
async fn delay_lateness(name: &str, store: Store, n: u64, spread: Duration, payload: usize) {
    for delayed in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (bus, _server) = open_on(store, dir.path()).await;
        let count = Arc::new(AtomicU64::new(0));
        let lat = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
        let (c, l) = (count.clone(), lat.clone());
        let sub = bus
            .subscribe::<BenchEvent>("late")
            .max_in_flight(4096)
            .max_in_flight_per_member(64)
            .members(4, move || LateSink {
                count: c.clone(),
                lat: l.clone(),
            })
            .start()
            .await
            .expect("subscribe");
        let pad = "x".repeat(payload.saturating_sub(30));
        let start = Instant::now();
        let base = std::time::SystemTime::now() + Duration::from_millis(200);
        let per = n / 64;
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let (bus, pad) = (bus.clone(), pad.clone());
                actix::spawn(async move {
                    for i in 0..per {
                        let mut opts = Publish::new();
                        if delayed {
                            let k = i * 64 + t;
                            let at = spread.as_micros() as u64 * k / (per * 64);
                            opts = opts.deliver_at(base + Duration::from_micros(at));
                        }
                        bus.publish_with(
                            &BenchEvent {
                                sent_ns: now_ns(),
                                pad: pad.clone(),
                            },
                            opts,
                        )
                        .await
                        .expect("publish");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("publisher");
        }
        let total = per * 64;
        while count.load(Ordering::Relaxed) < total {
            actix::clock::sleep(Duration::from_micros(200)).await;
        }
        let lats = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
        let label = if delayed {
            format!("{name}/lateness_after_due")
        } else {
            format!("{name}/no_delay_e2e")
        };
        let r = Res::new(&label, total, payload, start.elapsed()).latencies(lats);
        if delayed {
            r.print()
        } else {
            r.baseline().print()
        }
        sub.drain().await.expect("drain");
        bus.shutdown().await.expect("shutdown");
    }
}

// ---------------------------------------------------------------- baselines

fn sled_baseline(name: &str, dir: &Path, n: u64, payload: usize, batch: usize, flush: bool) -> Res {
    let db = sled::open(dir).expect("sled");
    let tree = db.open_tree("bench").expect("tree");
    let value = vec![7u8; payload];
    let start = Instant::now();
    let mut i = 0u64;
    while i < n {
        if batch == 1 {
            tree.insert(i.to_be_bytes(), value.as_slice())
                .expect("insert");
            i += 1;
        } else {
            let mut b = sled::Batch::default();
            for _ in 0..batch.min((n - i) as usize) {
                b.insert(&i.to_be_bytes(), value.as_slice());
                i += 1;
            }
            tree.apply_batch(b).expect("batch");
            if flush {
                db.flush().expect("flush");
            }
        }
    }
    Res::new(name, n, payload, start.elapsed()).baseline()
}

#[derive(actix::Message)]
#[rtype(result = "()")]
struct Ping;

struct Counter(u64, u64, Option<tokio::sync::oneshot::Sender<()>>);

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<Ping> for Counter {
    type Result = ();
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) {
        self.0 += 1;
        if self.0 == self.1 {
            if let Some(tx) = self.2.take() {
                let _ = tx.send(());
            }
        }
    }
}

async fn actix_baseline(name: &str, n: u64) -> Res {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let addr = Counter(0, n, Some(tx)).start();
    let start = Instant::now();
    for _ in 0..n {
        addr.do_send(Ping);
    }
    rx.await.expect("counter");
    Res::new(name, n, 0, start.elapsed()).baseline()
}

// ---------------------------------------------------------------- NATS peer

struct NatsServer {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start_nats() -> Result<NatsServer, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port();
    // WEIRMQ_NATS_SERVER: another server binary (e.g. a newer version).
    let binary = std::env::var("WEIRMQ_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let child = tokio::process::Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start nats-server (install it, or pass --no-peer): {e}"))?;
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("nats-server did not start listening within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(NatsServer {
        child,
        url,
        _dir: dir,
    })
}

/// JetStream with file storage: pipelined publishes (256 acks in flight), a
/// durable pull consumer fetching batches with explicit acks. With
/// `offered = Some(rate)`, publishes are paced at that rate instead (for
/// latency at a fixed load).
async fn nats_peer(
    url: &str,
    name: &str,
    n: u64,
    payload: usize,
    consume: bool,
    offered: Option<u64>,
) -> Result<Res, async_nats::Error> {
    use async_nats::jetstream::{self, consumer, stream};
    use futures::StreamExt;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let stream_name = format!("BENCH{}", now_ns());
    let s = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{stream_name}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let subject = format!("{stream_name}.events");
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let consumer_task = if consume {
        let c: consumer::PullConsumer = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 4096,
                ..Default::default()
            })
            .await?;
        let lat = lat.clone();
        Some(tokio::spawn(async move {
            let mut msgs = c.stream().max_messages_per_batch(256).messages().await?;
            let mut got = 0;
            while got < n {
                let Some(m) = msgs.next().await else { break };
                let m = m?;
                let sent = u64::from_be_bytes(m.payload[..8].try_into().unwrap_or([0; 8]));
                lat.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(since_us(sent));
                m.ack().await?;
                got += 1;
            }
            Ok::<_, async_nats::Error>(())
        }))
    } else {
        None
    };
    let start = Instant::now();
    let mut acks = std::collections::VecDeque::with_capacity(256);
    let mut publish_lat = Vec::with_capacity(n as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for i in 0..n {
        if let Some(rate) = offered {
            while (start.elapsed().as_secs_f64() * rate as f64) < i as f64 {
                tick.tick().await;
            }
        }
        let t = now_ns();
        let mut body = t.to_be_bytes().to_vec();
        body.resize(payload.max(8), b'x');
        acks.push_back((t, js.publish(subject.clone(), body.into()).await?));
        if acks.len() >= 256 {
            if let Some((t, ack)) = acks.pop_front() {
                ack.await?;
                publish_lat.push(since_us(t));
            }
        }
    }
    for (t, ack) in acks {
        ack.await?;
        publish_lat.push(since_us(t));
    }
    if let Some(task) = consumer_task {
        task.await??;
    }
    let res = Res::new(name, n, payload, start.elapsed()).baseline();
    let lats = if consume {
        std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()))
    } else {
        publish_lat
    };
    js.delete_stream(&stream_name).await?;
    Ok(res.latencies(lats))
}

// ---------------------------------------------------------------- main

fn scale(quick: bool, full: u64) -> u64 {
    if quick {
        (full / 10).max(1000)
    } else {
        full
    }
}

/// What a scenario runs.
#[derive(Debug, Clone)]
enum Scenario {
    Sled {
        batch: usize,
        flush: bool,
        n: u64,
    },
    Actix {
        n: u64,
    },
    Weirmq(Run),
    FixedLoad {
        store: Store,
        rate: u64,
        secs: f64,
    },
    PeakShaving {
        n: u64,
    },
    /// A backlog of `n` written first, then read back and consumed.
    DrainRss {
        n: u64,
    },
    Retention {
        n: u64,
        live: u64,
    },
    Delay {
        store: Store,
        n: u64,
        spread: Duration,
    },
    Nats {
        consume: bool,
        n: u64,
        offered: Option<u64>,
    },
}

/// Every scenario, in the order they run.
fn scenarios(q: bool, payload: usize) -> Vec<(String, Scenario)> {
    let mut v: Vec<(String, Scenario)> = Vec::new();
    for (name, batch, flush, n) in [
        ("baseline/sled/insert", 1, false, scale(q, 300_000)),
        (
            "baseline/sled/apply_batch_1000",
            1000,
            false,
            scale(q, 1_000_000),
        ),
        (
            "baseline/sled/apply_batch_1000+flush",
            1000,
            true,
            scale(q, 1_000_000),
        ),
    ] {
        v.push((name.into(), Scenario::Sled { batch, flush, n }));
    }
    v.push((
        "baseline/actix/do_send_same_arbiter".into(),
        Scenario::Actix {
            n: scale(q, 5_000_000),
        },
    ));
    for store in [Store::Memory, Store::Buffered, Store::Flushed] {
        let s = store.name();
        let (n1, n64, nb) = match store {
            Store::Memory => (scale(q, 100_000), scale(q, 500_000), scale(q, 2_000_000)),
            Store::Buffered => (scale(q, 50_000), scale(q, 300_000), scale(q, 2_000_000)),
            Store::Flushed | Store::Nats => {
                (scale(q, 10_000), scale(q, 300_000), scale(q, 1_000_000))
            }
        };
        for (groups, kind) in [(0, "publish"), (1, "e2e")] {
            for (publishers, batch, n, shape) in [
                (1, 1, n1, "p1/single"),
                (64, 1, n64, "p64/single"),
                (4, 256, nb, "p4/batch256"),
            ] {
                let name = format!("{kind}/{s}/{shape}");
                v.push((
                    name.clone(),
                    Scenario::Weirmq(Run {
                        name,
                        store,
                        publishers,
                        batch,
                        messages: n,
                        groups,
                        queues: 4,
                        payload,
                    }),
                ));
            }
        }
    }
    // weirmq on NATS JetStream, beside the embedded store above and the raw
    // JetStream peer below (same server build, same payload).
    for (groups, kind) in [(0, "publish"), (1, "e2e")] {
        for (publishers, batch, n, shape) in [
            (64, 1, scale(q, 100_000), "p64/single"),
            (4, 256, scale(q, 300_000), "p4/batch256"),
        ] {
            let name = format!("{kind}/nats/{shape}");
            v.push((
                name.clone(),
                Scenario::Weirmq(Run {
                    name,
                    store: Store::Nats,
                    publishers,
                    batch,
                    messages: n,
                    groups,
                    queues: 4,
                    payload,
                }),
            ));
        }
    }
    v.push((
        "latency/nats/offered_10k".into(),
        Scenario::FixedLoad {
            store: Store::Nats,
            rate: 10_000,
            secs: if q { 2.0 } else { 10.0 },
        },
    ));
    for (queues, groups, name) in [
        (1, 1, "e2e/buffered/p64/single/queues1"),
        (4, 1, "e2e/buffered/p64/single/queues4"),
        (4, 4, "fanout4/buffered/p64/single"),
    ] {
        v.push((
            name.into(),
            Scenario::Weirmq(Run {
                name: name.into(),
                store: Store::Buffered,
                publishers: 64,
                batch: 1,
                messages: scale(q, 200_000),
                groups,
                queues,
                payload,
            }),
        ));
    }
    for store in [Store::Flushed, Store::Buffered] {
        v.push((
            format!("latency/{}/offered_10k", store.name()),
            Scenario::FixedLoad {
                store,
                rate: 10_000,
                secs: if q { 2.0 } else { 10.0 },
            },
        ));
    }
    v.push((
        "delay".into(),
        Scenario::Delay {
            store: Store::Buffered,
            n: scale(q, 100_000),
            spread: Duration::from_secs(if q { 1 } else { 5 }),
        },
    ));
    // On NATS: weirmq's forwarder, or the server's message schedules with
    // WEIRMQ_NATS_SCHEDULES=1 on 2.12+ (WEIRMQ_NATS_SERVER picks the binary).
    v.push((
        "delay/nats".into(),
        Scenario::Delay {
            store: Store::Nats,
            n: scale(q, 20_000),
            spread: Duration::from_secs(if q { 1 } else { 5 }),
        },
    ));
    v.push((
        "retention".into(),
        Scenario::Retention {
            n: scale(q, 1_000_000),
            live: scale(q, 200_000),
        },
    ));
    v.push((
        "peak_shaving/backlog_rss".into(),
        Scenario::PeakShaving {
            n: if q { 200_000 } else { 1_000_000 },
        },
    ));
    v.push((
        "peak_shaving/drain_rss".into(),
        Scenario::DrainRss {
            n: if q { 300_000 } else { 1_000_000 },
        },
    ));
    for (name, consume) in [
        ("peer/nats/publish/p1/pipelined256", false),
        ("peer/nats/e2e/p1/pipelined256", true),
    ] {
        v.push((
            name.into(),
            Scenario::Nats {
                consume,
                n: scale(q, 300_000),
                offered: None,
            },
        ));
    }
    v.push((
        "peer/nats/latency/offered_10k".into(),
        Scenario::Nats {
            consume: true,
            n: if q { 20_000 } else { 100_000 },
            offered: Some(10_000),
        },
    ));
    v
}

/// Runs one scenario in this process and prints its line.
fn run_one(name: &str, scenario: Scenario, payload: usize) -> Result<(), String> {
    match scenario {
        Scenario::Sled { batch, flush, n } => {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            sled_baseline(name, dir.path(), n, payload, batch, flush).print();
        }
        Scenario::Nats {
            consume,
            n,
            offered,
        } => {
            // current_thread measured faster for async-nats here than a
            // 2-worker multi-thread runtime (~90k vs ~81k msg/s end to end).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let server = start_nats().await?;
                nats_peer(&server.url, name, n, payload, consume, offered)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?
                    .print();
                Ok::<_, String>(())
            })?;
        }
        other => actix::System::new().block_on(async move {
            match other {
                Scenario::Actix { n } => actix_baseline(name, n).await.print(),
                Scenario::Weirmq(r) => weirmq_run(r).await.print(),
                Scenario::FixedLoad { store, rate, secs } => {
                    fixed_load(name, store, rate, secs, payload).await.print()
                }
                Scenario::PeakShaving { n } => peak_shaving_rss(name, n, payload).await.print(),
                Scenario::DrainRss { n } => {
                    let res = backlog_drain_rss(name, n, payload).await;
                    res.print();
                    let bound = res.rss_bound_mb.unwrap_or(f64::INFINITY);
                    if res.peak_rss_mb > bound {
                        return Err(format!(
                            "peak RSS {} MiB above the documented bound {bound:.1} MiB",
                            res.peak_rss_mb
                        ));
                    }
                }
                Scenario::Retention { n, live } => {
                    retention_under_load(name, n, live, payload).await
                }
                Scenario::Delay { store, n, spread } => {
                    delay_lateness(name, store, n, spread, payload).await
                }
                Scenario::Sled { .. } | Scenario::Nats { .. } => unreachable!("handled above"),
            }
            Ok::<_, String>(())
        })?,
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    now_ns();
    let all = scenarios(args.quick, args.payload_bytes);
    if let Some(name) = &args.scenario {
        let Some((_, s)) = all.into_iter().find(|(n, _)| n == name) else {
            eprintln!("no scenario named `{name}` (run with --list)");
            std::process::exit(2);
        };
        if let Err(e) = run_one(name, s, args.payload_bytes) {
            eprintln!("{name}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let wanted: Vec<String> = all
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| args.only.as_deref().is_none_or(|o| n.contains(o)))
        .filter(|n| !(args.no_peer && (n.starts_with("peer/") || n.contains("/nats/"))))
        .collect();
    if args.list {
        for n in wanted {
            println!("{n}");
        }
        return;
    }
    // Each scenario runs in its own process: its RSS is its own, and one
    // scenario's allocations do not slow the next.
    let exe = std::env::current_exe().expect("current exe");
    let mut failed = Vec::new();
    for name in wanted {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["--scenario", &name, "--payload-bytes"])
            .arg(args.payload_bytes.to_string());
        if args.quick {
            cmd.arg("--quick");
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("scenario {name} failed: {other:?}");
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        eprintln!("{} scenario(s) failed: {}", failed.len(), failed.join(", "));
        std::process::exit(1);
    }
}
