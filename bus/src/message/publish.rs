//! [`Publish`]: the options of a typed publish.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::{Durability, MessageId, OutgoingMessage};

/// Options of a typed publish: tag, keys, properties, durability.
///
/// # Examples
///
/// ```
/// use weirmq_bus::{Durability, Publish};
/// let opts = Publish::new()
///     .tag("vip")
///     .key("user-42")
///     .property("region", "eu")
///     .durability(Durability::Buffered);
/// assert_eq!(opts.get_durability(), Some(Durability::Buffered));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publish {
    tag: Option<String>,
    keys: Vec<String>,
    properties: BTreeMap<String, String>,
    durability: Option<Durability>,
    message_group: Option<String>,
    deliver_at: Option<SystemTime>,
    deliver_after: Option<Duration>,
    message_id: Option<MessageId>,
    dedupe_key: Option<String>,
    priority: u8,
}

impl Publish {
    /// No tag, keys or properties; the bus's default durability.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the tag (at most one per message).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Adds a business key (several allowed).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Sets a user property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Makes the publish a child of `parent` (a span of the trace it
    /// belongs to, e.g. from an incoming request's `traceparent`, or
    /// `Delivery::trace_context()` in a handler): the message carries the
    /// trace id of `parent` and a new span id for its publish. Without it a
    /// publish continues the current OpenTelemetry span's trace (`otel`
    /// feature), else starts a trace of its own when tracing is on.
    pub fn trace_parent(mut self, parent: &crate::TraceContext) -> Self {
        parent.write_properties(&mut self.properties);
        self
    }

    /// Sets the durability of this publish (default: the bus's default,
    /// itself [`Durability::Flushed`] unless configured).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = Some(durability);
        self
    }

    /// The durability asked for, if any.
    pub fn get_durability(&self) -> Option<Durability> {
        self.durability
    }

    /// Makes this an ordered message of `group` (an order id, a user id...):
    /// every message of the group goes to the same queue, and a FIFO
    /// subscription handles them one at a time in publish order, while
    /// different groups are handled in parallel.
    pub fn message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = Some(group.into());
        self
    }

    /// Makes this a delayed message, visible to consumers at `at` (an
    /// instant in the past: at once). At most [`Limits::max_delay`]
    /// ahead (default 24 h).
    ///
    /// [`Limits::max_delay`]: crate::Limits::max_delay
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.deliver_at = Some(at);
        self.deliver_after = None;
        self
    }

    /// Makes this a delayed message, visible to consumers `delay` after it
    /// is published (measured by the bus's clock: a `weirmq::testing` bus
    /// delays it by exactly this much virtual time).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.deliver_after = Some(delay);
        self.deliver_at = None;
        self
    }

    /// Publishes under `id` instead of a fresh id: the way to retry a
    /// publish that failed with [`Error::Unavailable`](crate::Error::Unavailable)
    /// (its outcome unknown) so the message is stored once.
    ///
    /// On NATS the id is the `Nats-Msg-Id`: a second publish with an id
    /// the topic's stream stored within its duplicate window (2 minutes,
    /// from that first store; acks and deliveries do not move it) stores
    /// nothing and succeeds. On the embedded store a publish is never of
    /// unknown outcome, and the id is simply used (a second publish with
    /// it is stored again). Ids are 128-bit, time-ordered; make one ahead
    /// of time with [`MessageId::generate`] to retry any failure with it.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Paid { order: u64 }
    /// # impl weirmq_bus::Event for Paid { const TOPIC: &'static str = "paid"; }
    /// use weirmq_bus::{MessageId, Publish};
    /// let id = MessageId::generate();
    /// // bus.publish_with(&Paid { order: 7 }, Publish::new().message_id(id)).await,
    /// // and on any error the same call again: stored once.
    /// let options = Publish::new().message_id(id);
    /// # let _ = options;
    /// ```
    pub fn message_id(mut self, id: MessageId) -> Self {
        self.message_id = Some(id);
        self
    }

    /// Makes the publish idempotent: within the topic's dedupe window
    /// (default 2 minutes, [`TopicConfig::dedupe_window`]) a second
    /// publish with the same `key` to the same topic stores nothing and
    /// returns the first publish's receipt (same id, queue and offset).
    ///
    /// The window of a key opens when its first publish is admitted (the
    /// bus's clock; on NATS, when the server stores it) and closes exactly
    /// one window later: a publish at `first + window - 1 ms` is a
    /// duplicate, one at `first + window` is stored as a new message and
    /// opens a new window. Duplicates do not extend the window, and
    /// acking, delivering or dead-lettering the message does not close it.
    /// Two publishes with one key racing each other store one message: the
    /// second waits for the first's receipt (if the first fails, the
    /// second is published itself). A key is 1 to 256 bytes; a delayed,
    /// transactional or outbox message cannot carry one
    /// ([`Error::Unsupported`](crate::Error::Unsupported)).
    ///
    /// # Examples
    ///
    /// ```
    /// use weirmq_bus::Publish;
    /// // An order service publishes "order created" once per request id,
    /// // however often the client retries the request.
    /// let options = Publish::new().dedupe_key("create-order/req-7f3a");
    /// # let _ = options;
    /// ```
    ///
    /// [`TopicConfig::dedupe_window`]: crate::TopicConfig::dedupe_window
    pub fn dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    /// Sets the message's priority: 0 (the default, lowest) to
    /// [`MAX_PRIORITY`] = 9 (highest), as in RocketMQ 5. When a consumer
    /// group falls behind, the topic's messages of a higher priority are
    /// delivered before those of a lower one, whatever their publish order;
    /// within one priority, publish order. When the group keeps up,
    /// priority changes nothing: every message is delivered at once.
    ///
    /// A retried message keeps its priority (its retry is handed out with
    /// the retries and messages of its level), and so do delayed and
    /// transactional messages once they are visible. A dead letter carries
    /// it (a resend publishes the original with it), but `%DLQ%<group>`
    /// delivers in order of death. FIFO subscriptions ignore it: a message with a
    /// message group goes to its group's queue, in publish order, whatever
    /// its priority. A priority above 9 is refused at publish
    /// ([`Error::InvalidConfig`](crate::Error::InvalidConfig)); the NATS
    /// backend refuses priorities above 0
    /// ([`Error::Unsupported`](crate::Error::Unsupported)).
    ///
    /// How: a topic of `n` queues keeps priority `p > 0` in queue
    /// `n + p - 1` (its *priority lane*, see [`priority_queue`]); a group
    /// reads the lanes highest first. See docs/message-types.md.
    ///
    /// # Examples
    ///
    /// ```
    /// use weirmq_bus::Publish;
    /// // A payment timeout outranks the newsletter backlog.
    /// let urgent = Publish::new().priority(9);
    /// # let _ = urgent;
    /// ```
    ///
    /// [`MAX_PRIORITY`]: crate::MAX_PRIORITY
    /// [`priority_queue`]: crate::priority_queue
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Builds the raw message for `topic` and `body` with these options.
    pub fn into_message(self, topic: impl Into<String>, body: Vec<u8>) -> OutgoingMessage {
        OutgoingMessage {
            topic: topic.into(),
            tag: self.tag,
            keys: self.keys,
            properties: self.properties,
            message_group: self.message_group,
            deliver_at: self.deliver_at,
            deliver_after: self.deliver_after,
            body,
            id: self.message_id,
            dedupe_key: self.dedupe_key,
            priority: self.priority,
        }
    }
}
