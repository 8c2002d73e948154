//! The subscriber side's metrics (names in `weirmq_bus::metrics`): one set
//! of handles per subscription, registered when it starts, so a delivery
//! costs an atomic add per metric (nothing without a recorder).

use metrics::{Counter, Histogram};
use weirmq_bus::metrics as m;
use weirmq_bus::{Message as BusMessage, Settlement};

/// A subscription's metric handles.
pub(super) struct Meters {
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

    /// A handler answered after `seconds`, well or not.
    pub(super) fn processed(&self, ok: bool, seconds: f64) {
        if ok {
            self.process_ok.record(seconds);
        } else {
            self.process_error.record(seconds);
        }
    }

    /// A delivery handed to a member: how long after its publish.
    pub(super) fn handed_out(&self, message: &BusMessage) {
        if let Ok(age) = message.born_at().elapsed() {
            self.latency.record(age.as_secs_f64());
        }
    }
}
