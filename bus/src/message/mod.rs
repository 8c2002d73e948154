//! Messages: what a publisher hands in ([`OutgoingMessage`], [`Publish`]),
//! what is stored and delivered ([`Message`]), and what comes back
//! ([`SendReceipt`]).
//!
//! A [`Message`] is immutable once the queue has given it an offset; the
//! broker shares it by `Arc` from the commit to every consumer group, so a
//! message is encoded once (at the store) and never copied on the way to its
//! subscribers. The stored envelope format (`encode_envelope` /
//! `decode_envelope`) lives here so every backend writes the same bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod envelope;
mod id;
mod publish;

pub use id::MessageId;
pub use publish::Publish;

use crate::error::StorageError;
use crate::time::{from_unix_ms, unix_ms, unix_ms_ceil};

/// How far a publish must have got before its receipt is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The message is in the store's write buffer (sled), on disk within
    /// ~0.5 s (sled's background flush): a crash or power loss in that window
    /// may lose it. No sync, so faster.
    Buffered,
    /// The message is on stable storage: the store was flushed *and*
    /// fdatasync'd (group commit: one sync covers every publish waiting).
    /// The default: a receipt means the message survives a power loss.
    #[default]
    Flushed,
}

/// A message as a publisher hands it to the bus, before it has an id or a
/// place in a queue. The raw form of a publish; typed events become one of
/// these through their codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The topic to publish to.
    pub topic: String,
    /// At most one tag (used by tag filters).
    pub tag: Option<String>,
    /// Business keys (used by query by key).
    pub keys: Vec<String>,
    /// User properties (used by SQL filters).
    pub properties: BTreeMap<String, String>,
    /// The message group of an ordered (FIFO) message: messages with the
    /// same group go to the same queue and a FIFO subscription handles them
    /// one at a time, in publish order.
    pub message_group: Option<String>,
    /// When the message becomes visible to consumers (a delayed message);
    /// `None` or a past instant: at once.
    pub deliver_at: Option<SystemTime>,
    /// How long after its publish the message becomes visible (a delayed
    /// message): the broker adds it to *its* clock's now when the publish
    /// is admitted (so a test bus's virtual clock delays it exactly), and
    /// it then wins over `deliver_at`. Set by [`OutgoingMessage::delay`].
    pub deliver_after: Option<Duration>,
    /// The payload.
    pub body: Vec<u8>,
    /// The id to publish it under; `None` (the default): a fresh one. Set
    /// it to retry a publish whose outcome is unknown
    /// ([`Error::Unavailable`](crate::Error::Unavailable)) without storing
    /// it twice (see [`Publish::message_id`]).
    pub id: Option<MessageId>,
    /// The idempotency key: a second publish with the same key to the
    /// same topic within the topic's dedupe window stores nothing and
    /// returns the first publish's receipt (see [`Publish::dedupe_key`]).
    pub dedupe_key: Option<String>,
    /// The priority, 0 (the default, lowest) to [`MAX_PRIORITY`] (highest):
    /// under a backlog a topic's higher priorities are delivered first (see
    /// [`Publish::priority`]).
    ///
    /// [`MAX_PRIORITY`]: crate::MAX_PRIORITY
    pub priority: u8,
}

impl OutgoingMessage {
    /// A message for `topic` with `body` and nothing else.
    pub fn new(topic: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        OutgoingMessage {
            topic: topic.into(),
            tag: None,
            keys: Vec::new(),
            properties: BTreeMap::new(),
            message_group: None,
            deliver_at: None,
            deliver_after: None,
            body: body.into(),
            id: None,
            dedupe_key: None,
            priority: 0,
        }
    }

