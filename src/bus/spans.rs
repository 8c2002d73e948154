//! The `publish <topic>` span of every publish (with `otel`, the
//! OpenTelemetry messaging conventions: kind producer, `messaging.*`
//! attributes; without, weirmq's short log fields), and the trace
//! context it stamps into the messages (see `weirmq_bus::stamp_publish`).
//! Disabled (no subscriber interested in `weirmq::publish` at DEBUG) it costs one
//! interest check, and the messages carry no context unless one was given.
//! Enabled, the bus's [`TraceSampling`] decides whether a publish that
//! starts a trace records its span (one that continues a trace follows
//! the trace's flag); unsampled, the messages still carry a context.

use tracing::field::Empty;
use tracing::{debug_span, Level, Span};

use super::meters::PublishOp;
use weirmq_bus::{Error, OutgoingMessage, TraceContext, TraceSampling};

/// The span of one publish call of `messages` to `topic`, entered by
/// nothing yet: the caller instruments the backend call with it.
pub(super) fn publish_span(
    sampling: &TraceSampling,
    op: PublishOp,
    topic: &str,
    messages: &mut [OutgoingMessage],
) -> Span {
    let explicit = weirmq_bus::explicit_parent(messages);
    let on = tracing::enabled!(
        kind: tracing::metadata::Kind::SPAN,
        target: "weirmq::publish",
        Level::DEBUG
    );
    let sampled = on
        && sampling.sample_messages(
            explicit.clone().or_else(TraceContext::current).as_ref(),
            messages.len(),
        );
    let span = if !sampled {
        Span::none()
    } else if weirmq_bus::OTEL {
        debug_span!(
            target: "weirmq::publish",
            "publish",
            otel.name = %format_args!("publish {topic}"),
            otel.kind = "producer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            messaging.system = "weirmq",
            messaging.operation.type = "send",
            messaging.operation.name = op.label(),
            messaging.destination.name = %topic,
            messaging.batch.message_count = messages.len(),
            trace_id = Empty,
            span_id = Empty,
        )
    } else {
        debug_span!(
            target: "weirmq::publish",
            "publish",
            %topic,
            messages = messages.len(),
            error = Empty,
            trace_id = Empty,
            span_id = Empty,
        )
    };
    weirmq_bus::stamp_publish(&span, explicit, on, messages);
    span
}

/// Records a failed publish on its span.
pub(super) fn record_outcome<T>(span: &Span, r: &Result<T, Error>) {
    if let Err(e) = r {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", tracing::field::display(e));
        span.record("error", tracing::field::display(e));
    }
}
