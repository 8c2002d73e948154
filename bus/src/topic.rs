//! Topics, names and message limits, with their validation.
//!
//! Validation happens before anything is stored: a message that breaks a
//! limit is rejected whole with a typed [`Error`], and the store never sees
//! it.

use std::time::Duration;

use crate::error::{Error, NameKind};
use crate::message::OutgoingMessage;

/// Queues per topic unless configured.
pub const DEFAULT_QUEUES: u32 = 4;
/// The longest topic name accepted (RocketMQ's limit).
pub const MAX_TOPIC_NAME_LEN: usize = 127;
/// The longest consumer group name accepted (RocketMQ's limit).
pub const MAX_GROUP_NAME_LEN: usize = 255;
/// Topic names starting with this belong to the system (dead-letter queues).
pub const SYSTEM_TOPIC_PREFIX: &str = "%";
/// The most queues a topic may have.
pub const MAX_QUEUES: u32 = 1024;
/// A topic's default dedupe window ([`TopicConfig::dedupe_window`]):
/// 2 minutes (NATS JetStream's default duplicate window), or the topic's
/// retention age if that is shorter.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(120);
/// The longest dedupe window a topic may have (7 days).
pub const MAX_DEDUPE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest idempotency key ([`Publish::dedupe_key`](crate::Publish::dedupe_key)), in bytes.
pub const MAX_DEDUPE_KEY_BYTES: usize = 256;
/// The highest message priority ([`Publish::priority`](crate::Publish::priority));
/// 0 is the default and the lowest.
pub const MAX_PRIORITY: u8 = 9;
/// The priority lanes every topic has besides its queues: one queue per
/// priority above 0.
pub const PRIORITY_LANES: u32 = MAX_PRIORITY as u32;

/// The queue of a topic of `queues` queues that holds its messages of
/// `priority` (1 to [`MAX_PRIORITY`]): its priority lane, `queues +
/// priority - 1`, after the topic's own queues. `None` for priority 0
/// (spread over the topic's queues) and for priorities out of range.
///
/// # Examples
///
/// ```
/// use weirmq_bus::{priority_queue, queue_priority};
/// assert_eq!(priority_queue(4, 0), None);
/// assert_eq!(priority_queue(4, 1), Some(4));
/// assert_eq!(priority_queue(4, 9), Some(12));
/// assert_eq!(queue_priority(4, 12), 9);
/// assert_eq!(queue_priority(4, 3), 0);
/// ```
pub fn priority_queue(queues: u32, priority: u8) -> Option<u32> {
    (1..=MAX_PRIORITY)
        .contains(&priority)
        .then(|| queues + u32::from(priority) - 1)
}

/// The priority whose messages queue `queue` of a topic of `queues` queues
/// holds: 0 for the topic's own queues, `p` for its priority lane `p`.
pub fn queue_priority(queues: u32, queue: u32) -> u8 {
    if queue < queues {
        0
    } else {
        (queue - queues + 1).min(u32::from(MAX_PRIORITY)) as u8
    }
}

/// How many queues a topic of `queues` queues keeps in an embedded store:
/// its own and its [`PRIORITY_LANES`].
pub fn queues_with_lanes(queues: u32) -> u32 {
    queues + PRIORITY_LANES
}

/// How long a topic keeps its messages (RocketMQ's `fileReservedTime`).
///
/// Retention ignores consumption: a message is removed when it is older than
/// `max_age`, or when the topic's queue is over `max_bytes` (oldest first),
/// whether or not every group has consumed it. A group whose position points
/// into removed data continues at the first kept message; the loss is
/// logged and counted ([`GroupStats::expired`](crate::GroupStats::expired)).
/// Messages that a group has scheduled for a retry are kept until the retry
/// is settled.
///
/// Removal is by whole stored records (up to 512 messages or 64 KiB), oldest
/// first, so a few messages may outlive their limit by one record.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use weirmq_bus::Retention;
/// let r = Retention::default().max_bytes(512 << 20);
/// assert_eq!(r.age(), Some(Duration::from_secs(72 * 3600)));
/// assert_eq!(r.bytes(), Some(512 << 20));
/// assert_eq!(Retention::forever().age(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    max_age: Option<Duration>,
    max_bytes: Option<u64>,
}

