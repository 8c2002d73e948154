//! weirmq's benchmark harness.
//!
//! Runs named scenarios and prints one JSON object per line per result:
//! `{"scenario", "messages", "payload_bytes", "msgs_per_sec", "p50_us",
//! "p99_us", "p999_us", "peak_rss_mb", "cpu_us_per_msg", "baseline"}`. Baselines (raw sled,
//! raw actix mailbox, raw file append + fdatasync) and peers (NATS
//! JetStream, Redis Streams, a RabbitMQ quorum queue) are measured in the
//! same run, so figures can be quoted as ratios on a noisy machine.
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

mod alloc;
mod baselines;
mod drive;
mod lifecycle;
mod nats_peer;
mod overhead;
mod peak_shaving;
mod rabbitmq_peer;
mod raw_append;
mod redis_peer;
mod report;
mod weirmq_runs;

use baselines::*;
use drive::*;
use lifecycle::*;
use nats_peer::*;
use overhead::*;
use peak_shaving::*;
use rabbitmq_peer::*;
use raw_append::*;
use redis_peer::*;
use report::*;
use weirmq_runs::*;

/// jemalloc, or glibc's malloc with `WEIRMQ_BENCH_ALLOCATOR=system` (see
/// `alloc.rs` and BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: alloc::Switch = alloc::Switch;

/// Benchmark scenarios for weirmq, with baselines measured in the same run.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Small sizes: a full run in well under 2 minutes (for CI).
    #[arg(long)]
    quick: bool,
    /// Run only scenarios whose name contains this (or, comma-separated,
    /// any of these).
    #[arg(long)]
    only: Option<String>,
    /// Skip the peers (NATS JetStream, Redis, RabbitMQ) and weirmq's NATS
    /// backend (they need `nats-server` on the PATH, or servers on
    /// loopback).
    #[arg(long)]
    no_peer: bool,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// List the scenario names and exit.
    #[arg(long)]
    list: bool,
    /// Rounds of the `overhead/...` scenarios (default 15; 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Run exactly this scenario in this process (used by the harness itself).
    #[arg(long)]
    scenario: Option<String>,
}

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
    /// A peer (or the raw limit) under `load`.
    Peer {
        peer: Peer,
        load: Load,
    },
    /// `run` plain, observed and traced in one process, `rounds` times.
    Overhead {
        run: Run,
        rounds: usize,
    },
}

