//! Errors: one enum for the bus, with messages a user can act on.
//!
//! Expected outcomes are not errors: a filtered message or a duplicate is a
//! value. An [`Error`] means the operation did not happen: nothing was stored
//! (validation, codec, closed bus, a full disk) or the store failed
//! (fail-stop, [`Error::StoreFailed`]: the bus refuses further writes rather
//! than risk a hole in a queue log, until it is reopened).
//!
//! Every message says in plain words what happened, where (the data
//! directory) and what to do; inner errors are shown by their `Display`,
//! never their `Debug`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::message::{MessageId, OutgoingMessage};

/// What kind of name failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A topic name.
    Topic,
    /// A consumer group name.
    Group,
    /// A message tag.
    Tag,
    /// A message key.
    Key,
    /// A property name.
    Property,
    /// A message group (ordered messages).
    MessageGroup,
    /// An idempotency key (`Publish::dedupe_key`).
    DedupeKey,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Topic => "topic name",
            NameKind::Group => "consumer group name",
            NameKind::Tag => "tag",
            NameKind::Key => "message key",
            NameKind::Property => "property name",
            NameKind::MessageGroup => "message group",
            NameKind::DedupeKey => "dedupe key",
        })
    }
}

/// An event could not be encoded, or a body could not be decoded into the
/// subscribed event type.
#[derive(Debug, Clone)]
pub struct CodecError {
    /// The codec that failed (`"json"`, ...).
    pub codec: &'static str,
    /// The codec's own description of the failure.
    pub detail: String,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} codec: {}", self.codec, self.detail)
    }
}

impl std::error::Error for CodecError {}

/// The store failed: an I/O error, a sled error, or data that does not decode.
///
/// Cloneable so one failed group commit can be reported to every publisher
/// waiting on it.
#[derive(Debug, Clone)]
pub struct StorageError {
    /// What the store was doing ("writing the queue log").
    pub context: String,
    /// The underlying error, if any (its `Display` is plain words).
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    /// The data directory, if the store has one.
    pub path: Option<PathBuf>,
    /// What to do about it, if the cause tells.
    pub advice: Option<String>,
    /// Set when this failure stopped the store's writes (fail-stop): when.
    /// Such an error becomes [`Error::StoreFailed`].
    pub stopped_at: Option<SystemTime>,
}

impl StorageError {
    /// A storage error with context and an underlying cause.
    pub fn new(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StorageError {
            context: context.into(),
            source: Some(Arc::new(source)),
            path: None,
            advice: None,
            stopped_at: None,
        }
    }

    /// A storage error with context only.
    pub fn msg(context: impl Into<String>) -> Self {
        StorageError {
            context: context.into(),
            source: None,
            path: None,
            advice: None,
            stopped_at: None,
        }
    }

    /// Names the data directory (unless one is named already).
    pub fn in_dir(mut self, path: Option<&Path>) -> Self {
        if self.path.is_none() {
            self.path = path.map(Path::to_path_buf);
        }
        self
    }

    /// Says what to do (unless advice is given already).
    pub fn with_advice(mut self, advice: impl Into<String>) -> Self {
        self.advice.get_or_insert_with(|| advice.into());
        self
    }

    /// Marks the failure as the one that stopped the store's writes.
    pub fn stopping(mut self, at: SystemTime) -> Self {
        self.stopped_at.get_or_insert(at);
        self
    }

    /// The I/O error kind underneath, if the cause is an I/O error.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Some(io.kind());
            }
            cause = e.source();
        }
        None
    }

    /// What happened (and where, if `with_path`), without the advice.
    fn what(&self, f: &mut fmt::Formatter<'_>, with_path: bool) -> fmt::Result {
        f.write_str(&self.context)?;
        if let (true, Some(p)) = (with_path, &self.path) {
            write!(f, " in `{}`", p.display())?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.what(f, true)?;
        if let Some(a) = &self.advice {
            write!(f, "; {a}")?;
        }
        Ok(())
    }
}

