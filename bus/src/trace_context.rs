//! Trace context that travels with a message: the W3C
//! [`traceparent`](https://www.w3.org/TR/trace-context/) (and `tracestate`)
//! of the span that published it, stored as the message's properties
//! [`TRACEPARENT`] and [`TRACESTATE`] (and, on NATS, as headers of the same
//! names), so a handler's `process` span joins the publisher's trace —
//! through retries, delays, transactions, the dead-letter queue and a
//! resend, which all keep a message's properties.
//!
//! With the `otel` feature and a `tracing-opentelemetry` layer installed,
//! the ids are OpenTelemetry's: a publish continues the trace of the span it
//! is made in, and the `process` span gets the publisher's span as its
//! parent. Without them weirmq makes the ids itself (random, as W3C asks)
//! and records them as the spans' `trace_id` / `span_id` / `parent_id`
//! fields, so logs of one message's life can be found by one id.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

use tracing::Span;

/// Whether the OpenTelemetry bridge is built in (feature `otel`): the
/// `publish` and `process` spans then carry the OpenTelemetry messaging
/// attributes (`messaging.*`, `otel.*`); without it, the short fields of
/// weirmq's logs (`topic`, `group`, `msg_id`, ...), cheaper to format.
pub const OTEL: bool = cfg!(feature = "otel");

/// The property (and NATS header) holding a message's W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The property (and NATS header) holding a message's W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` kept (W3C: 32 members, at most 512 characters
/// are ever required to be propagated); a longer one is dropped.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// A 16-byte W3C trace id, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte W3C span (parent) id, shown as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(pub [u8; 8]);

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` as lowercase hex (a table lookup per nibble: ids are
/// formatted on every traced publish).
fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let mut out = String::with_capacity(2 * bytes.len());
    push_hex(&mut out, bytes);
    f.write_str(&out)
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}
impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}
impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// Why a `traceparent` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContextError {
    /// The value given (at most its first 64 characters).
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for TraceContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid traceparent {:?}: {} (expected version-traceid-spanid-flags, \
             e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)",
            self.value, self.reason
        )
    }
}

impl std::error::Error for TraceContextError {}

/// A W3C trace context: the trace a message belongs to and the span that
/// published it.
///
/// # Examples
///
/// ```
/// use weirmq_bus::TraceContext;
/// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)?;
/// assert_eq!(ctx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(ctx.is_sampled());
/// let child = ctx.child();
/// assert_eq!(child.trace_id(), ctx.trace_id());
/// assert_ne!(child.span_id(), ctx.span_id());
/// assert_eq!(TraceContext::parse(&ctx.traceparent(), None)?, ctx);
/// # Ok::<(), weirmq_bus::TraceContextError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    flags: u8,
    state: Option<String>,
}