    /// Sets the message group (ordered delivery per group).
    pub fn message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = Some(group.into());
        self
    }

    /// Delivers the message at `at` (not before).
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.deliver_at = Some(at);
        self.deliver_after = None;
        self
    }

    /// Delivers the message `delay` after it is published (by the bus's
    /// clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.deliver_after = Some(delay);
        self.deliver_at = None;
        self
    }

    /// Makes a relative delay absolute: `deliver_after` from `now` (what a
    /// broker does when it admits the publish).
    pub fn resolve_delay(&mut self, now: SystemTime) {
        if let Some(d) = self.deliver_after.take() {
            self.deliver_at = Some(now + d);
        }
    }

    /// Whether the message asks to be delayed (at an instant or after a
    /// while).
    pub fn is_delayed(&self) -> bool {
        self.deliver_at.is_some() || self.deliver_after.is_some()
    }

    /// Sets the tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Sets the idempotency key (see [`Publish::dedupe_key`]).
    pub fn dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    /// Sets the priority (see [`Publish::priority`]).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Adds a key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Sets a property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }
}

/// Proof that a message was stored: its id and its place in the topic.
///
/// For a delayed message (`deliver_at` in the future) the message is
/// stored at once, but gets its place in its topic only when it falls due:
/// `queue` and `offset` then name its place in the schedule (the system
/// topic [`SCHEDULE_TOPIC`]), and `deliver_at` says when it will be
/// delivered. Its id stays the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendReceipt {
    /// The message id.
    pub message_id: MessageId,
    /// The queue (0-based) of the topic the message went to.
    pub queue: u32,
    /// Its offset in that queue (dense, from 0).
    pub offset: u64,
    /// For a delayed message: when it becomes visible.
    pub deliver_at: Option<SystemTime>,
}

/// The system topic holding delayed messages until they fall due.
pub const SCHEDULE_TOPIC: &str = "%SCHEDULE%";
/// The system topic holding transactions' half messages.
pub const HALF_TOPIC: &str = "%HALF%";

/// Everything a stored message carries besides its place (topic, queue,
/// offset): what a backend writes and reads back in its own format
/// ([`Message::from_parts`]).
#[derive(Debug, Clone)]
pub struct MessageParts {
    /// The message id.
    pub id: MessageId,
    /// When it was published, ms since the Unix epoch.
    pub born_at_ms: u64,
    /// The tag.
    pub tag: Option<String>,
    /// The business keys.
    pub keys: Vec<String>,
    /// The user properties (and the trace context, `traceparent` /
    /// `tracestate`).
    pub properties: BTreeMap<String, String>,
    /// The message group of an ordered message.
    pub message_group: Option<String>,
    /// When a delayed message is due, ms since the Unix epoch.
    pub deliver_at_ms: Option<u64>,
    /// The topic a staged message (in a system topic) is for.
    pub destination: Option<String>,
    /// Whether it is a transaction's half message.
    pub half: bool,
    /// The priority (0 to [`MAX_PRIORITY`](crate::MAX_PRIORITY)).
    pub priority: u8,
    /// The payload: the event's encoded bytes.
    pub body: Vec<u8>,
}