/// `t` as an RFC 3339 UTC time to the second (`2026-12-02T14:03:09Z`).
pub fn utc_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for 1970 onwards.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Everything that can go wrong in a bus operation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A name (topic, group, tag, key, property) is not valid.
    InvalidName {
        /// What was being named.
        kind: NameKind,
        /// The offending name.
        name: String,
        /// Why it is invalid and what is allowed.
        reason: String,
    },
    /// The topic name starts with `%`, which is reserved for system topics
    /// such as dead-letter queues.
    ReservedTopic {
        /// The offending name.
        name: String,
    },
    /// The message body is larger than [`Limits::max_body_bytes`](crate::Limits).
    BodyTooLarge {
        /// The body size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The message carries more properties than allowed.
    TooManyProperties {
        /// How many properties the message has.
        count: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The properties (names and values) take more bytes than allowed.
    PropertiesTooLarge {
        /// Total bytes of names and values.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A configuration value is out of range.
    InvalidConfig {
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A subscription filter does not parse.
    InvalidFilter {
        /// The expression.
        expression: String,
        /// The byte position of the problem.
        position: usize,
        /// What was expected.
        reason: String,
    },
    /// The topic exists with a different configuration.
    TopicConflict {
        /// The topic.
        topic: String,
        /// How the existing configuration differs.
        reason: String,
    },
    /// An event could not be encoded or decoded.
    Codec(CodecError),
    /// A storage operation failed (a read, or a write the store could
    /// refuse without stopping). The store goes on; see the message for
    /// what to do.
    Storage(StorageError),
    /// The store stopped accepting writes after a write or sync failed
    /// (fail-stop: a later write could otherwise paper over a hole in a
    /// queue log). Everything that got a receipt before the failure is
    /// kept. Fix the cause (e.g. free disk space), then reopen the bus:
    /// [`shutdown`](crate::Broker::shutdown) still closes the store and
    /// answers `Ok`.
    StoreFailed {
        /// The data directory (`None` for an in-memory store).
        path: Option<PathBuf>,
        /// When the store stopped.
        since: SystemTime,
        /// The write or sync that failed.
        cause: Box<StorageError>,
    },
    /// The filesystem holding the data directory has less free space than
    /// the store keeps in reserve: the publish was refused before the disk
    /// is full, and nothing was stored. The store goes on; publishes are
    /// accepted again once there is room.
    StoreFull {
        /// The data directory.
        path: PathBuf,
        /// Bytes free on its filesystem (counting space the store freed
        /// inside its own files and can reuse).
        available: u64,
        /// The reserve the store keeps free.
        reserve: u64,
    },
    /// An in-memory bus would pass its memory budget
    /// (`BusBuilder::memory_budget`) with this publish: it was refused and
    /// nothing was stored. Consumed messages are removed as the store
    /// fills, so this means consumers are behind (or there are none).
    MemoryFull {
        /// The budget, in bytes.
        budget: u64,
        /// Bytes of the budget still free when the publish was refused.
        available: u64,
    },
    /// The data directory cannot be used: it is corrupt, not a weirmq
    /// directory, or locked by another process.
    DataDir {
        /// The data directory.
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// This consumer group already has a running subscription to this topic in
    /// this process. Add members to the existing subscription instead.
    AlreadySubscribed {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
    },
    /// A delayed message is scheduled further ahead than allowed.
    DelayTooLong {
        /// How far ahead it was asked for.
        requested: std::time::Duration,
        /// The limit ([`Limits::max_delay`](crate::Limits::max_delay)).
        max: std::time::Duration,
    },
    /// The backend cannot do this.
    Unsupported {
        /// What was asked for.
        feature: String,
    },
    /// The publish pipeline is full (the store is not keeping up): returned
    /// by `try_publish` instead of waiting. Nothing was stored; try again
    /// later or use `publish`, which waits for room.
    Busy {
        /// How many messages are waiting for their commit.
        pending: usize,
    },
    /// The backend could not be reached to confirm a publish (NATS: the
    /// server did not acknowledge it in time, or the connection broke):
    /// **the outcome is unknown** — each message may have been stored (and
    /// will then be delivered) or not. Not a failure of the store: the bus
    /// reconnects by itself.
    ///
    /// Retry each message with the *same id*
    /// ([`Publish::message_id`](crate::Publish::message_id)): a message
    /// the backend already stored is then recognised as a duplicate and
    /// stored once (NATS: within the topic stream's duplicate window, 2
    /// minutes). A retry under a new id may store it twice. See
    /// `docs/scaling.md`, "When the server is unreachable".
    Unavailable {
        /// What could not be confirmed.
        operation: String,
        /// Why, in the backend's words.
        detail: String,
        /// The ids of the messages whose outcome is unknown, in publish
        /// order (every message of the call: those already stored are
        /// deduplicated by the retry).
        message_ids: Vec<MessageId>,
    },
    /// The bus (or subscription) has been shut down.
    Closed,
}

impl Error {
    /// Whether the outcome of the operation is unknown
    /// ([`Error::Unavailable`]): retry it with the same message ids.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidName { kind, name, reason } => {
                write!(f, "{kind} `{name}` is invalid: {reason}")
            }
            Error::ReservedTopic { name } => write!(
                f,
                "topic name `{name}` is reserved: names starting with `%` belong to system topics \
                 (dead-letter queues); choose a name without the leading `%`"
            ),
            Error::BodyTooLarge { size, max } => write!(
                f,
                "message body is {size} bytes, more than the limit of {max} bytes; \
                 store large payloads elsewhere and publish a reference, or raise Limits::max_body_bytes"
            ),
            Error::TooManyProperties { count, max } => write!(
                f,
                "message has {count} properties, more than the limit of {max}"
            ),
            Error::PropertiesTooLarge { size, max } => write!(
                f,
                "message properties take {size} bytes (names and values), more than the limit of {max} bytes"
            ),
            Error::InvalidConfig { reason } => write!(f, "invalid configuration: {reason}"),
            Error::InvalidFilter {
                expression,
                position,
                reason,
            } => write!(
                f,
                "filter `{expression}` is invalid at position {position}: {reason}"
            ),
            Error::TopicConflict { topic, reason } => {
                write!(f, "topic `{topic}` already exists with another configuration: {reason}")
            }
            Error::Codec(e) => write!(f, "{e}"),
            Error::Storage(e) => write!(f, "storage failure: {e}"),
            Error::StoreFailed { path, since, cause } => {
                write!(f, "the store")?;
                if let Some(p) = path {
                    write!(f, " in `{}`", p.display())?;
                }
                write!(f, " stopped accepting writes at {} after a failure while ", utc_time(*since))?;
                cause.what(f, path.is_none())?;
                if let Some(a) = &cause.advice {
                    write!(f, "; {a}")?;
                }
                f.write_str(
                    ". Everything that got a receipt before is kept; once the cause is fixed, \
                     reopen the bus (shut it down, then open it again)",
                )
            }
            Error::MemoryFull { budget, available } => write!(
                f,
                "the in-memory store is full: {} of its {} budget is free, not enough for this \
                 publish: it was refused and nothing was stored. Let consumers catch up \
                 (consumed messages are removed as the store fills), publish less at once, or \
                 raise BusBuilder::memory_budget",
                bytes(*available),
                bytes(*budget)
            ),
            Error::StoreFull {
                path,
                available,
                reserve,
            } => write!(
                f,
                "the filesystem holding `{}` has {} free, less than the {} the store keeps in \
                 reserve: the publish was refused and nothing was stored. Free disk space, let \
                 consumers catch up so retention can remove what they consumed, or lower \
                 BusBuilder::min_free_space",
                path.display(),
                bytes(*available),
                bytes(*reserve)
            ),
            Error::DataDir { path, reason } => {
                write!(f, "cannot use data directory `{}`: {reason}", path.display())
            }
            Error::AlreadySubscribed { group, topic } => write!(
                f,
                "consumer group `{group}` already has a running subscription to topic `{topic}` \
                 in this process; give it more members instead of subscribing twice"
            ),
            Error::DelayTooLong { requested, max } => write!(
                f,
                "a delayed message may be scheduled at most {max:?} ahead, not {requested:?}; \
                 raise Limits::max_delay, or keep such far-off jobs in your own scheduler"
            ),
            Error::Unsupported { feature } => {
                write!(f, "not supported by this backend: {feature}")
            }
            Error::Busy { pending } => write!(
                f,
                "the bus is busy: {pending} published messages are waiting for the store; \
                 retry later, or use publish() to wait for room"
            ),
            Error::Unavailable {
                operation,
                detail,
                message_ids,
            } => {
                write!(f, "backend unavailable: {operation}: {detail}; ")?;
                match message_ids.len() {
                    0 => f.write_str("retry when it is back"),
                    1 => write!(
                        f,
                        "message {} may or may not be stored: retry it with the same id \
                         (Publish::message_id) to store it once",
                        message_ids[0]
                    ),
                    n => write!(
                        f,
                        "{n} messages (ids from {}) may or may not be stored: retry each with \
                         its id (Publish::message_id) to store each once",
                        message_ids[0]
                    ),
                }
            }
            Error::Closed => f.write_str("the bus has been shut down"),
        }
    }
}

/// A byte count for people: `3.2 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Codec(e) => Some(e),
            Error::Storage(e) => Some(e),
            Error::StoreFailed { cause, .. } => Some(cause.as_ref()),
            _ => None,
        }
    }
}

