//! Head sampling of the `publish` / `process` spans (`TraceSampling`):
//! with a subscriber that wants every weirmq span, the bus's sampler
//! decides which new traces record spans (an unsampled one carries no
//! context), a publish that continues a trace follows its flag and keeps
//! its context, and a delivery records a `process` span exactly when its
//! message's context is sampled (a message without one: when the
//! consumer's sampler picks it). The spans are seen by a recording layer, as a tracing backend
//! would see them.

mod support;

use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use support::wait_until;
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;
use weirmq::prelude::*;
use weirmq::{TraceContext, TraceSampling};

/// A span weirmq recorded: its name, topic and trace id.
#[derive(Debug, Clone, Default)]
struct SeenSpan {
    name: String,
    topic: String,
    trace_id: Option<String>,
}

#[derive(Default)]
struct SpanFields(SeenSpan);

impl tracing::field::Visit for SpanFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        match field.name() {
            "topic" | "messaging.destination.name" => self.0.topic = v,
            "trace_id" => self.0.trace_id = Some(v),
            _ => {}
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"))
    }
}

/// Keeps every weirmq span, with the fields recorded after it was made.
#[derive(Clone, Default)]
struct Recording(Arc<Mutex<Vec<SeenSpan>>>);

/// The span's place in `Recording`, in its extensions.
struct Slot(usize);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recording {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        if !attrs.metadata().target().starts_with("weirmq::") {
            return;
        }
        let mut fields = SpanFields(SeenSpan {
            name: attrs.metadata().name().to_string(),
            ..SeenSpan::default()
        });
        attrs.record(&mut fields);
        let mut spans = self.0.lock().unwrap();
        spans.push(fields.0);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Slot(spans.len() - 1));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(Slot(i)) = span.extensions().get::<Slot>().map(|s| Slot(s.0)) else {
            return;
        };
        let mut spans = self.0.lock().unwrap();
        let mut fields = SpanFields(spans[i].clone());
        values.record(&mut fields);
        spans[i] = fields.0;
    }
}

/// The process-wide subscriber of this test binary: every span at every
/// level, recorded (the tests tell theirs apart by topic).
fn recording() -> &'static Recording {
    static R: OnceLock<Recording> = OnceLock::new();
    R.get_or_init(|| {
        let r = Recording::default();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(r.clone()))
            .expect("no other subscriber in this test binary");
        r
    })
}

/// The spans named `name` of `topic`, by trace id.
fn spans(name: &str, topic: &str) -> Vec<Option<String>> {
    recording()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.name == name && s.topic == topic)
        .map(|s| s.trace_id.clone())
        .collect()
}

macro_rules! event {
    ($name:ident, $topic:literal) => {
        #[derive(Serialize, Deserialize, Debug, Clone)]
        struct $name {
            n: u64,
        }
        impl Event for $name {
            const TOPIC: &'static str = $topic;
        }
    };
}

event!(Never, "sampling-never");
event!(Capped, "sampling-capped");
event!(Always, "sampling-always");
event!(Ratio, "sampling-ratio");
event!(Batched, "sampling-batched");

/// The trace context of every delivery a handler saw.
type Contexts = Arc<Mutex<Vec<Option<TraceContext>>>>;

struct Seen<E> {
    contexts: Contexts,
    _event: PhantomData<fn() -> E>,
}

impl<E: Event> Actor for Seen<E> {
    type Context = Context<Self>;
}

impl<E: Event> Handler<Delivery<E>> for Seen<E> {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<E>, _: &mut Context<Self>) -> Self::Result {
        self.contexts.lock().unwrap().push(d.trace_context());
        Ok(())
    }
}

async fn open(sampling: TraceSampling) -> Bus {
    recording();
    Bus::builder()
        .in_memory()
        .trace_sampling(sampling)
        .open()
        .await
        .unwrap()
}

async fn subscribe<E: Event>(bus: &Bus, contexts: &Contexts) -> Subscription {
    let c = contexts.clone();
    bus.subscribe::<E>("sampled")
        .start_from(StartFrom::Earliest)
        .members(2, move || Seen::<E> {
            contexts: c.clone(),
            _event: PhantomData,
        })
        .start()
        .await
        .unwrap()
}

