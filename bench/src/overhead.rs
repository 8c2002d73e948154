//! Observability overhead measured in one process: the same e2e run with
//! nothing observing the bus, with metrics and an INFO subscriber
//! (`observed`), and with weirmq's spans on as well (`traced`), in rounds
//! whose order rotates. A process can install a `metrics` recorder and a
//! `tracing` subscriber only once, so both are installed switched off and
//! switched per run: the recorder hands out no-op handles while off (what
//! the facade does without a recorder; a bus binds its handles when it
//! opens and subscribes, and each run opens its own), the gauge sampling is
//! off ([`weirmq::metrics::set_sampled`]), and the subscriber's filter is
//! reloaded to `off` (the level check every `tracing` macro makes first
//! then fails as with no subscriber). Comparing within one process takes
//! the process-to-process noise (placement, frequency, page cache) out of
//! the ratio.

use std::sync::atomic::AtomicBool;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::*;

/// The Prometheus recorder, switchable: off, every handle is a no-op.
struct Switched {
    on: Arc<AtomicBool>,
    inner: PrometheusRecorder,
}

impl Recorder for Switched {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

/// The process's recorder and subscriber, and their switches.
struct Switches {
    metrics: Arc<AtomicBool>,
    filter: reload::Handle<EnvFilter, Registry>,
}

impl Switches {
    /// Installs both, off. As `weirmq::web::install_metrics` does: the
    /// descriptions, and an upkeep every 5 s.
    fn install() -> Switches {
        let inner = PrometheusBuilder::new().build_recorder();
        let upkeep = inner.handle();
        let on = Arc::new(AtomicBool::new(false));
        metrics::set_global_recorder(Switched {
            on: on.clone(),
            inner,
        })
        .expect("no recorder installed before");
        weirmq::metrics::describe();
        weirmq::metrics::set_sampled(false);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        });
        let (filter, handle) = reload::Layer::new(EnvFilter::new(Observe::Off.filter()));
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::io::sink),
            )
            .init();
        Switches {
            metrics: on,
            filter: handle,
        }
    }

    fn set(&self, observe: Observe) {
        let on = observe != Observe::Off;
        self.metrics.store(on, Ordering::Relaxed);
        weirmq::metrics::set_sampled(on);
        self.filter
            .reload(EnvFilter::new(observe.filter()))
            .expect("the subscriber is installed");
    }
}

/// The summary line: each round's ratio to the plain run of that round.
#[derive(Serialize, Debug)]
struct Summary {
    scenario: String,
    rounds: usize,
    messages: u64,
    plain_msgs_per_sec_median: f64,
    observed_vs_plain: Vec<f64>,
    traced_vs_plain: Vec<f64>,
    observed_vs_plain_median: f64,
    traced_vs_plain_median: f64,
    /// CPU time (user + system, this process) per message, ÷ plain's in
    /// the same round: above 1 is the cost. Less sensitive than
    /// throughput to what else the machine runs.
    observed_cpu_per_msg_vs_plain: Vec<f64>,
    traced_cpu_per_msg_vs_plain: Vec<f64>,
    observed_cpu_per_msg_vs_plain_median: f64,
    traced_cpu_per_msg_vs_plain_median: f64,
}

/// This process's CPU time so far (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // /proc/self/stat: fields 14 and 15 (utime, stime) in clock ticks,
    // after the command name in parentheses.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields counted from the state (field 3) at index 0.
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round2(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One run of `run` observed as `variant` (its name's suffix), in round
/// `round` (from 0), printed.
async fn measure_variant(
    name: &str,
    run: &Run,
    (observe, suffix): (Observe, &str),
    round: usize,
    baseline: bool,
) -> Res {
    let mut res = measure(Run {
        name: format!("{name}/{suffix}"),
        observed: observe,
        inbox: false,
        ..run.clone()
    })
    .await;
    res.round = Some(round + 1);
    res.baseline = baseline;
    res.print();
    res
}

/// Runs `run` `rounds` times in each of plain, observed and traced (after
/// one plain warm-up run that is not counted); prints each run's line and
/// the summary.
pub(super) async fn overhead(name: &str, run: Run, rounds: usize) {
    let switches = Switches::install();
    switches.set(Observe::Off);
    measure(Run {
        name: format!("{name}/warmup"),
        messages: (run.messages / 4).max(1000),
        ..run.clone()
    })
    .await;
    let variants = [
        (Observe::Off, "plain"),
        (Observe::Metrics, "observed"),
        (Observe::Traced, "traced"),
    ];
    // WEIRMQ_OVERHEAD_ONLY=<variant>: that variant alone, every round, no
    // summary — one process per variant, for a profiler (`perf record`
    // each, then `perf diff`).
    if let Ok(only) = std::env::var("WEIRMQ_OVERHEAD_ONLY") {
        let (observe, suffix) = *variants
            .iter()
            .find(|(_, s)| *s == only)
            .expect("WEIRMQ_OVERHEAD_ONLY is plain, observed or traced");
        switches.set(observe);
        for round in 0..rounds {
            measure_variant(name, &run, (observe, suffix), round, false).await;
        }
        switches.set(Observe::Off);
        return;
    }
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for i in 0..variants.len() {
            let v = (round + i) % variants.len();
            let (observe, suffix) = variants[v];
            switches.set(observe);
            let cpu_before = cpu_seconds();
            let res = measure_variant(
                name,
                &run,
                (observe, suffix),
                round,
                observe == Observe::Off,
            )
            .await;
            rates[v].push(res.msgs_per_sec);
            cpu[v].push((cpu_seconds() - cpu_before) / res.messages as f64);
        }
    }
    switches.set(Observe::Off);
    let ratios = |of: &[Vec<f64>; 3], v: usize| -> Vec<f64> {
        of[v]
            .iter()
            .zip(&of[0])
            .map(|(x, plain)| round2(x / plain))
            .collect()
    };
    let (observed, traced) = (ratios(&rates, 1), ratios(&rates, 2));
    let (observed_cpu, traced_cpu) = (ratios(&cpu, 1), ratios(&cpu, 2));
    let summary = Summary {
        scenario: name.to_string(),
        rounds,
        messages: run.messages,
        plain_msgs_per_sec_median: median(rates[0].clone()).round(),
        observed_vs_plain_median: round2(median(observed.clone())),
        traced_vs_plain_median: round2(median(traced.clone())),
        observed_vs_plain: observed,
        traced_vs_plain: traced,
        observed_cpu_per_msg_vs_plain_median: round2(median(observed_cpu.clone())),
        traced_cpu_per_msg_vs_plain_median: round2(median(traced_cpu.clone())),
        observed_cpu_per_msg_vs_plain: observed_cpu,
        traced_cpu_per_msg_vs_plain: traced_cpu,
    };
    println!("{}", serde_json::to_string(&summary).expect("json"));
}