impl From<CodecError> for Error {
    fn from(e: CodecError) -> Self {
        Error::Codec(e)
    }
}

impl From<StorageError> for Error {
    /// [`Error::StoreFailed`] if the failure stopped the store, else
    /// [`Error::Storage`].
    fn from(e: StorageError) -> Self {
        match e.stopped_at {
            Some(since) => Error::StoreFailed {
                path: e.path.clone(),
                since,
                cause: Box::new(e),
            },
            None => Error::Storage(e),
        }
    }
}

/// A raw publish failed; the message is handed back so nothing the caller
/// gave is lost (like tokio's `SendError<T>`).
#[derive(Debug)]
pub struct PublishError {
    /// The message that was not published.
    pub message: Box<OutgoingMessage>,
    /// Why.
    pub error: Error,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "publish to `{}` failed: {}",
            self.message.topic, self.error
        )
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// A `try_publish` that did not publish; the event is handed back.
#[derive(Debug)]
pub struct TryPublishError<E> {
    /// The event that was not published.
    pub event: E,
    /// Why: [`Error::Busy`] when the pipeline is full, else as `publish`.
    pub error: Error,
}

impl<E> TryPublishError<E> {
    /// Whether the bus was only busy (worth retrying later).
    pub fn is_busy(&self) -> bool {
        matches!(self.error, Error::Busy { .. })
    }
}

impl<E> fmt::Display for TryPublishError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event not published: {}", self.error)
    }
}

impl<E: fmt::Debug> std::error::Error for TryPublishError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_time_formats_rfc3339() {
        assert_eq!(utc_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_220_189); // 2026-12-02T14:03:09Z
        assert_eq!(utc_time(t), "2026-12-02T14:03:09Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_time(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_fail_stop_storage_error_becomes_store_failed_and_reads_plainly() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = StorageError::new("flushing the store", io)
            .in_dir(Some(Path::new("/data/bus")))
            .with_advice("the disk is full: free space on it")
            .stopping(UNIX_EPOCH + Duration::from_secs(1_796_220_189));
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::StorageFull));
        let err = Error::from(e);
        let text = err.to_string();
        assert!(matches!(err, Error::StoreFailed { .. }), "{text}");
        assert!(text.starts_with("the store in `/data/bus` stopped accepting writes at 2026-12-02T14:03:09Z after a failure while flushing the store: No space left on device (os error 28); the disk is full"), "{text}");
        assert!(text.contains("reopen the bus"), "{text}");
        assert_eq!(bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(bytes(512), "512 bytes");
    }
}
