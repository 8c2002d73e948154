//! One result line (`Res`, printed as JSON) and what goes in it: peak RSS,
//! latencies, the data directory's size.

use crate::*;

/// One result line.
#[derive(Serialize, Debug)]
pub(super) struct Res {
    pub(super) scenario: String,
    pub(super) messages: u64,
    pub(super) payload_bytes: usize,
    pub(super) msgs_per_sec: f64,
    pub(super) p50_us: Option<f64>,
    pub(super) p99_us: Option<f64>,
    pub(super) p999_us: Option<f64>,
    pub(super) peak_rss_mb: f64,
    /// CPU time (user + system, every thread) this process used since its
    /// previous result line or its start, per message, in µs: the work a
    /// message cost, steadier than the rate on a shared machine (it leaves
    /// out a peer server's own process).
    pub(super) cpu_us_per_msg: f64,
    pub(super) baseline: bool,
    /// The process's allocator: `jemalloc` (the default) or `system`
    /// (`WEIRMQ_BENCH_ALLOCATOR=system`).
    pub(super) allocator: &'static str,
    /// Size of the data directory at the end of the scenario (where it
    /// matters: retention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) data_dir_mb: Option<f64>,
    /// The data directory before the measured step (retention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) data_dir_mb_before: Option<f64>,
    /// The memory bound docs/delivery.md states for the scenario's
    /// settings ("Memory": the RSS at start + 2 × cache + 96 MiB working
    /// memory + the in-flight window); the scenario fails above it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rss_bound_mb: Option<f64>,
    /// The round of a scenario that repeats its runs in one process
    /// (`overhead/...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) round: Option<usize>,
}

impl Res {
    pub(super) fn new(scenario: &str, messages: u64, payload: usize, elapsed: Duration) -> Res {
        Res {
            scenario: scenario.to_string(),
            messages,
            payload_bytes: payload,
            msgs_per_sec: (messages as f64 / elapsed.as_secs_f64()).round(),
            p50_us: None,
            p99_us: None,
            p999_us: None,
            peak_rss_mb: rss_mb(),
            cpu_us_per_msg: (cpu_since_last_result().as_secs_f64() * 1e6 / messages.max(1) as f64
                * 100.0)
                .round()
                / 100.0,
            baseline: false,
            allocator: crate::alloc::name(),
            data_dir_mb: None,
            data_dir_mb_before: None,
            rss_bound_mb: None,
            round: None,
        }
    }

    pub(super) fn latencies(mut self, mut us: Vec<u32>) -> Res {
        if !us.is_empty() {
            us.sort_unstable();
            let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize] as f64;
            self.p50_us = Some(at(0.50));
            self.p99_us = Some(at(0.99));
            self.p999_us = Some(at(0.999));
        }
        self
    }

    pub(super) fn baseline(mut self) -> Res {
        self.baseline = true;
        self
    }

    pub(super) fn print(&self) {
        println!("{}", serde_json::to_string(self).expect("json"));
    }
}

/// Peak resident memory of this process (each scenario runs in its own).
pub(super) fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1024.0 * 10.0).round() / 10.0)
}

/// The CPU time (user + system) of this process since the last call, or
/// since it started.
fn cpu_since_last_result() -> Duration {
    static LAST: Mutex<Duration> = Mutex::new(Duration::ZERO);
    // SAFETY: getrusage only writes the struct it is given.
    let used = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return Duration::ZERO;
        }
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let d = used.saturating_sub(*last);
    *last = used;
    d
}

/// Nanoseconds since the harness started: the send time travels in events.
pub(super) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub(super) fn since_us(sent_ns: u64) -> u32 {
    ((now_ns().saturating_sub(sent_ns)) / 1000).min(u32::MAX as u64) as u32
}

pub(super) fn dir_mb(p: &Path) -> f64 {
    pub(super) fn bytes(p: &Path) -> u64 {
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
