//! Peak shaving (削峰填谷): a front end bursts at 20,000 msg/s, the back end
//! can take 5,000 msg/s; the bus absorbs the burst on disk and the back end
//! drains it at its own pace. Nothing is lost, and memory stays within a
//! bound that does not depend on the backlog: the store's cache plus the
//! in-flight windows (printed beside the measured RSS at the end).
//!
//! Run: `cargo run --release --example peak_shaving` (`-- --help` for options;
//! `-- --nats nats://127.0.0.1:4222` runs it on NATS JetStream).
//! It shows a status line while it runs and a summary at the end, and exits
//! non-zero if any message was lost.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use weirmq::prelude::*;

/// Peak-shaving demo: burst publishing, a rate-limited consumer group.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Producer rate during the burst (messages/s).
    #[arg(long, default_value_t = 20_000)]
    rate: u32,
    /// The consumer group's rate limit (messages/s).
    #[arg(long, default_value_t = 5_000)]
    consume_rate: u32,
    /// Length of the burst in seconds (the drain takes about
    /// rate / consume-rate times longer).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Payload size of each message in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Data directory (default: a fresh temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run on NATS JetStream at this URL instead of the embedded store (the
    /// backlog then waits in the server; use a fresh server or the topic's
    /// old messages count too).
    #[arg(long)]
    nats: Option<String>,
    /// The embedded store's page cache in MiB (BusBuilder::cache_capacity).
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
}

/// The most the bus should hold in memory above the process's baseline,
/// in MiB, for the embedded store (docs/delivery.md, "Memory"): twice its
/// cache (sled counts a cached page by its encoded size; decoded, with the
/// allocator's slack and sled's lazy eviction, it takes up to about twice
/// that), the store's working memory (write buffers, commit batches,
/// allocator arenas of its threads: [`WORKING_MIB`]), one subscription's
/// in-flight window, and the publishes that may wait for a commit (the
/// producer's outstanding batch here, at most `max_pending_messages`).
fn memory_bound_mib(cache_mib: u64, payload: usize, pending: u64) -> f64 {
    let per_message = (payload + 256) as f64; // message, envelope, bookkeeping
    let in_flight = 1024.0 * per_message;
    let waiting = pending.min(65_536) as f64 * per_message * 2.0; // the batch and its encoding
    2.0 * cache_mib as f64 + WORKING_MIB + (in_flight + waiting) / (1024.0 * 1024.0)
}

/// The store's working memory besides its cache, in MiB, as measured
/// (docs/delivery.md, "Memory").
const WORKING_MIB: f64 = 96.0;

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Order {
    seq: u64,
    payload: String,
}

impl Event for Order {
    const TOPIC: &'static str = "peak-orders";
}

/// What the back end has seen: one bit per sequence number.
#[derive(Default)]
struct Seen {
    bits: Mutex<Vec<u64>>,
    distinct: AtomicU64,
    duplicates: AtomicU64,
}

impl Seen {
    fn mark(&self, seq: u64) {
        let mut bits = self.bits.lock().unwrap();
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) == 0 {
            bits[word] |= 1 << bit;
            self.distinct.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The slow back end: a handler actor of the `backend` consumer group.
struct Backend {
    seen: Arc<Seen>,
}

impl Actor for Backend {
    type Context = Context<Self>;
}

impl Handler<Delivery<Order>> for Backend {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, d: Delivery<Order>, _: &mut Context<Self>) -> Self::Result {
        self.seen.mark(d.event().seq);
        Ok(())
    }
}

/// (current, peak) resident memory in MiB, from /proc.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let dir = args.data_dir.clone().unwrap_or_else(|| temp.path().into());
    let target = match &args.nats {
        Some(url) => format!("NATS JetStream at {url}"),
        None => dir.display().to_string(),
    };
    println!(
        "peak shaving: {} msg/s for {} s into {target}, consumer limited to {} msg/s, {} B payloads",
        args.rate, args.seconds, args.consume_rate, args.payload_bytes
    );
    let bus = match &args.nats {
        Some(url) => Bus::builder().nats(url.clone()).open().await?,
        None => {
            Bus::builder()
                .data_dir(&dir)
                .cache_capacity(args.cache_mib * 1024 * 1024)
                .open()
                .await? // fsync'd publishes
        }
    };
    let (baseline_rss, _) = rss_mib();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let sub = bus
        .subscribe::<Order>("backend")
        .start_from(StartFrom::Earliest)
        .rate_limit(args.consume_rate)
        .members(4, move || Backend { seen: s.clone() })
        .start()
        .await?;