/// Every scenario, in the order they run.
fn scenarios(q: bool, payload: usize, rounds: Option<usize>) -> Vec<(String, Scenario)> {
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
                        observed: Observe::Off,
                        inbox: false,
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
                    observed: Observe::Off,
                    inbox: false,
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
    // The exactly-once path: the same e2e shape with an inbox subscription
    // whose handler commits one row per message (state + processed mark in
    // one write before each ack), beside the plain ack above.
    for store in [Store::Memory, Store::Buffered, Store::Flushed] {
        for (publishers, batch, n, shape) in [
            (64, 1, scale(q, 200_000), "p64/single"),
            (4, 256, scale(q, 500_000), "p4/batch256"),
        ] {
            let name = format!("e2e/{}/{shape}/inbox", store.name());
            v.push((
                name.clone(),
                Scenario::Weirmq(Run {
                    name,
                    store,
                    publishers,
                    batch,
                    messages: n,
                    groups: 1,
                    queues: 4,
                    payload,
                    observed: Observe::Off,
                    inbox: true,
                }),
            ));
        }
    }
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
                observed: Observe::Off,
                inbox: false,
            }),
        ));
    }
    // The cost of observing the bus: `overhead/<shape>` runs the e2e shape
    // plain, with a Prometheus recorder and an INFO subscriber
    // (`observed`), and with weirmq's spans on as well at the default
    // sampling (`traced`), in rotating order, in one process (overhead.rs).
    // `e2e/<shape>/traced_all` (its own process; compare with the plain
    // `e2e/<shape>`) has a span on every message.
    for (store, publishers, batch, n, shape) in [
        (Store::Memory, 64, 1, scale(q, 200_000), "p64/single"),
        (Store::Memory, 4, 256, scale(q, 600_000), "p4/batch256"),
        (Store::Buffered, 64, 1, scale(q, 150_000), "p64/single"),
        (Store::Nats, 4, 256, scale(q, 100_000), "p4/batch256"),
    ] {
        let name = format!("overhead/{}/{shape}", store.name());
        let run = Run {
            name: name.clone(),
            store,
            publishers,
            batch,
            messages: n,
            groups: 1,
            queues: 4,
            payload,
            observed: Observe::Off,
            inbox: false,
        };
        // Many short rounds: this machine's throughput drifts by ±10% over
        // minutes, and the median of many paired ratios sees through it.
        let rounds = rounds.unwrap_or(if q { 2 } else { 15 });
        v.push((
            name,
            Scenario::Overhead {
                run: run.clone(),
                rounds,
            },
        ));
        let name = format!("e2e/{}/{shape}/traced_all", store.name());
        v.push((
            name.clone(),
            Scenario::Weirmq(Run {
                name,
                messages: n,
                observed: Observe::TracedAll,
                inbox: false,
                ..run
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
    // Side by side with the bus (issue 18): the raw embedded limit (one
    // file, append + fdatasync per group commit), Redis Streams and a
    // RabbitMQ quorum queue, each end to end with the same shapes and a
    // latency run at 10k msg/s offered.
    for (peer, prefix, n64, nb) in [
        (
            Peer::RawAppend,
            "baseline/append_fdatasync",
            scale(q, 300_000),
            scale(q, 1_000_000),
        ),
        (
            Peer::SledGroupCommit,
            "baseline/sled_group_commit",
            scale(q, 300_000),
            scale(q, 1_000_000),
        ),
        (
            Peer::Redis,
            "peer/redis",
            scale(q, 300_000),
            scale(q, 1_000_000),
        ),
        (
            Peer::RabbitMq,
            "peer/rabbitmq",
            scale(q, 100_000),
            scale(q, 200_000),
        ),
    ] {
        for (publishers, batch, n, shape) in
            [(64, 1, n64, "p64/single"), (4, 256, nb, "p4/batch256")]
        {
            v.push((
                format!("{prefix}/e2e/{shape}"),
                Scenario::Peer {
                    peer,
                    load: Load::Full {
                        publishers,
                        batch,
                        n,
                    },
                },
            ));
        }
        v.push((
            format!("{prefix}/latency/offered_10k"),
            Scenario::Peer {
                peer,
                load: Load::Offered {
                    rate: 10_000,
                    secs: if q { 2.0 } else { 10.0 },
                },
            },
        ));
    }
    v
}

/// A system the bus is measured beside.
#[derive(Debug, Clone, Copy)]
enum Peer {
    RawAppend,
    /// The same group commit into sled, with the bus's syncs.
    SledGroupCommit,
    Redis,
    RabbitMq,
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
                Scenario::Overhead { run, rounds } => overhead(name, run, rounds).await,
                Scenario::Peer { peer, load } => {
                    let res = match peer {
                        Peer::RawAppend => raw_append(name, load, payload, false).await.map(Some),
                        Peer::SledGroupCommit => {
                            raw_append(name, load, payload, true).await.map(Some)
                        }
                        Peer::Redis => redis_peer(name, load, payload).await,
                        Peer::RabbitMq => rabbitmq_peer(name, load, payload).await,
                    }?;
                    if let Some(res) = res {
                        res.print();
                    }
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
    let all = scenarios(args.quick, args.payload_bytes, args.rounds);
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
        .filter(|n| {
            args.only
                .as_deref()
                .is_none_or(|o| o.split(',').any(|part| n.contains(part)))
        })
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
        if let Some(r) = args.rounds {
            cmd.args(["--rounds", &r.to_string()]);
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
