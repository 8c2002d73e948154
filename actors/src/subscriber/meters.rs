//! The subscriber side's metrics (names in `weirmq_bus::metrics`): one set
//! of handles per subscription, registered when it starts, so a delivery
//! costs an atomic add per counter (nothing without a recorder).
//!
//! The two per-delivery histograms (handler duration, publish-to-handler
//! latency) are *sampled* above `SAMPLES_PER_SECOND` deliveries a second:
//! every n-th delivery is recorded, n chosen from the last 50 ms' rate.
//! A Prometheus histogram sample costs a clock read and an epoch-pinned
//! push (measured: recording every one cost 7-10% of e2e throughput at
//! 100k+ msg/s); a thousand samples a second keep the quantiles while the
//! counters stay exact.

use std::time::Instant;

use metrics::{Counter, Histogram};
use weirmq_bus::metrics as m;
use weirmq_bus::{Message as BusMessage, Settlement};

/// A subscription's metric handles.
pub(super) struct Meters {
    sampler: Sampler,
    ack: Counter,
    retry: Counter,
    dead_letter: Counter,
    process_ok: Histogram,
    process_error: Histogram,
    latency: Histogram,
}

impl Meters {
    pub(super) fn new(group: &str, topic: &str) -> Self {
        let consumed = |outcome: &'static str| {
            metrics::counter!(m::CONSUMED, "topic" => topic.to_string(),
                "group" => group.to_string(), "outcome" => outcome)
        };
        let process = |outcome: &'static str| {
            metrics::histogram!(m::PROCESS_DURATION, "topic" => topic.to_string(),
                "group" => group.to_string(), "outcome" => outcome)
        };
        Meters {
            sampler: Sampler::new(),
            ack: consumed("ack"),
            retry: consumed("retry"),
            dead_letter: consumed("dead_letter"),
            process_ok: process("ok"),
            process_error: process("error"),
            latency: metrics::histogram!(m::DELIVERY_LATENCY, "topic" => topic.to_string(),
                "group" => group.to_string()),
        }
    }

    /// A delivery settled.
    pub(super) fn settled(&self, s: &Settlement) {
        match s {
            Settlement::Ack => self.ack.increment(1),
            Settlement::Nack { .. } => self.retry.increment(1),
            Settlement::DeadLetter { .. } => self.dead_letter.increment(1),
        }
    }

    /// A handler answered, well or not, for a delivery handed out at
    /// `since` (the clock is read only for the deliveries sampled).
    pub(super) fn processed(&mut self, ok: bool, since: Instant) {
        if !self.sampler.processed() {
            return;
        }
        let seconds = since.elapsed().as_secs_f64();
        if ok {
            self.process_ok.record(seconds);
        } else {
            self.process_error.record(seconds);
        }
    }

    /// A delivery handed to a member: how long after its publish.
    pub(super) fn handed_out(&mut self, message: &BusMessage) {
        if !self.sampler.handed_out() {
            return;
        }
        if let Ok(age) = message.born_at().elapsed() {
            self.latency.record(age.as_secs_f64());
        }
    }
}

/// At most about this many samples a second per histogram of a
/// subscription.
const SAMPLES_PER_SECOND: u64 = 1_000;

/// How often the sampling stride is set again from the rate.
const WINDOW: f64 = 0.05;

/// Chooses which deliveries the histograms record: every `stride`-th, the
/// stride set every [`WINDOW`] from that window's rate (with a window of
/// a whole second, every delivery of a subscription's first second was
/// recorded: two clock reads each).
struct Sampler {
    since: Instant,
    in_window: u64,
    stride: u64,
    handed: u64,
    processed: u64,
}

impl Sampler {
    fn new() -> Self {
        Sampler {
            since: Instant::now(),
            in_window: 0,
            stride: 1,
            handed: 0,
            processed: 0,
        }
    }

    /// Whether this hand-out is recorded. The clock is read once every 64
    /// hand-outs, never per delivery.
    fn handed_out(&mut self) -> bool {
        self.in_window += 1;
        if self.in_window % 64 == 0 {
            let secs = self.since.elapsed().as_secs_f64();
            if secs >= WINDOW {
                let rate = self.in_window as f64 / secs;
                self.stride = ((rate / SAMPLES_PER_SECOND as f64) as u64).max(1);
                self.in_window = 0;
                self.since = Instant::now();
            }
        }
        self.handed += 1;
        self.handed % self.stride == 0
    }

    /// Whether this handler answer is recorded.
    fn processed(&mut self) -> bool {
        self.processed += 1;
        self.processed % self.stride == 0
    }
}