    let published = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let burst = Duration::from_secs(args.seconds);

    // The front end: publishes what is due every 10 ms, in batches.
    let producer = {
        let (bus, published) = (bus.clone(), published.clone());
        let (rate, payload) = (args.rate as f64, "x".repeat(args.payload_bytes));
        actix::spawn(async move {
            let mut tick = actix::clock::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                let elapsed = start.elapsed().min(burst);
                let due = (rate * elapsed.as_secs_f64()) as u64;
                let from = published.load(Ordering::Relaxed);
                if due > from {
                    let batch: Vec<Order> = (from..due)
                        .map(|seq| Order {
                            seq,
                            payload: payload.clone(),
                        })
                        .collect();
                    bus.publish_batch(&batch).await?;
                    published.store(due, Ordering::Relaxed);
                }
                if elapsed >= burst {
                    return Ok::<_, weirmq::Error>(());
                }
            }
        })
    };

    // Status: a line updated in place on a terminal, one per second otherwise.
    let tty = std::io::stderr().is_terminal();
    let every = if tty { 250 } else { 1000 };
    let mut peak_backlog = 0;
    let mut last = (Instant::now(), 0u64, 0u64);
    let mut drain_started: Option<(Instant, u64)> = None;
    let expected_drain = args.rate as f64 * args.seconds as f64 / args.consume_rate as f64;
    let deadline =
        start + Duration::from_secs_f64(args.seconds as f64 + expected_drain * 2.0 + 30.0);
    loop {
        actix::clock::sleep(Duration::from_millis(every)).await;
        let p = published.load(Ordering::Relaxed);
        let c = seen.distinct.load(Ordering::Relaxed);
        let backlog = p.saturating_sub(c);
        peak_backlog = peak_backlog.max(backlog);
        let dt = last.0.elapsed().as_secs_f64();
        let (pub_rate, con_rate) = ((p - last.1) as f64 / dt, (c - last.2) as f64 / dt);
        last = (Instant::now(), p, c);
        let (rss, _) = rss_mib();
        let line = format!(
            "{:5.1}s  published {p:>8}  consumed {c:>8}  backlog {backlog:>8}  in {pub_rate:>6.0}/s  out {con_rate:>6.0}/s  RSS {rss:>5.1} MiB",
            start.elapsed().as_secs_f64()
        );
        if tty {
            eprint!("\r{line}");
            std::io::stderr().flush()?;
        } else {
            eprintln!("{line}");
        }
        let burst_over = producer.is_finished();
        if burst_over && drain_started.is_none() {
            drain_started = Some((Instant::now(), c));
        }
        if burst_over && c >= p {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("\ngave up waiting for the backlog to drain");
            break;
        }
    }
    if tty {
        eprintln!();
    }
    producer.await??;
    let total_time = start.elapsed().as_secs_f64();
    sub.drain().await?;
    bus.shutdown().await?;

    let p = published.load(Ordering::Relaxed);
    let c = seen.distinct.load(Ordering::Relaxed);
    let dups = seen.duplicates.load(Ordering::Relaxed);
    let lost = p - c.min(p);
    let (_, peak_rss) = rss_mib();
    let drain_rate = drain_started.map_or(0.0, |(t, c0)| {
        (c - c0) as f64 / t.elapsed().as_secs_f64().max(1e-9)
    });
    println!("summary");
    println!(
        "  published   {p} in {} s ({:.0} msg/s offered)",
        args.seconds,
        p as f64 / args.seconds.max(1) as f64
    );
    println!("  consumed    {c} distinct, {dups} duplicates, lost = {lost}");
    println!("  peak backlog {peak_backlog} messages (held in the store, not in this process)");
    println!(
        "  drain rate  {drain_rate:.0} msg/s after the burst (limit {})",
        args.consume_rate
    );
    if args.nats.is_none() {
        // The producer has at most one batch (10 ms of the rate) outstanding.
        let batch = (args.rate as u64).div_ceil(100);
        let bound = baseline_rss + memory_bound_mib(args.cache_mib, args.payload_bytes, batch);
        println!(
            "  peak RSS    {peak_rss:.1} MiB; bound {bound:.1} MiB = {baseline_rss:.1} at start \
             + 2 x {} cache + {WORKING_MIB} working + windows ({})",
            args.cache_mib,
            if peak_rss <= bound { "within" } else { "OVER" }
        );
    } else {
        println!("  peak RSS    {peak_rss:.1} MiB (the backlog waits in the server)");
    }
    println!("  total time  {total_time:.1} s");
    if lost > 0 {
        return Err(format!("{lost} messages lost").into());
    }
    Ok(())
}