impl TraceContext {
    /// A context from its parts. `tracestate` longer than
    /// [`MAX_TRACESTATE_LEN`] or empty is dropped.
    ///
    /// # Errors
    ///
    /// An all-zero trace or span id (W3C: invalid).
    pub fn new(
        trace_id: TraceId,
        span_id: SpanId,
        sampled: bool,
        tracestate: Option<String>,
    ) -> Result<Self, TraceContextError> {
        if trace_id.0 == [0; 16] || span_id.0 == [0; 8] {
            return Err(TraceContextError {
                value: format!("00-{trace_id}-{span_id}-0{}", sampled as u8),
                reason: "an all-zero trace id or span id is invalid",
            });
        }
        Ok(TraceContext {
            trace_id,
            span_id,
            flags: sampled as u8,
            state: tracestate.filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN),
        })
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: TraceId(random_bytes()),
            span_id: SpanId(random_bytes()),
            flags: 1,
            state: None,
        }
    }

    /// A span in the same trace, child of this one: a new span id, the same
    /// trace id, flags and state.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: SpanId(random_bytes()),
            ..self.clone()
        }
    }

    /// Parses a W3C `traceparent` header value (version 00, or a later
    /// version's first four fields, as the spec asks) and an optional
    /// `tracestate`.
    ///
    /// # Errors
    ///
    /// A [`TraceContextError`] saying what is wrong with the value.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceContextError> {
        let err = |reason| TraceContextError {
            value: traceparent.chars().take(64).collect(),
            reason,
        };
        let v = traceparent.trim();
        let b = v.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(err(
                "not four dash-separated fields of 2, 32, 16 and 2 hex digits",
            ));
        }
        let version = hex::<1>(&b[0..2]).ok_or_else(|| err("the version is not hex"))?[0];
        if version == 0xff {
            return Err(err("version ff is invalid"));
        }
        if (version == 0 && b.len() != 55) || (version != 0 && b.len() > 55 && b[55] != b'-') {
            return Err(err("unexpected characters after the flags"));
        }
        let trace_id =
            hex::<16>(&b[3..35]).ok_or_else(|| err("the trace id is not lowercase hex"))?;
        let span_id =
            hex::<8>(&b[36..52]).ok_or_else(|| err("the span id is not lowercase hex"))?;
        let flags = hex::<1>(&b[53..55]).ok_or_else(|| err("the flags are not hex"))?[0];
        let mut ctx = TraceContext::new(
            TraceId(trace_id),
            SpanId(span_id),
            flags & 1 == 1,
            tracestate.map(|s| s.trim().to_string()),
        )
        .map_err(|e| err(e.reason))?;
        ctx.flags = flags & 1;
        Ok(ctx)
    }

    /// The context a message carries in its properties, if it carries a
    /// valid one.
    pub fn from_properties(properties: &BTreeMap<String, String>) -> Option<Self> {
        let tp = properties.get(TRACEPARENT)?;
        TraceContext::parse(tp, properties.get(TRACESTATE).map(String::as_str)).ok()
    }

    /// Writes this context into `properties` ([`TRACEPARENT`], and
    /// [`TRACESTATE`] when there is one; a stale `tracestate` is removed).
    pub fn write_properties(&self, properties: &mut BTreeMap<String, String>) {
        properties.insert(TRACEPARENT.to_string(), self.traceparent());
        match &self.state {
            Some(s) => properties.insert(TRACESTATE.to_string(), s.clone()),
            None => properties.remove(TRACESTATE),
        };
    }

    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }
    /// The span id (of the span that published the message).
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }
    /// Whether the trace is sampled (the `01` flag).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }
    /// The `tracestate`, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }
    /// The W3C `traceparent` value (version 00).
    pub fn traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id.0);
        out.push('-');
        push_hex(&mut out, &self.span_id.0);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }

    /// The OpenTelemetry context of the current `tracing` span, when the
    /// `otel` feature is on and an OpenTelemetry layer is installed; else
    /// `None`.
    pub fn current() -> Option<Self> {
        if OTEL {
            span_context(&Span::current())
        } else {
            None
        }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// Parses exactly `2 * N` lowercase hex digits.
fn hex<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(b[2 * i])? << 4) | digit(b[2 * i + 1])?;
    }
    Some(out)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(crate::time::now_ms() as u128);
        h.finish() | 1
    });
}

/// `N` random bytes, never all zero (splitmix64 seeded per thread by the
/// std's random hasher keys: unpredictable enough for ids, not for secrets).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    RNG.with(|s| loop {
        for chunk in out.chunks_mut(8) {
            let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        if out.iter().any(|b| *b != 0) {
            break;
        }
    });
    out
}

/// The span's OpenTelemetry context (`otel` feature and layer), else `None`.
pub fn span_context(span: &Span) -> Option<TraceContext> {
    #[cfg(feature = "otel")]
    {
        otel::context_of(span)
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = span;
        None
    }
}