impl Retention {
    /// The default age limit: 72 hours (RocketMQ's default).
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(72 * 3600);

    /// Keep everything (no age or size limit).
    pub fn forever() -> Self {
        Retention {
            max_age: None,
            max_bytes: None,
        }
    }

    /// Removes messages older than `age` (by publish time).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// No age limit.
    pub fn no_max_age(mut self) -> Self {
        self.max_age = None;
        self
    }

    /// Removes the oldest messages of a queue while the queue holds more
    /// than `bytes` (stored size, per queue).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// The age limit, if any.
    pub fn age(&self) -> Option<Duration> {
        self.max_age
    }

    /// The per-queue size limit, if any.
    pub fn bytes(&self) -> Option<u64> {
        self.max_bytes
    }

    /// Checks the limits: an age of at least one millisecond, a size of at
    /// least one byte.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_age.is_some_and(|a| a.as_millis() == 0) {
            return Err(Error::InvalidConfig {
                reason: "retention max_age must be at least 1 ms (use Retention::forever() \
                         to keep everything)"
                    .into(),
            });
        }
        if self.max_bytes == Some(0) {
            return Err(Error::InvalidConfig {
                reason: "retention max_bytes must be at least 1 (use Retention::forever() \
                         to keep everything)"
                    .into(),
            });
        }
        Ok(())
    }
}

impl Default for Retention {
    /// 72 hours, no size limit.
    fn default() -> Self {
        Retention {
            max_age: Some(Self::DEFAULT_MAX_AGE),
            max_bytes: None,
        }
    }
}

/// A topic's configuration.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use weirmq_bus::{Retention, TopicConfig};
/// let cfg = TopicConfig::new("orders")
///     .queues(8)
///     .retention(Retention::default().max_age(Duration::from_secs(24 * 3600)))
///     .trace(true);
/// assert_eq!(cfg.queue_count(), 8);
/// assert!(cfg.traced());
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    name: String,
    queues: u32,
    retention: Retention,
    trace: bool,
    dedupe_window: Option<Duration>,
}

impl TopicConfig {
    /// A topic named `name` with [`DEFAULT_QUEUES`] queues, the default
    /// [`Retention`] (72 h) and no message trace.
    pub fn new(name: impl Into<String>) -> Self {
        TopicConfig {
            name: name.into(),
            queues: DEFAULT_QUEUES,
            retention: Retention::default(),
            trace: false,
            dedupe_window: None,
        }
    }

    /// Sets how long an idempotency key is remembered
    /// ([`Publish::dedupe_key`](crate::Publish::dedupe_key)): 1 ms to
    /// [`MAX_DEDUPE_WINDOW`], and no longer than the retention age.
    /// Default: [`DEFAULT_DEDUPE_WINDOW`] (2 minutes), or the retention
    /// age if that is shorter. Longer windows keep more keys: each costs
    /// about 100 bytes of memory and of store for the window.
    pub fn dedupe_window(mut self, window: Duration) -> Self {
        self.dedupe_window = Some(window);
        self
    }

    /// The dedupe window as set with [`TopicConfig::dedupe_window`]
    /// (`None`: the default applies).
    pub fn dedupe_window_set(&self) -> Option<Duration> {
        self.dedupe_window
    }

    /// The dedupe window in force: as set, else the default (see
    /// [`TopicConfig::dedupe_window`]).
    pub fn get_dedupe_window(&self) -> Duration {
        match (self.dedupe_window, self.retention.age()) {
            (Some(w), _) => w,
            (None, Some(age)) => age.min(DEFAULT_DEDUPE_WINDOW),
            (None, None) => DEFAULT_DEDUPE_WINDOW,
        }
    }

