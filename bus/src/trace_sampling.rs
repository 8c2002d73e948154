//! Which messages get spans: head sampling of the `publish` and `process`
//! spans, as OpenTelemetry's `ParentBased` sampler does it.
//!
//! A publish that continues a trace (a `traceparent` it was given, or the
//! current OpenTelemetry span) follows that trace's `sampled` flag, and its
//! messages carry the trace's context whatever the flag (W3C `01` / `00`),
//! so a follow-up message inherits the decision. A publish that starts a
//! trace asks the bus's [`TraceSampling`]; one not sampled starts no trace
//! and its messages carry no context, as with tracing off (measured:
//! carrying a context in every message cost up to 30% of small-message
//! throughput, so an unsampled root is not worth it). The `process` span
//! of a delivery follows the flag of the message's context; a message that
//! carries none is a root decision of the consuming bus's sampler.
//!
//! The decision is made only when a subscriber is interested in the span
//! (`weirmq::publish` / `weirmq::process` at DEBUG): with tracing off it
//! costs nothing, and it never allocates. The rate sampler is one atomic
//! word shared by every clone of the bus.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{TraceContext, TraceId};

/// How many new traces get spans (see the module docs for who decides when
/// a trace is continued rather than started).
///
/// The default is [`TraceSampling::per_second(100)`](TraceSampling::per_second):
/// a service publishing a few messages a second sees every one traced, one
/// publishing 100,000 a second pays for 100 traces a second, not 100,000
/// (measured: spans on every message cost a fifth to a third of the
/// throughput of small messages — BENCHMARKS.md, "Observability overhead").
///
/// # Examples
///
/// ```
/// use weirmq_bus::{TraceContext, TraceSampling};
/// let all = TraceSampling::always();
/// assert!(all.sample_root(TraceContext::new_root().trace_id()));
/// let none = TraceSampling::never();
/// assert!(!none.sample_root(TraceContext::new_root().trace_id()));
/// let capped = TraceSampling::per_second(2);
/// let taken = (0..10).filter(|_| capped.sample_root(TraceContext::new_root().trace_id())).count();
/// assert!(taken <= 4, "at most 2 in each second: {taken}");
/// ```
#[derive(Clone)]
pub struct TraceSampling {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Always,
    Never,
    /// Sampled when the trace id's last 8 bytes, as a big-endian u64, are
    /// below the threshold (OpenTelemetry's `TraceIdRatioBased`: every
    /// service deciding by ratio agrees on the same trace).
    Ratio {
        ratio: f64,
        threshold: u64,
    },
    PerSecond(Arc<PerSecond>),
}

impl TraceSampling {
    /// Every new trace is sampled (spans on every message: the cost is in
    /// BENCHMARKS.md; for development and low-volume services).
    pub fn always() -> Self {
        TraceSampling { kind: Kind::Always }
    }

    /// No new trace is sampled; a publish that continues a sampled trace
    /// still gets its spans.
    pub fn never() -> Self {
        TraceSampling { kind: Kind::Never }
    }

    /// A fraction of new traces, chosen by trace id (so every process
    /// sampling by the same ratio picks the same traces). Clamped to
    /// `0.0..=1.0`; NaN counts as 0.
    pub fn ratio(ratio: f64) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        if ratio >= 1.0 {
            return TraceSampling::always();
        }
        let threshold = (ratio * (u64::MAX as f64)) as u64;
        TraceSampling {
            kind: Kind::Ratio { ratio, threshold },
        }
    }

    /// New traces for at most about `n` messages in each second of the
    /// clock, shared by every clone of the bus. The budget counts messages,
    /// not publishes: what a span costs is paid per message (a `process`
    /// span for each delivery of a sampled batch), so a batch of `k` takes
    /// `k`. A publish is sampled whole while the second's budget is not
    /// spent (one second can see up to `n + k - 1`; a window starts on the
    /// second, so up to twice that within one second straddling two
    /// windows). `0` is [`never`](TraceSampling::never).
    pub fn per_second(n: u32) -> Self {
        if n == 0 {
            return TraceSampling::never();
        }
        TraceSampling {
            kind: Kind::PerSecond(Arc::new(PerSecond {
                limit: n,
                window: AtomicU64::new(0),
            })),
        }
    }

    /// Whether a new trace with this id gets spans.
    pub fn sample_root(&self, trace_id: TraceId) -> bool {
        match &self.kind {
            Kind::Always => true,
            Kind::Never => false,
            Kind::Ratio { threshold, .. } => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id.0[8..]);
                u64::from_be_bytes(low) < *threshold
            }
            Kind::PerSecond(p) => p.take(1),
        }
    }

    /// Whether a publish of `messages` messages with this context (`None`:
    /// it starts a trace) gets spans: as [`sample`](TraceSampling::sample),
    /// with a rate sampler's budget charged for every message.
    pub fn sample_messages(&self, parent: Option<&TraceContext>, messages: usize) -> bool {
        match (parent, &self.kind) {
            (None, Kind::PerSecond(p)) => {
                p.take(u32::try_from(messages.max(1)).unwrap_or(u32::MAX))
            }
            _ => self.sample(parent),
        }
    }

    /// Whether a message with this context (`None`: it carries none) gets
    /// spans: a context's own `sampled` flag, else a root decision.
    pub fn sample(&self, parent: Option<&TraceContext>) -> bool {
        match (parent, &self.kind) {
            (Some(p), _) => p.is_sampled(),
            (None, Kind::Ratio { .. }) => self.sample_root(TraceContext::new_root().trace_id()),
            // No id needed: decide without making one.
            (None, _) => self.sample_root(TraceId([0; 16])),
        }
    }
}