/// The trace context a publish was given: the first message's own valid
/// `traceparent` property (set with
/// [`Publish::trace_parent`](crate::Publish::trace_parent) or by hand).
pub fn explicit_parent(messages: &[crate::OutgoingMessage]) -> Option<TraceContext> {
    messages
        .iter()
        .find_map(|m| TraceContext::from_properties(&m.properties))
}

/// Stamps the messages of one publish with the trace context of its
/// `publish` span and returns it (recorded as the span's `trace_id` and
/// `span_id` fields when weirmq made the ids).
///
/// `explicit` is the publish's own parent ([`explicit_parent`]); `on` says
/// whether tracing is on for publishes (a subscriber wants the span): then
/// the current OpenTelemetry span (`otel`) is a parent too.
///
/// - The span enabled (sampled): its OpenTelemetry context when there is
///   one (`otel`; its parent `explicit`, else the current span), else a
///   child of `explicit` made here, else a new sampled trace.
/// - The span not recording: a child of the parent (keeping its flag, so an
///   unsampled trace stays unsampled downstream); no parent: no context (a
///   trace that was not sampled is not started), and a malformed
///   `traceparent` is removed (W3C says to start afresh, never to fail).
pub fn stamp_publish(
    span: &Span,
    explicit: Option<TraceContext>,
    on: bool,
    messages: &mut [crate::OutgoingMessage],
) -> Option<TraceContext> {
    #[cfg(feature = "otel")]
    if let Some(p) = &explicit {
        otel::set_parent(span, p);
    }
    let ctx = if span.is_disabled() {
        explicit
            .or_else(|| if on { TraceContext::current() } else { None })
            .map(|p| p.child())
    } else {
        match span_context(span) {
            Some(c) => Some(c),
            None => {
                let own = match &explicit {
                    Some(p) => p.child(),
                    None => TraceContext::new_root(),
                };
                span.record("trace_id", tracing::field::display(own.trace_id));
                span.record("span_id", tracing::field::display(own.span_id));
                Some(own)
            }
        }
    };
    // Formatted once for the whole batch.
    let traceparent = ctx.as_ref().map(TraceContext::traceparent);
    for m in messages.iter_mut() {
        match (&ctx, &traceparent) {
            (Some(c), Some(tp)) => {
                m.properties.insert(TRACEPARENT.to_string(), tp.clone());
                match &c.state {
                    Some(s) => m.properties.insert(TRACESTATE.to_string(), s.clone()),
                    None => m.properties.remove(TRACESTATE),
                };
            }
            _ => {
                m.properties.remove(TRACEPARENT);
                m.properties.remove(TRACESTATE);
            }
        }
    }
    ctx
}

/// Makes `creation` (the context a delivered message carries) the parent of
/// its `process` span: its OpenTelemetry parent (`otel`), and the span's
/// `trace_id` / `parent_id` fields.
pub fn link_process(span: &Span, creation: &TraceContext) {
    if span.is_disabled() {
        return;
    }
    #[cfg(feature = "otel")]
    otel::set_parent(span, creation);
    span.record("trace_id", tracing::field::display(creation.trace_id));
    span.record("parent_id", tracing::field::display(creation.span_id));
}

#[cfg(feature = "otel")]
mod otel {
    use std::str::FromStr;

    use opentelemetry::trace::{
        SpanContext, SpanId as OtelSpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId,
        TraceState,
    };
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{SpanId, TraceContext, TraceId};

