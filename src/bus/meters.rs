//! The publish side's metric handles, per topic, registered on the topic's
//! first publish through this bus: a publish then costs a map read and a
//! few atomic adds, not a label build and registry lookup per metric.
//!
//! The duration histogram is *sampled*: at most one sample per
//! millisecond per (topic, operation), ~1,000 a second — as the
//! subscriber side samples its per-delivery histograms. A Prometheus
//! histogram sample is an epoch-pinned push into a bucket shared by every
//! publishing thread; at 100k+ single publishes a second it was the
//! largest cost of metrics on the publish path, and a thousand samples a
//! second keep the quantiles.

use std::sync::OnceLock;
use std::time::Instant;

use metrics::{Counter, Histogram};
use weirmq_bus::metrics::{self as m, SampleGate};

/// A publish operation: the `operation` label, and its histogram's slot.
#[derive(Debug, Clone, Copy)]
pub(super) enum PublishOp {
    Publish,
    TryPublish,
    PublishBatch,
    PublishHalf,
    PublishWithState,
}

/// The label of each `PublishOp`, in declaration order.
const OPERATIONS: [&str; 5] = [
    "publish",
    "try_publish",
    "publish_batch",
    "publish_half",
    "publish_with_state",
];

impl PublishOp {
    /// The `operation` label (and span attribute) of this operation.
    pub(super) fn label(self) -> &'static str {
        OPERATIONS[self as usize]
    }
}

/// One topic's publish metrics.
#[derive(Debug)]
pub(super) struct PublishMeters {
    topic: String,
    ok: Counter,
    error: Counter,
    durations: [OnceLock<Histogram>; OPERATIONS.len()],
    /// Per operation, at most one histogram sample a millisecond.
    gates: [SampleGate; OPERATIONS.len()],
}

impl PublishMeters {
    pub(super) fn new(topic: &str) -> Self {
        PublishMeters {
            topic: topic.to_string(),
            ok: metrics::counter!(m::PUBLISHED, "topic" => topic.to_string(), "outcome" => "ok"),
            error: metrics::counter!(m::PUBLISHED, "topic" => topic.to_string(), "outcome" => "error"),
            durations: Default::default(),
            gates: Default::default(),
        }
    }

    /// Records one call of `operation` that stored
    /// `messages` (or failed to).
    pub(super) fn record(&self, operation: PublishOp, messages: usize, ok: bool, started: Instant) {
        if ok {
            self.ok.increment(messages as u64);
        } else {
            self.error.increment(messages as u64);
        }
        let i = operation as usize;
        let now = Instant::now();
        if !self.gates[i].due_at(now) {
            return;
        }
        self.durations[i]
            .get_or_init(|| {
                metrics::histogram!(m::OPERATION_DURATION, "operation" => OPERATIONS[i],
                    "topic" => self.topic.clone())
            })
            .record(m::seconds(now.saturating_duration_since(started)));
    }
}
