//! What a handler receives and returns: [`Delivery<E>`] (the decoded event
//! with its message's metadata, and the witness that tells the supervisor
//! which delivery a panic cost) and [`HandlerError`].

use super::*;

/// One message delivered to a handler actor, decoded into its event type.
///
/// Implement `Handler<Delivery<E>>` for your actor; return `Ok(())` to ack.
pub struct Delivery<E> {
    pub(super) event: E,
    pub(super) message: Arc<BusMessage>,
    pub(super) attempt: u32,
    /// The `process <topic>` span (disabled when nothing listens).
    pub(super) span: tracing::Span,
    /// Tells the supervisor if this delivery is dropped by a panic.
    pub(super) _witness: PanicWitness,
    /// An inbox subscription's slot: the state this attempt commits with
    /// its processed mark (`None` on other subscriptions).
    pub(super) inbox: Option<Arc<InboxSlot>>,
}

/// What an attempt of an inbox subscription commits when its handler
/// returns `Ok`: its state writes, then its processed mark, in one atomic
/// write (see `SubscribeBuilder::inbox`).
#[derive(Debug)]
pub(super) struct InboxSlot {
    /// The mark's key (`weirmq_bus::inbox_key`).
    pub(super) key: Vec<u8>,
    /// The mark's value: when the attempt was handed out (Unix ms, the
    /// bus's clock; retention removes the mark an age after it).
    pub(super) at_ms: u64,
    /// The handler's writes so far.
    pub(super) ops: std::sync::Mutex<Vec<weirmq_bus::StateOp>>,
}

impl InboxSlot {
    /// The writes to commit: the handler's, then the mark.
    pub(super) fn take(&self) -> weirmq_bus::StateBatch {
        let ops = std::mem::take(&mut *self.ops.lock().unwrap_or_else(|p| p.into_inner()));
        weirmq_bus::StateBatch::from(ops).put(self.key.clone(), self.at_ms.to_be_bytes().to_vec())
    }
}

/// `commit_state` / `inbox_batch` on a subscription that is not an inbox.
fn not_an_inbox() -> Error {
    Error::InvalidConfig {
        reason: "state committed with a delivery needs an inbox subscription: start it \
                 with SubscribeBuilder::inbox() (embedded store; see docs/exactly-once.md)"
            .into(),
    }
}

/// The `process <topic>` span of one delivery attempt (with `otel`, the
/// OpenTelemetry messaging conventions: kind consumer; its parent the
/// publisher's span, from the message's `traceparent`; without, weirmq's
/// short log fields). A root of its own in `tracing`: it
/// is not nested under whatever the supervisor's thread is doing.
///
/// Recorded only when a subscriber wants it and the message's context is
/// sampled (a message without a context: when `sampling` picks it).
pub(super) fn process_span(
    sampling: &TraceSampling,
    group: &str,
    message: &BusMessage,
    attempt: u32,
) -> tracing::Span {
    use tracing::field::Empty;
    if !tracing::enabled!(
        kind: tracing::metadata::Kind::SPAN,
        target: "weirmq::process",
        tracing::Level::DEBUG
    ) {
        return tracing::Span::none();
    }
    let creation = message.trace_context();
    if !sampling.sample(creation.as_ref()) {
        return tracing::Span::none();
    }
    let span = if weirmq_bus::OTEL {
        tracing::debug_span!(
            target: "weirmq::process",
            parent: None,
            "process",
            otel.name = %format_args!("process {}", message.topic()),
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            messaging.system = "weirmq",
            messaging.operation.type = "process",
            messaging.destination.name = %message.topic(),
            messaging.destination.partition.id = message.queue(),
            messaging.consumer.group.name = %group,
            messaging.message.id = %message.id(),
            messaging.weirmq.attempt = attempt,
            outcome = Empty,
            trace_id = Empty,
            parent_id = Empty,
        )
    } else {
        tracing::debug_span!(
            target: "weirmq::process",
            parent: None,
            "process",
            topic = %message.topic(),
            %group,
            queue = message.queue(),
            msg_id = %message.id(),
            attempt,
            outcome = Empty,
            error = Empty,
            trace_id = Empty,
            parent_id = Empty,
        )
    };
    if let Some(creation) = &creation {
        weirmq_bus::link_process(&span, creation);
    }
    span
}