impl Default for TraceSampling {
    fn default() -> Self {
        TraceSampling::per_second(100)
    }
}

impl fmt::Debug for TraceSampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Always => f.write_str("TraceSampling::always()"),
            Kind::Never => f.write_str("TraceSampling::never()"),
            Kind::Ratio { ratio, .. } => write!(f, "TraceSampling::ratio({ratio})"),
            Kind::PerSecond(p) => write!(f, "TraceSampling::per_second({})", p.limit),
        }
    }
}

/// Two samplers are equal when they sample alike (two rate samplers of the
/// same rate are equal even though they count separately).
impl PartialEq for TraceSampling {
    fn eq(&self, other: &Self) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::Always, Kind::Always) | (Kind::Never, Kind::Never) => true,
            (Kind::Ratio { threshold: a, .. }, Kind::Ratio { threshold: b, .. }) => a == b,
            (Kind::PerSecond(a), Kind::PerSecond(b)) => a.limit == b.limit,
            _ => false,
        }
    }
}

/// The rate sampler's state: the current second (since the process's first
/// sample) in the high 32 bits, the traces taken in it in the low 32.
struct PerSecond {
    limit: u32,
    window: AtomicU64,
}

/// Whole seconds on a monotonic clock, read cheaply: every publish and
/// delivery asks, so the clock read is most of a rate sampler's cost. On
/// Linux the coarse clock (the vDSO's last tick: ~4 ns here against ~45 ns
/// for `Instant::now` + `elapsed`, measured in a VM with a TSC clock; its
/// resolution of a scheduler tick is plenty for a one-second window);
/// elsewhere `Instant`.
fn coarse_second() -> u32 {
    #[cfg(target_os = "linux")]
    {
        rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse).tv_sec as u32
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::sync::OnceLock;
        use std::time::Instant;
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_secs() as u32
    }
}

impl PerSecond {
    /// Takes `n` from this second's budget if any is left.
    fn take(&self, n: u32) -> bool {
        self.take_at(coarse_second(), n)
    }

    /// Takes `n` from the budget of `second` (since the epoch).
    fn take_at(&self, second: u32, n: u32) -> bool {
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (s, taken) = ((current >> 32) as u32, current as u32);
            // A thread that read the clock just before another moved the
            // window on counts in the newer window (never moves it back).
            let next = if s >= second {
                if taken >= self.limit {
                    return false;
                }
                (u64::from(s) << 32) | u64::from(taken.saturating_add(n))
            } else {
                (u64::from(second) << 32) | u64::from(n)
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn id(low: u64) -> TraceId {
        let mut b = [1u8; 16];
        b[8..].copy_from_slice(&low.to_be_bytes());
        TraceId(b)
    }

    #[test]
    fn ratio_decides_by_the_trace_ids_low_bytes() {
        let half = TraceSampling::ratio(0.5);
        assert!(half.sample_root(id(0)));
        assert!(half.sample_root(id(u64::MAX / 2 - 1)));
        assert!(!half.sample_root(id(u64::MAX / 2 + 2)));
        assert!(!half.sample_root(id(u64::MAX)));
        assert!(!TraceSampling::ratio(0.0).sample_root(id(0)));
        assert!(!TraceSampling::ratio(f64::NAN).sample_root(id(0)));
        assert_eq!(TraceSampling::ratio(7.0), TraceSampling::always());
    }

    #[test]
    fn per_second_takes_at_most_its_limit_in_one_window() {
        let s = TraceSampling::per_second(3);
        let started = Instant::now();
        let taken = (0..100).filter(|_| s.sample_root(id(1))).count() as u64;
        // The 100 calls may straddle window boundaries on a loaded machine.
        let windows = started.elapsed().as_secs() + 2;
        assert!(
            taken >= 1 && taken <= 3 * windows,
            "{taken} in {windows} windows"
        );
        assert_eq!(TraceSampling::per_second(0), TraceSampling::never());
    }

    #[test]
    fn per_second_counts_the_messages_of_a_batch() {
        let p = PerSecond {
            limit: 100,
            window: AtomicU64::new(0),
        };
        // A batch larger than the budget is taken whole while some is left;
        // then the second's budget is spent, for batches and singles.
        assert!(p.take_at(7, 99));
        assert!(p.take_at(7, 256));
        assert!(!p.take_at(7, 256));
        assert!(!p.take_at(7, 1));
        // The next second has its own budget.
        assert!(p.take_at(8, 1));
        assert!(p.take_at(8, 98));
        assert!(p.take_at(8, 1));
        assert!(!p.take_at(8, 1));
        // A continued trace follows its flag, whatever the budget.
        let s = TraceSampling::per_second(1);
        let parent = TraceContext::new_root();
        assert!(s.sample_messages(Some(&parent), 256));
        assert!(TraceSampling::always().sample_messages(None, 1000));
        assert!(!TraceSampling::never().sample_messages(None, 1));
    }

    #[test]
    fn a_context_decides_by_its_own_flag() {
        let never = TraceSampling::never();
        let sampled = TraceContext::new_root();
        assert!(never.sample(Some(&sampled)));
        let unsampled =
            TraceContext::new(sampled.trace_id(), sampled.span_id(), false, None).unwrap();
        assert!(!TraceSampling::always().sample(Some(&unsampled)));
        assert!(!never.sample(None));
        assert!(TraceSampling::always().sample(None));
    }
}
