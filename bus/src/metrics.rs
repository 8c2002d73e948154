//! The metrics weirmq records, by name, through the [`metrics`] facade.
//!
//! weirmq never installs a recorder: without one every recording is a no-op
//! costing a few nanoseconds. Install any `metrics` recorder (Prometheus,
//! StatsD, OpenTelemetry...) and these appear; `weirmq::web::metrics()`
//! installs the Prometheus one and serves it. Names follow the
//! OpenTelemetry messaging conventions where they exist; exporters map the
//! dots (Prometheus: `_`). Labels are bounded: `topic`, `group`, `queue`,
//! `outcome`, `operation` — never ids or keys. The list with meanings and
//! example alerts is docs/observability.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static SAMPLED: AtomicBool = AtomicBool::new(false);

/// Whether weirmq samples its gauges (lag, in-flight, retries waiting,
/// dead letters, store size): on once [`describe`] ran (a recorder is
/// installed), so a bus without metrics does no sampling work.
pub fn sampled() -> bool {
    SAMPLED.load(Ordering::Relaxed)
}

/// Turns the sampled gauges on or off for every bus of the process (on
/// after [`describe`]). Off, a bus does no sampling work, as without a
/// recorder: for a process that swaps its recorder for a no-op one (the
/// benchmark harness compares both in one process this way).
pub fn set_sampled(on: bool) {
    SAMPLED.store(on, Ordering::Relaxed);
}

/// How often the gauges are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Counter: messages stored by publishes (`topic`, `outcome` = `ok` |
/// `error`).
pub const PUBLISHED: &str = "messaging.client.published.messages";
/// Counter: deliveries handled (`topic`, `group`, `outcome` = `ack` |
/// `retry` | `dead_letter`).
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// Histogram, seconds: a client operation (`operation` = `publish` |
/// `try_publish` | `publish_batch` | `publish_half` | `publish_with_state`,
/// `topic`).
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// Histogram, seconds: a handler's time on one delivery (`topic`, `group`,
/// `outcome`).
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Histogram, seconds: from publish (the message's birth) to the start of
/// its handling (`topic`, `group`); for a retry, from its first publish.
pub const DELIVERY_LATENCY: &str = "weirmq.delivery.latency";
/// Gauge: messages of a queue a group has not acked (`group`, `topic`,
/// `queue`).
pub const LAG: &str = "weirmq.group.lag";
/// Gauge: deliveries of a group's subscription in this process not settled
/// yet (`group`, `topic`).
pub const IN_FLIGHT: &str = "weirmq.group.in_flight";
/// Gauge: failed deliveries waiting for their next attempt (`group`,
/// `topic`).
pub const SCHEDULED_RETRIES: &str = "weirmq.group.scheduled_retries";
/// Counter: messages a subscription's filter skipped (`group`, `topic`).
pub const FILTERED: &str = "weirmq.messages.filtered";
/// Counter: dead letters sent back to their group (`group`).
pub const RESENT: &str = "weirmq.dead_letters.resent";
/// Gauge: messages in a group's dead-letter queue (`group`).
pub const DEAD_LETTERS: &str = "weirmq.dead_letters";
/// Gauge: published messages waiting to be stored, every bus of the process
/// summed, sampled once a second (backpressure: publishes wait, or
/// `try_publish` is `Busy`, at `max_pending_messages`).
pub const PENDING_PUBLISHES: &str = "weirmq.publish.pending";
/// Histogram: messages per store commit (embedded store; sampled, at most
/// one commit a millisecond).
pub const COMMIT_MESSAGES: &str = "weirmq.store.commit.messages";
/// Histogram, seconds: one real sync of the store (embedded store, durable
/// `Flushed` commits; sampled, at most one a millisecond).
pub const SYNC_DURATION: &str = "weirmq.store.sync.duration";
/// Gauge, bytes: the store's size on disk (embedded store).
pub const STORE_BYTES: &str = "weirmq.store.size";

/// Registers every metric's description and unit with the installed
/// recorder (exporters show them as help text) and turns on the sampled
/// gauges ([`sampled`]). Call it once after installing a recorder, before
/// opening the bus: a subscription binds its counters to the recorder
/// installed when it starts. `weirmq::web::install_metrics` does both.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    SAMPLED.store(true, Ordering::Relaxed);
    describe_counter!(PUBLISHED, Unit::Count, "messages stored by publishes");
    describe_counter!(CONSUMED, Unit::Count, "deliveries handled, by outcome");
    describe_histogram!(OPERATION_DURATION, Unit::Seconds, "a client operation");
    describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "a handler's time on one delivery"
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "from a message's publish to the start of its handling"
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "messages of a queue the group has not acked"
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "deliveries not settled yet");
    describe_gauge!(
        SCHEDULED_RETRIES,
        Unit::Count,
        "failed deliveries waiting for their next attempt"
    );
    describe_counter!(
        FILTERED,
        Unit::Count,
        "messages the subscription's filter skipped"
    );
    describe_counter!(RESENT, Unit::Count, "dead letters sent back to their group");
    describe_gauge!(
        DEAD_LETTERS,
        Unit::Count,
        "messages in the group's dead-letter queue"
    );
    describe_gauge!(
        PENDING_PUBLISHES,
        Unit::Count,
        "published messages waiting to be stored"
    );
    describe_histogram!(COMMIT_MESSAGES, Unit::Count, "messages per store commit");
    describe_histogram!(SYNC_DURATION, Unit::Seconds, "one real sync of the store");
    describe_gauge!(STORE_BYTES, Unit::Bytes, "the store's size on disk");
}

/// A duration as the seconds histograms record it.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Lets a histogram take at most one sample a millisecond, however often
/// its event happens: a Prometheus histogram sample is a push into a
/// buffer drained by the exporter, and at tens of thousands of events a
/// second those pushes (and the buffer's allocations) cost several percent
/// of throughput, while a thousand samples a second keep the quantiles.
#[derive(Debug, Default)]
pub struct SampleGate {
    /// The microsecond (since a process-wide epoch, + 1) of the last sample.
    last: AtomicU64,
}

impl SampleGate {
    /// A gate that has taken no sample yet.
    pub const fn new() -> Self {
        SampleGate {
            last: AtomicU64::new(0),
        }
    }

    /// Whether this event is sampled: the first in its millisecond.
    pub fn due(&self) -> bool {
        self.due_at(Instant::now())
    }

    /// As [`due`](Self::due), for an event at `now` (a caller that reads
    /// the clock anyway saves a read).
    pub fn due_at(&self, now: Instant) -> bool {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let at = now.duration_since(*EPOCH.get_or_init(|| now)).as_micros() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && at.saturating_sub(last) < 1_000 {
            return false;
        }
        self.last
            .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}
