//! With the `otel` feature and a `tracing-opentelemetry` layer installed,
//! a publish continues the OpenTelemetry trace of the span it is made in,
//! and the handler's `process` span is a child of the `publish` span — after
//! a retry and after a dead letter is resent, on both backends. The spans
//! are exported to a collecting exporter and checked there, as a tracing
//! backend would see them.
//!
//! Run with `cargo test --features otel --test trace_otel` (CI does).
#![cfg(feature = "otel")]

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use support::backend::Backend;
use support::*;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use weirmq::prelude::*;
use weirmq::{Resend, ResendOutcome};

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// The process-wide subscriber (one per test binary): an OpenTelemetry
/// layer exporting to `Collected` as each span ends.
fn exported() -> &'static Collected {
    static COLLECTED: OnceLock<Collected> = OnceLock::new();
    COLLECTED.get_or_init(|| {
        let collected = Collected::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("weirmq-test"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other subscriber in this test binary");
        collected
    })
}

fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exported()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .cloned()
        .collect()
}

#[actix::test]
async fn embedded_handler_spans_are_children_of_the_publishers() {
    handler_spans_are_children_of_the_publishers(Backend::embedded()).await
}

#[actix::test]
async fn nats_handler_spans_are_children_of_the_publishers() {
    let Some(b) = Backend::nats().await else {
        return;
    };
    handler_spans_are_children_of_the_publishers(b).await
}

async fn handler_spans_are_children_of_the_publishers(b: Backend) {
    exported();
    let bus = b.open().await;
    // (n, attempt) -> the trace and parent the handler's span has.
    type Seen = BTreeMap<(u64, u32), (TraceId, SpanId)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let healed = Arc::new(AtomicU32::new(0));
    let (s, h) = (seen.clone(), healed.clone());
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("otel-traced")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 3))
        .members(
            1,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    let cx = d.span().context();
                    let sc = cx.span().span_context().clone();
                    let n = d.event().n;
                    let resent = h.load(Ordering::SeqCst);
                    s.lock().unwrap().insert(
                        (n, d.attempt() + 10 * resent),
                        (sc.trace_id(), sc.span_id()),
                    );
                    match n {
                        1 if d.attempt() == 1 => Err(HandlerError::retry("first attempt fails")),
                        2 if resent == 0 => Err(HandlerError::dead_letter("poison until healed")),
                        _ => Ok(()),
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();

    // Two requests, each publishing one event inside its own span.
    let mut requests = Vec::new();
    for n in [1u64, 2] {
        let request = tracing::info_span!("http request", n);
        let trace = request.context().span().span_context().trace_id();
        bus.publish(&Num { n })
            .instrument(request.clone())
            .await
            .unwrap();
        requests.push((n, trace, request));
    }
    delivered(&log, 3).await;
    wait_until(
        "the poison message dead-lettered",
        Duration::from_secs(20),
        || async { bus.dead_letter_count("otel-traced").await.unwrap() == 1 },
    )
    .await;
    healed.store(1, Ordering::SeqCst);
    let reports = bus
        .resend_dead_letters("otel-traced", Resend::All)
        .await
        .unwrap();
    assert_eq!(reports[0].outcome, ResendOutcome::Resent);
    delivered(&log, 4).await;
    caught_up(&bus, "otel-traced", Num::TOPIC).await;
    sub.drain().await.unwrap();
    let traces: BTreeMap<u64, TraceId> = requests.iter().map(|(n, t, _)| (*n, *t)).collect();
    drop(requests);

    let seen = seen.lock().unwrap().clone();
    let keys: Vec<_> = seen.keys().copied().collect();
    // 1: attempts 1 and 2; 2: attempt 1, then the resend's attempt 1.
    assert_eq!(keys, vec![(1, 1), (1, 2), (2, 1), (2, 11)], "{}", b.name());
    for ((n, attempt), (trace, _)) in &seen {
        assert_eq!(*trace, traces[n], "{n} attempt {attempt} on {}", b.name());
    }

    // As exported: request -> publish (producer) -> process (consumer), one
    // process span per attempt, each a child of the publish span.
    for (n, trace) in &traces {
        let want_process = 2;
        wait_until("the spans exported", Duration::from_secs(20), || async {
            let spans = spans_of(*trace);
            spans
                .iter()
                .filter(|s| s.name.starts_with("process"))
                .count()
                >= want_process
                && spans.iter().any(|s| s.name == "http request")
        })
        .await;
        let spans = spans_of(*trace);
        let request = spans.iter().find(|s| s.name == "http request").unwrap();
        let publish: Vec<_> = spans
            .iter()
            .filter(|s| s.name == format!("publish {}", Num::TOPIC))
            .collect();
        assert_eq!(publish.len(), 1, "{n} on {}: {spans:#?}", b.name());
        assert_eq!(publish[0].span_kind, SpanKind::Producer);
        assert_eq!(publish[0].parent_span_id, request.span_context.span_id());
        let process: Vec<_> = spans
            .iter()
            .filter(|s| s.name == format!("process {}", Num::TOPIC))
            .collect();
        assert_eq!(process.len(), want_process, "{n} on {}", b.name());
        for p in process {
            assert_eq!(p.span_kind, SpanKind::Consumer);
            assert_eq!(p.parent_span_id, publish[0].span_context.span_id());
            assert!(p.parent_span_is_remote);
        }
    }
    bus.shutdown().await.unwrap();
}