    pub(super) fn context_of(span: &Span) -> Option<TraceContext> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        TraceContext::new(
            TraceId(sc.trace_id().to_bytes()),
            SpanId(sc.span_id().to_bytes()),
            sc.is_sampled(),
            Some(state),
        )
        .ok()
    }

    pub(super) fn set_parent(span: &Span, ctx: &TraceContext) {
        if span.is_disabled() {
            return;
        }
        let sc = SpanContext::new(
            OtelTraceId::from_bytes(ctx.trace_id.0),
            OtelSpanId::from_bytes(ctx.span_id.0),
            if ctx.is_sampled() {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            ctx.tracestate()
                .and_then(|s| TraceState::from_str(s).ok())
                .unwrap_or_default(),
        );
        // Fails only when the layer is absent or the span already started:
        // then there is no OpenTelemetry parent to set.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_w3c_examples() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(tp, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(c.traceparent(), tp);
        assert_eq!(c.tracestate(), Some("congo=t61rcWkgMzE"));
        let unsampled = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        )
        .unwrap();
        assert!(!unsampled.is_sampled());
        // A future version's extra fields are ignored.
        let v1 = TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            None,
        )
        .unwrap();
        assert_eq!(v1.trace_id(), c.trace_id());
    }

    #[test]
    fn rejects_malformed_values_with_a_reason() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            let e = TraceContext::parse(bad, None).unwrap_err();
            assert!(e.to_string().contains("invalid traceparent"), "{bad}: {e}");
        }
    }

    #[test]
    fn roots_are_random_and_children_share_the_trace() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        let c = a.child();
        assert_eq!(c.trace_id(), a.trace_id());
        assert_ne!(c.span_id(), a.span_id());
        assert_eq!(TraceContext::parse(&c.traceparent(), None).unwrap(), c);
    }

    #[test]
    fn properties_round_trip_and_an_oversize_tracestate_is_dropped() {
        let mut props = BTreeMap::new();
        let c =
            TraceContext::new(TraceId([7; 16]), SpanId([9; 8]), true, Some("a=b".into())).unwrap();
        c.write_properties(&mut props);
        assert_eq!(TraceContext::from_properties(&props), Some(c));
        let long = TraceContext::new(
            TraceId([7; 16]),
            SpanId([9; 8]),
            true,
            Some("x".repeat(MAX_TRACESTATE_LEN + 1)),
        )
        .unwrap();
        long.write_properties(&mut props);
        assert!(!props.contains_key(TRACESTATE));
    }

    #[test]
    fn a_disabled_span_without_parent_stamps_nothing_and_drops_junk() {
        let mut ms =
            vec![crate::OutgoingMessage::new("t", b"x".to_vec()).property(TRACEPARENT, "junk")];
        let explicit = explicit_parent(&ms);
        assert_eq!(stamp_publish(&Span::none(), explicit, false, &mut ms), None);
        assert!(!ms[0].properties.contains_key(TRACEPARENT));
        let parent = TraceContext::new_root();
        let mut ms = vec![crate::OutgoingMessage::new("t", b"x".to_vec())
            .property(TRACEPARENT, parent.traceparent())];
        let explicit = explicit_parent(&ms);
        let c = stamp_publish(&Span::none(), explicit, false, &mut ms).unwrap();
        assert_eq!(c.trace_id(), parent.trace_id());
        assert_ne!(c.span_id(), parent.span_id());
        assert_eq!(TraceContext::from_properties(&ms[0].properties), Some(c));
    }

    #[test]
    fn an_unsampled_publish_starts_no_trace_and_keeps_an_unsampled_parent() {
        let mut ms = vec![
            crate::OutgoingMessage::new("t", b"x".to_vec()),
            crate::OutgoingMessage::new("t", b"y".to_vec()),
        ];
        assert_eq!(stamp_publish(&Span::none(), None, true, &mut ms), None);
        assert!(ms.iter().all(|m| m.properties.is_empty()));
        // An unsampled parent stays unsampled, in its own trace.
        let parent = TraceContext::new(TraceId([3; 16]), SpanId([4; 8]), false, None).unwrap();
        let mut ms = vec![crate::OutgoingMessage::new("t", b"x".to_vec())
            .property(TRACEPARENT, parent.traceparent())];
        let explicit = explicit_parent(&ms);
        let c = stamp_publish(&Span::none(), explicit, true, &mut ms).unwrap();
        assert_eq!(c.trace_id(), parent.trace_id());
        assert!(!c.is_sampled());
    }
}