    /// Sets how long the topic keeps messages.
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Records a trace of every message's lifecycle (published, delivered,
    /// acked, retried, dead-lettered, resent), queryable by message id. It
    /// costs one small store write per event; off by default.
    pub fn trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }

    /// The topic's retention.
    pub fn retention_limits(&self) -> Retention {
        self.retention
    }

    /// Whether message trace is on.
    pub fn traced(&self) -> bool {
        self.trace
    }

    /// Sets the number of queues (1..=1024). Queues are the unit of
    /// parallelism and ordering: more queues, more consumers in parallel.
    pub fn queues(mut self, queues: u32) -> Self {
        self.queues = queues;
        self
    }

    /// The topic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of queues.
    pub fn queue_count(&self) -> u32 {
        self.queues
    }

    /// Checks the name (a user topic: no `%` prefix) and the queue count.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::ReservedTopic`] or
    /// [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<(), Error> {
        validate_topic_name(&self.name)?;
        self.validate_queues()?;
        self.retention.validate()?;
        self.validate_dedupe_window()
    }

    fn validate_dedupe_window(&self) -> Result<(), Error> {
        let Some(w) = self.dedupe_window else {
            return Ok(());
        };
        if w.as_millis() == 0 || w > MAX_DEDUPE_WINDOW {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "topic `{}` asks for a dedupe window of {w:?}; it is 1 ms to {} days",
                    self.name,
                    MAX_DEDUPE_WINDOW.as_secs() / 86_400
                ),
            });
        }
        if let Some(age) = self.retention.age().filter(|a| w > *a) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "topic `{}` asks for a dedupe window of {w:?}, longer than its retention \
                     ({age:?}): a key would outlive its message; shorten the window or keep \
                     messages longer",
                    self.name
                ),
            });
        }
        Ok(())
    }

    /// Checks a system topic's configuration (the `%` prefix allowed).
    ///
    /// # Errors
    ///
    /// As [`TopicConfig::validate`], without the reserved-prefix check.
    pub fn validate_system(&self) -> Result<(), Error> {
        check_name(NameKind::Topic, &self.name, MAX_TOPIC_NAME_LEN)?;
        self.validate_queues()?;
        self.retention.validate()
    }

    fn validate_queues(&self) -> Result<(), Error> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "topic `{}` asks for {} queues; a topic has 1 to {MAX_QUEUES} queues",
                    self.name, self.queues
                ),
            });
        }
        Ok(())
    }
}

fn check_name(kind: NameKind, name: &str, max: usize) -> Result<(), Error> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '%' | '|' | '-');
    if name.is_empty() || name.len() > max || !name.chars().all(ok_char) {
        return Err(Error::InvalidName {
            kind,
            name: name.to_string(),
            reason: format!("only [A-Za-z0-9_%|-] allowed, 1 to {max} chars"),
        });
    }
    Ok(())
}

/// The queue of an ordered message's message group among `queues`
/// (FNV-1a 64 of the group): stable across processes, releases and
/// backends, so a message group keeps its queue after a restart.
pub fn queue_for_message_group(group: &str, queues: u32) -> u32 {
    let h = group.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % queues.max(1) as u64) as u32
}