/// A stored message: what consumers receive.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    id: MessageId,
    topic: Arc<str>,
    queue: u32,
    offset: u64,
    born_at_ms: u64,
    tag: Option<String>,
    keys: Vec<String>,
    properties: BTreeMap<String, String>,
    message_group: Option<String>,
    deliver_at_ms: Option<u64>,
    destination: Option<String>,
    half: bool,
    priority: u8,
    body: Vec<u8>,
    /// The idempotency key and the end of its window (Unix ms): what a
    /// store records beside the message so a later publish with the key
    /// finds it. Not part of the stored envelope.
    dedupe: Option<(Arc<str>, u64)>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("queue", &self.queue)
            .field("offset", &self.offset)
            .field("tag", &self.tag)
            .field("keys", &self.keys)
            .field("properties", &self.properties)
            .field("message_group", &self.message_group)
            .field("deliver_at_ms", &self.deliver_at_ms)
            .field("destination", &self.destination)
            .field("half", &self.half)
            .field("priority", &self.priority)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Message {
    /// Gives an outgoing message a fresh id and birth time; its queue and
    /// offset are set by the broker with [`Message::with_position`].
    pub fn prepare(out: OutgoingMessage, topic: Arc<str>) -> Message {
        Message::prepare_at(out, topic, SystemTime::now())
    }

    /// As [`Message::prepare`], born at `now` (the broker's clock); a
    /// relative delay still unresolved counts from `now` too.
    pub fn prepare_at(mut out: OutgoingMessage, topic: Arc<str>, now: SystemTime) -> Message {
        out.resolve_delay(now);
        Message {
            id: out.id.unwrap_or_else(MessageId::generate),
            topic,
            queue: 0,
            offset: 0,
            born_at_ms: unix_ms(now),
            tag: out.tag,
            keys: out.keys,
            properties: out.properties,
            message_group: out.message_group,
            // Rounded up to the millisecond: never due before its time.
            deliver_at_ms: out.deliver_at.map(unix_ms_ceil),
            destination: None,
            half: false,
            priority: out.priority,
            body: out.body,
            dedupe: out.dedupe_key.map(|k| (Arc::from(k), unix_ms(now))),
        }
    }

    /// A message read back from a backend's own format: `parts` as stored,
    /// placed at `offset` of `queue` of `topic`.
    pub fn from_parts(topic: Arc<str>, queue: u32, offset: u64, parts: MessageParts) -> Message {
        Message {
            id: parts.id,
            topic,
            queue,
            offset,
            born_at_ms: parts.born_at_ms,
            tag: parts.tag,
            keys: parts.keys,
            properties: parts.properties,
            message_group: parts.message_group,
            deliver_at_ms: parts.deliver_at_ms,
            destination: parts.destination,
            half: parts.half,
            priority: parts.priority,
            body: parts.body,
            dedupe: None,
        }
    }

    /// Marks a staged message as a transaction's *half message*: stored,
    /// invisible to consumers until its transaction commits; `deliver_at`
    /// is then when it is first checked.
    pub fn as_half(mut self) -> Message {
        self.half = true;
        self
    }

    /// Whether this is a transaction's half message.
    pub fn is_half(&self) -> bool {
        self.half
    }

    /// Marks a message stored in a system staging topic (a delayed message
    /// in [`SCHEDULE_TOPIC`]) with the topic it is for.
    pub fn with_destination(mut self, topic: impl Into<String>) -> Message {
        self.destination = Some(topic.into());
        self
    }

    /// Closes the window of the message's idempotency key `window` after
    /// its birth (a broker sets it from the topic's dedupe window).
    pub fn with_dedupe_window(mut self, window: Duration) -> Message {
        let born = self.born_at_ms;
        if let Some((_, until)) = &mut self.dedupe {
            *until = born.saturating_add(window.as_millis() as u64);
        }
        self
    }

    /// The idempotency key of the publish, and when its window closes
    /// (Unix ms); `None` for a publish without one.
    pub fn dedupe(&self) -> Option<(&str, u64)> {
        self.dedupe.as_ref().map(|(k, u)| (&**k, *u))
    }

    /// The copy of a staged message for its destination topic: same id,
    /// birth time and contents, not yet placed.
    pub fn for_destination(&self, topic: Arc<str>) -> Message {
        Message {
            topic,
            queue: 0,
            offset: 0,
            destination: None,
            half: false,
            // A half message's time was its check time, not a delivery time.
            deliver_at_ms: if self.half { None } else { self.deliver_at_ms },
            ..self.clone()
        }
    }

    /// This message with another message's identity: its id and birth time
    /// (for backends: a dead letter resent as its original).
    pub fn with_identity(mut self, id: MessageId, born_at: SystemTime) -> Message {
        self.id = id;
        self.born_at_ms = unix_ms(born_at);
        self
    }

    /// The message group of an ordered message.
    pub fn message_group(&self) -> Option<&str> {
        self.message_group.as_deref()
    }

    /// When a delayed message was (or is) due.
    pub fn deliver_at(&self) -> Option<SystemTime> {
        self.deliver_at_ms.map(from_unix_ms)
    }

    /// The topic a staged message (in a system topic) is for.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    /// The priority: 0 (the default, lowest) to
    /// [`MAX_PRIORITY`](crate::MAX_PRIORITY) (see [`Publish::priority`]).
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// Places the message at `offset` of `queue` (done once, by the broker).
    pub fn with_position(mut self, queue: u32, offset: u64) -> Message {
        self.queue = queue;
        self.offset = offset;
        self
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.id
    }
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// The topic, shared.
    pub fn topic_arc(&self) -> &Arc<str> {
        &self.topic
    }
    /// The queue of the topic.
    pub fn queue(&self) -> u32 {
        self.queue
    }
    /// The offset in the queue.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// When the message was published.
    pub fn born_at(&self) -> SystemTime {
        from_unix_ms(self.born_at_ms)
    }
    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
    /// The business keys.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
    /// The user properties.
    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }
    /// The trace context it was published in (its `traceparent` and
    /// `tracestate` properties), if it carries a valid one.
    pub fn trace_context(&self) -> Option<crate::TraceContext> {
        crate::TraceContext::from_properties(&self.properties)
    }
    /// The payload.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let out = OutgoingMessage::new("t", b"hello".to_vec())
            .tag("vip")
            .key("k1")
            .key("k2")
            .property("region", "eu");
        let m = Message::prepare(out, Arc::from("t")).with_position(3, 42);
        let mut buf = Vec::new();
        m.encode_envelope(&mut buf);
        let (d, n) = Message::decode_envelope(Arc::from("t"), 3, 42, &buf).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(d, m);
    }

    #[test]
    fn truncated_envelope_is_an_error_not_a_panic() {
        let m = Message::prepare(
            OutgoingMessage::new("t", vec![7; 100]).tag("a"),
            Arc::from("t"),
        );
        let mut buf = Vec::new();
        m.encode_envelope(&mut buf);
        for cut in 0..buf.len() {
            assert!(Message::decode_envelope(Arc::from("t"), 0, 0, &buf[..cut]).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_envelope_decoder(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Message::decode_envelope(Arc::from("t"), 0, 0, &bytes);
        }

        #[test]
        fn any_message_round_trips(
            tag in proptest::option::of("[a-z]{1,8}"),
            keys in proptest::collection::vec(".{1,12}", 0..4),
            props in proptest::collection::btree_map("[A-Za-z]{1,6}", ".{0,20}", 0..6),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            message_group in proptest::option::of(".{1,12}"),
            deliver_in_ms in proptest::option::of(0u64..100_000),
            destination in proptest::option::of("[a-z]{1,8}"),
            priority in 0u8..=9,
        ) {
            let out = OutgoingMessage {
                topic: "t".into(),
                tag,
                keys,
                properties: props,
                message_group,
                deliver_at: deliver_in_ms.map(|ms| SystemTime::now() + Duration::from_millis(ms)),
                deliver_after: None,
                body,
                id: None,
                dedupe_key: None,
                priority,
            };
            let mut m = Message::prepare(out, Arc::from("t")).with_position(1, 9);
            if let Some(d) = destination {
                m = m.with_destination(d);
            }
            let mut buf = Vec::new();
            m.encode_envelope(&mut buf);
            let (d, n) = Message::decode_envelope(Arc::from("t"), 1, 9, &buf).unwrap();
            proptest::prop_assert_eq!(n, buf.len());
            proptest::prop_assert_eq!(d, m);
        }
    }

    #[test]
    fn ids_are_unique_and_ordered_within_a_process() {
        let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::generate()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
        }
        let s = ids[0].to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<MessageId>().unwrap(), ids[0]);
    }
}