async fn seen(contexts: &Contexts, n: usize) -> Vec<Option<TraceContext>> {
    wait_until("every message handled", Duration::from_secs(20), || async {
        contexts.lock().unwrap().len() >= n
    })
    .await;
    contexts.lock().unwrap().clone()
}

/// Publishes `n` messages with tracing off on this thread: they carry no
/// trace context. (A subscriber that filters everything out, not
/// `Dispatch::none()`: tracing does not register that one, so a callsite
/// first seen under it would stay disabled in every thread.)
async fn publish_untraced<E: Event>(bus: &Bus, make: impl Fn(u64) -> E, n: u64) {
    let off = tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::OFF);
    let _off = tracing::subscriber::set_default(off);
    for i in 0..n {
        bus.publish(&make(i)).await.unwrap();
    }
}

#[actix::test]
async fn never_starts_a_trace_and_a_parent_decides() {
    let bus = open(TraceSampling::never()).await;
    let contexts = Contexts::default();
    // Published before the subscription with tracing off, without a
    // context: the consumer's sampler (never) decides their process spans.
    publish_untraced(&bus, |n| Never { n }, 5).await;
    let sub = subscribe::<Never>(&bus, &contexts).await;
    for n in 0..20 {
        bus.publish(&Never { n }).await.unwrap();
    }
    let got = seen(&contexts, 25).await;
    assert!(
        got.iter().all(Option::is_none),
        "an unsampled new trace is not started: {got:?}"
    );
    assert!(spans("publish", Never::TOPIC).is_empty());
    assert!(spans("process", Never::TOPIC).is_empty());

    // A sampled parent is followed: both spans, in the parent's trace.
    let parent = TraceContext::new_root();
    bus.publish_with(&Never { n: 100 }, Publish::new().trace_parent(&parent))
        .await
        .unwrap();
    // An unsampled parent too: no spans, the context kept.
    let unsampled = TraceContext::new(
        TraceContext::new_root().trace_id(),
        parent.span_id(),
        false,
        None,
    )
    .unwrap();
    bus.publish_with(&Never { n: 101 }, Publish::new().trace_parent(&unsampled))
        .await
        .unwrap();
    let got = seen(&contexts, 27).await;
    let last: Vec<&TraceContext> = got[25..].iter().flatten().collect();
    assert_eq!(last.len(), 2);
    let from_sampled = last
        .iter()
        .find(|c| c.trace_id() == parent.trace_id())
        .expect("the sampled parent's trace reaches the handler");
    assert!(from_sampled.is_sampled());
    let from_unsampled = last
        .iter()
        .find(|c| c.trace_id() == unsampled.trace_id())
        .expect("the unsampled parent's trace reaches the handler");
    assert!(!from_unsampled.is_sampled());
    let want = Some(parent.trace_id().to_string());
    wait_until("the process span recorded", Duration::from_secs(10), || {
        let want = want.clone();
        async move { spans("process", Never::TOPIC) == vec![want] }
    })
    .await;
    assert_eq!(spans("publish", Never::TOPIC), vec![want]);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn per_second_caps_new_traces_and_process_spans_follow_the_flag() {
    let bus = open(TraceSampling::per_second(5)).await;
    let contexts = Contexts::default();
    let sub = subscribe::<Capped>(&bus, &contexts).await;
    let started = Instant::now();
    for n in 0..200 {
        bus.publish(&Capped { n }).await.unwrap();
    }
    let got = seen(&contexts, 200).await;
    assert!(
        got.iter().flatten().all(TraceContext::is_sampled),
        "only sampled new traces carry a context"
    );
    let sampled: BTreeSet<String> = got
        .iter()
        .flatten()
        .map(|c| c.trace_id().to_string())
        .collect();
    assert!(!sampled.is_empty(), "the first publish is sampled");
    let publish: BTreeSet<String> = spans("publish", Capped::TOPIC)
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        publish, sampled,
        "a publish span exactly for each sampled trace"
    );
    wait_until(
        "the process spans recorded",
        Duration::from_secs(10),
        || {
            let n = sampled.len();
            async move { spans("process", Capped::TOPIC).iter().flatten().count() >= n }
        },
    )
    .await;
    let process = spans("process", Capped::TOPIC);
    let linked: BTreeSet<String> = process.iter().flatten().cloned().collect();
    assert_eq!(
        process.iter().flatten().count(),
        sampled.len(),
        "one process span per sampled message"
    );
    assert_eq!(linked, sampled, "in the publishers' traces");
    // The messages without a context are root decisions of the same
    // sampler: new traces too, within the same budget of 5 in each second
    // (the run may straddle several on a loaded machine).
    let roots = process.iter().filter(|t| t.is_none()).count() as u64;
    let windows = started.elapsed().as_secs() + 2;
    assert!(
        sampled.len() as u64 + roots <= 5 * windows,
        "{} + {roots} new traces in {windows} windows",
        sampled.len()
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn per_second_counts_every_message_of_a_batch() {
    // A budget of 50 messages a second and batches of 40: a sampled batch
    // is traced whole (one trace, 40 messages), and the budget is spent
    // by messages, not publishes, so a second traces at most 50 + 39 of
    // them however many batches are published in it.
    let bus = open(TraceSampling::per_second(50)).await;
    let contexts = Contexts::default();
    let sub = subscribe::<Batched>(&bus, &contexts).await;
    let started = Instant::now();
    for b in 0..20u64 {
        let batch: Vec<Batched> = (0..40).map(|i| Batched { n: b * 40 + i }).collect();
        bus.publish_batch(&batch).await.unwrap();
    }
    let got = seen(&contexts, 800).await;
    let windows = started.elapsed().as_secs() + 2;
    let mut per_trace = std::collections::BTreeMap::<String, usize>::new();
    for c in got.iter().flatten() {
        *per_trace.entry(c.trace_id().to_string()).or_default() += 1;
    }
    assert!(!per_trace.is_empty(), "the first batch is sampled");
    assert!(
        per_trace.values().all(|n| *n == 40),
        "a sampled batch is traced whole: {per_trace:?}"
    );
    let traced = per_trace.len() as u64 * 40;
    assert!(
        traced <= (50 + 39) * windows,
        "{traced} traced messages in {windows} windows"
    );
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn always_traces_every_message_and_samples_messages_without_a_context() {
    let bus = open(TraceSampling::always()).await;
    let contexts = Contexts::default();
    publish_untraced(&bus, |n| Always { n }, 4).await;
    let sub = subscribe::<Always>(&bus, &contexts).await;
    for n in 0..30 {
        bus.publish(&Always { n }).await.unwrap();
    }
    let got = seen(&contexts, 34).await;
    assert_eq!(got.iter().flatten().filter(|c| c.is_sampled()).count(), 30);
    assert_eq!(spans("publish", Always::TOPIC).len(), 30);
    wait_until(
        "the process spans recorded",
        Duration::from_secs(10),
        || async { spans("process", Always::TOPIC).len() >= 34 },
    )
    .await;
    // The 4 messages without a context get process spans of their own
    // (no trace id to link to).
    let process = spans("process", Always::TOPIC);
    assert_eq!(process.len(), 34);
    assert_eq!(process.iter().filter(|t| t.is_none()).count(), 4);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn ratio_samples_about_its_fraction() {
    let bus = open(TraceSampling::ratio(0.5)).await;
    let contexts = Contexts::default();
    let sub = subscribe::<Ratio>(&bus, &contexts).await;
    for n in 0..400 {
        bus.publish(&Ratio { n }).await.unwrap();
    }
    let got = seen(&contexts, 400).await;
    assert!(got.iter().flatten().all(TraceContext::is_sampled));
    let sampled = got.iter().flatten().count();
    // Binomial(400, 0.5): ± 75 is more than 7 standard deviations.
    assert!((125..=275).contains(&sampled), "{sampled} of 400 sampled");
    assert_eq!(spans("publish", Ratio::TOPIC).len(), sampled);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