/// Checks a user topic name: 1 to 127 chars of `[A-Za-z0-9_%|-]`, not
/// starting with `%` (reserved for system topics).
///
/// # Errors
///
/// [`Error::InvalidName`] or [`Error::ReservedTopic`].
pub fn validate_topic_name(name: &str) -> Result<(), Error> {
    check_name(NameKind::Topic, name, MAX_TOPIC_NAME_LEN)?;
    if name.starts_with(SYSTEM_TOPIC_PREFIX) {
        return Err(Error::ReservedTopic {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Checks a consumer group name: 1 to 255 chars of `[A-Za-z0-9_%|-]`, not
/// starting with `%`.
///
/// # Errors
///
/// [`Error::InvalidName`].
pub fn validate_group_name(name: &str) -> Result<(), Error> {
    check_name(NameKind::Group, name, MAX_GROUP_NAME_LEN)?;
    if name.starts_with(SYSTEM_TOPIC_PREFIX) {
        return Err(Error::InvalidName {
            kind: NameKind::Group,
            name: name.to_string(),
            reason: "names starting with `%` are reserved for the system".into(),
        });
    }
    Ok(())
}

/// Size limits on messages, checked at publish. Defaults are RocketMQ's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body in bytes (default 4 MiB; 4 MiB + 1 is rejected).
    pub max_body_bytes: usize,
    /// Most user properties on one message (default 128).
    pub max_properties: usize,
    /// Most bytes of property names and values together (default 16 KiB).
    pub max_properties_bytes: usize,
    /// Longest tag, key, message group or property name in bytes (default
    /// 1024).
    pub max_name_bytes: usize,
    /// How far ahead a delayed message may be scheduled (default 24 h).
    pub max_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_properties: 128,
            max_properties_bytes: 16 * 1024,
            max_name_bytes: 1024,
            max_delay: Duration::from_secs(24 * 3600),
        }
    }
}

impl Limits {
    /// Checks everything about a message but its topic's existence: topic
    /// name (user topics only), tag, keys, properties and body size.
    ///
    /// # Errors
    ///
    /// The first limit broken, as a typed [`Error`].
    pub fn check(&self, m: &OutgoingMessage) -> Result<(), Error> {
        self.check_at(m, std::time::SystemTime::now())
    }

    /// As [`Limits::check`], with `now` the clock's time a delay is
    /// measured from (a broker passes its [`Clock`](crate::Clock)'s).
    ///
    /// # Errors
    ///
    /// The first limit broken, as a typed [`Error`].
    pub fn check_at(&self, m: &OutgoingMessage, now: std::time::SystemTime) -> Result<(), Error> {
        validate_topic_name(&m.topic)?;
        self.check_contents_at(m, now)
    }

    /// As [`Limits::check`] without the topic-name check (for system topics).
    ///
    /// # Errors
    ///
    /// The first limit broken, as a typed [`Error`].
    pub fn check_contents(&self, m: &OutgoingMessage) -> Result<(), Error> {
        self.check_contents_at(m, std::time::SystemTime::now())
    }

    /// As [`Limits::check_contents`], with `now` the time a delay is
    /// measured from.
    ///
    /// # Errors
    ///
    /// The first limit broken, as a typed [`Error`].
    pub fn check_contents_at(
        &self,
        m: &OutgoingMessage,
        now: std::time::SystemTime,
    ) -> Result<(), Error> {
        if let Some(tag) = &m.tag {
            if tag.is_empty() || tag.contains('|') || tag.len() > self.max_name_bytes {
                return Err(Error::InvalidName {
                    kind: NameKind::Tag,
                    name: tag.clone(),
                    reason: format!(
                        "a tag is 1 to {} bytes and may not contain `|` (it separates tags in filters)",
                        self.max_name_bytes
                    ),
                });
            }
        }
        for key in &m.keys {
            if key.is_empty() || key.len() > self.max_name_bytes {
                return Err(Error::InvalidName {
                    kind: NameKind::Key,
                    name: key.clone(),
                    reason: format!("a key is 1 to {} bytes", self.max_name_bytes),
                });
            }
        }
        if let Some(g) = &m.message_group {
            if g.is_empty() || g.len() > self.max_name_bytes {
                return Err(Error::InvalidName {
                    kind: NameKind::MessageGroup,
                    name: g.clone(),
                    reason: format!("a message group is 1 to {} bytes", self.max_name_bytes),
                });
            }
        }
        if m.priority > MAX_PRIORITY {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "message priority {} is out of range: priorities are 0 (the default, \
                     lowest) to {MAX_PRIORITY} (highest)",
                    m.priority
                ),
            });
        }
        if let Some(k) = &m.dedupe_key {
            if k.is_empty() || k.len() > MAX_DEDUPE_KEY_BYTES {
                return Err(Error::InvalidName {
                    kind: NameKind::DedupeKey,
                    name: k.clone(),
                    reason: format!("a dedupe key is 1 to {MAX_DEDUPE_KEY_BYTES} bytes"),
                });
            }
            if m.is_delayed() {
                return Err(Error::Unsupported {
                    feature: "a dedupe key on a delayed message (publish it under a \
                              fixed `Publish::message_id` to retry it safely on NATS)"
                        .into(),
                });
            }
        }
        let ahead = match (m.deliver_after, m.deliver_at) {
            (Some(d), _) => Some(d),
            (None, Some(at)) => Some(at.duration_since(now).unwrap_or_default()),
            (None, None) => None,
        };
        if let Some(ahead) = ahead {
            if ahead > self.max_delay {
                return Err(Error::DelayTooLong {
                    requested: ahead,
                    max: self.max_delay,
                });
            }
        }
        // The trace context weirmq stamps (bounded: a 55-byte traceparent,
        // a tracestate of at most 512) does not count against the user's
        // limits, so turning tracing on never makes a publish fail.
        let is_trace = |k: &str, v: &str| {
            (k == crate::TRACEPARENT && v.len() <= 64)
                || (k == crate::TRACESTATE && v.len() <= crate::MAX_TRACESTATE_LEN)
        };
        let count = m.properties.iter().filter(|(k, v)| !is_trace(k, v)).count();
        if count > self.max_properties {
            return Err(Error::TooManyProperties {
                count,
                max: self.max_properties,
            });
        }
        let mut size = 0;
        for (k, v) in m.properties.iter().filter(|(k, v)| !is_trace(k, v)) {
            if k.is_empty() || k.len() > self.max_name_bytes {
                return Err(Error::InvalidName {
                    kind: NameKind::Property,
                    name: k.clone(),
                    reason: format!("a property name is 1 to {} bytes", self.max_name_bytes),
                });
            }
            size += k.len() + v.len();
        }
        if size > self.max_properties_bytes {
            return Err(Error::PropertiesTooLarge {
                size,
                max: self.max_properties_bytes,
            });
        }
        if m.body.len() > self.max_body_bytes {
            return Err(Error::BodyTooLarge {
                size: m.body.len(),
                max: self.max_body_bytes,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders-v2_x|y%z").is_ok());
        assert!(validate_topic_name(&"a".repeat(127)).is_ok());
        for bad in ["", "a b", "é", "a/b", "a.b"] {
            assert!(
                matches!(validate_topic_name(bad), Err(Error::InvalidName { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            validate_topic_name(&"a".repeat(128)),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            validate_topic_name("%DLQ%g"),
            Err(Error::ReservedTopic { .. })
        ));
        assert!(TopicConfig::new("%DLQ%g").validate_system().is_ok());
    }

    #[test]
    fn limits() {
        let l = Limits::default();
        let ok = OutgoingMessage::new("t", vec![0; 4 * 1024 * 1024]);
        assert!(l.check(&ok).is_ok());
        let big = OutgoingMessage::new("t", vec![0; 4 * 1024 * 1024 + 1]);
        assert!(matches!(l.check(&big), Err(Error::BodyTooLarge { .. })));
        let tag = OutgoingMessage::new("t", vec![]).tag("a||b");
        assert!(matches!(
            l.check(&tag),
            Err(Error::InvalidName {
                kind: NameKind::Tag,
                ..
            })
        ));
        let mut many = OutgoingMessage::new("t", vec![]);
        for i in 0..129 {
            many = many.property(format!("p{i}"), "v");
        }
        assert!(matches!(
            l.check(&many),
            Err(Error::TooManyProperties { .. })
        ));
        let fat = OutgoingMessage::new("t", vec![]).property("p", "x".repeat(16 * 1024));
        assert!(matches!(
            l.check(&fat),
            Err(Error::PropertiesTooLarge { .. })
        ));
    }
}