/// Records how a delivery attempt ended on its span: `outcome` (`ack`,
/// `retry`, `dead_letter`) and, unless acked, an error status.
pub(super) fn record_outcome(span: &tracing::Span, outcome: &'static str, error: Option<&str>) {
    span.record("outcome", outcome);
    if let Some(e) = error {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", e);
        span.record("error", e);
    }
}

/// Travels with a delivery and tells its member generation's [`Witness`]
/// when the handler reads it and whether it is dropped by a panic, so the
/// supervisor knows which of a dead member's deliveries killed it.
pub(super) struct PanicWitness {
    pub(super) slot: Arc<Witness>,
    pub(super) id: u64,
}

impl PanicWitness {
    pub(super) fn touch(&self) {
        self.slot.last_touched.store(self.id + 1, Ordering::Relaxed);
    }
}

impl Drop for PanicWitness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.slot.first_in_panic.compare_exchange(
                0,
                self.id + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// What one member generation's handler did with its deliveries (ids + 1;
/// 0: none).
///
/// When its actor dies in a panic, the delivery being handled is dropped
/// first while the thread unwinds (its frame is innermost), then some of
/// the ones queued in the mailbox; a handler that let go of its delivery
/// before panicking (`into_event`) read it last.
#[derive(Debug, Default)]
pub(super) struct Witness {
    pub(super) first_in_panic: AtomicU64,
    pub(super) last_touched: AtomicU64,
}

impl Witness {
    /// Which of `lost` (ids, sorted, of a dead generation's deliveries
    /// that got no reply) the actor died on: the one its handler read last,
    /// else the first dropped in the panic, else the earliest (a mailbox is
    /// handled in order). `None` when the delivery dropped in the panic is
    /// not among them: its reply came first, while the actor still looked
    /// alive, and it was settled then (as a failed attempt); every one of
    /// `lost` was sent to the dying mailbox after it and never ran.
    pub(super) fn culprit(&self, lost: &[u64]) -> Option<usize> {
        let touched = self.last_touched.load(Ordering::Relaxed);
        let panic = self.first_in_panic.load(Ordering::Relaxed);
        let find = |v: u64| lost.iter().position(|id| v != 0 && id + 1 == v);
        match find(touched).or_else(|| find(panic)) {
            Some(i) => Some(i),
            None if panic != 0 => None,
            None => Some(0),
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Delivery<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event)
            .field("message_id", &self.message.id())
            .field("queue", &self.message.queue())
            .field("offset", &self.message.offset())
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl<E: Event> actix::Message for Delivery<E> {
    type Result = Result<(), HandlerError>;
}

impl<E> Delivery<E> {
    /// The event.
    pub fn event(&self) -> &E {
        self._witness.touch();
        &self.event
    }
    /// Takes the event out.
    pub fn into_event(self) -> E {
        self._witness.touch();
        self.event
    }
    /// The stored message (id, tag, keys, properties, raw body, position).
    pub fn message(&self) -> &BusMessage {
        self._witness.touch();
        &self.message
    }
    /// The message id: stable across redeliveries, for idempotent handlers.
    pub fn message_id(&self) -> MessageId {
        self._witness.touch();
        self.message.id()
    }
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub fn attempt(&self) -> u32 {
        self._witness.touch();
        self.attempt
    }
    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self._witness.touch();
        self.message.tag()
    }
    /// The business keys.
    pub fn keys(&self) -> &[String] {
        self._witness.touch();
        self.message.keys()
    }
    /// The user properties.
    pub fn properties(&self) -> &std::collections::BTreeMap<String, String> {
        self._witness.touch();
        self.message.properties()
    }
    /// The priority it was published with: 0 (the default) to 9
    /// (`Publish::priority`); a retry keeps it.
    pub fn priority(&self) -> u8 {
        self._witness.touch();
        self.message.priority()
    }
    /// The queue of the topic the message is in.
    pub fn queue(&self) -> u32 {
        self._witness.touch();
        self.message.queue()
    }
    /// Its offset in that queue.
    pub fn offset(&self) -> u64 {
        self._witness.touch();
        self.message.offset()
    }
    /// When it was published.
    pub fn born_at(&self) -> SystemTime {
        self._witness.touch();
        self.message.born_at()
    }
    /// The trace context the message was published in: the W3C
    /// `traceparent` / `tracestate` of its publisher's span, kept through
    /// retries, delays, transactions, the dead-letter queue and a resend.
    /// `None` when it was published with tracing off and no parent given.
    ///
    /// Pass it to `Publish::trace_parent` to keep a follow-up message in the
    /// same trace without the `otel` feature.
    pub fn trace_context(&self) -> Option<weirmq_bus::TraceContext> {
        self._witness.touch();
        self.message.trace_context()
    }
    /// Inbox subscriptions (`SubscribeBuilder::inbox`): writes `state` to
    /// the application's state **atomically with this message's processed
    /// mark**, when the handler returns `Ok` — before the ack. If the
    /// handler fails, nothing of it is written. A message whose mark is
    /// stored is never handed to a handler of the group again (after a
    /// crash, a retry or a redelivery it is acked unseen), so the state
    /// changes exactly once per message per group. Several calls add up,
    /// in order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] on a subscription that is not an inbox.
    pub fn commit_state(&self, state: weirmq_bus::StateBatch) -> Result<(), Error> {
        self._witness.touch();
        let slot = self.inbox.as_ref().ok_or_else(not_an_inbox)?;
        slot.ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(state.into_ops());
        Ok(())
    }

    /// Inbox subscriptions: a batch holding this message's processed mark,
    /// to extend with your writes and pass to `Bus::publish_with_state` —
    /// the follow-up message, your state and the mark in one commit (outbox
    /// plus inbox: the message is processed, and its follow-up published,
    /// exactly once).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] on a subscription that is not an inbox.
    pub fn inbox_batch(&self) -> Result<weirmq_bus::StateBatch, Error> {
        self._witness.touch();
        let slot = self.inbox.as_ref().ok_or_else(not_an_inbox)?;
        Ok(weirmq_bus::StateBatch::new().put(slot.key.clone(), slot.at_ms.to_be_bytes().to_vec()))
    }

    /// The `process <topic>` span of this delivery attempt (disabled when
    /// no `tracing` subscriber listens to `weirmq::process` at DEBUG). Enter it, or
    /// instrument your handler's future with it, to log and trace under it:
    /// with the `otel` feature its OpenTelemetry parent is the publisher's
    /// span. It ends when the supervisor has the handler's answer.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorKind {
    Retry,
    DeadLetter,
}

/// A handler's failure: retry later (the default, and what `?` on any error
/// gives), or dead-letter now.
///
/// # Examples
///
/// ```
/// use weirmq_actors::HandlerError;
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse()?; // any std error: retry
///     if n == 0 {
///         return Err(HandlerError::dead_letter("zero is never valid")); // no retry
///     }
///     Ok(n)
/// }
/// assert!(parse("x").unwrap_err().is_retry());
/// assert!(!parse("0").unwrap_err().is_retry());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub(super) kind: ErrorKind,
    pub(super) message: String,
}

impl HandlerError {
    /// A transient failure: the message is delivered again later.
    pub fn retry(message: impl Into<String>) -> Self {
        HandlerError {
            kind: ErrorKind::Retry,
            message: message.into(),
        }
    }

    /// A permanent failure: the message goes to the group's dead-letter
    /// queue at once, with this reason.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        HandlerError {
            kind: ErrorKind::DeadLetter,
            message: reason.into(),
        }
    }

    /// Whether the message will be retried.
    pub fn is_retry(&self) -> bool {
        self.kind == ErrorKind::Retry
    }

    /// The message or reason.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Retry => write!(f, "handler failed (will retry): {}", self.message),
            ErrorKind::DeadLetter => write!(f, "handler dead-lettered: {}", self.message),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retry(e.to_string())
    }
}
