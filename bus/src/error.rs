//! Errors: one enum for the bus, with messages a user can act on.
//!
//! Expected outcomes are not errors: a filtered message or a duplicate is a
//! value. An [`Error`] means the operation did not happen: nothing was stored
//! (validation, codec, closed bus) or the store failed (fail-stop: the bus
//! refuses further writes rather than risk a hole in a queue log).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::message::OutgoingMessage;

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
    /// What the store was doing.
    pub context: String,
    /// The underlying error, if any.
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
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
        }
    }

    /// A storage error with context only.
    pub fn msg(context: impl Into<String>) -> Self {
        StorageError {
            context: context.into(),
            source: None,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {}", self.context, s),
            None => f.write_str(&self.context),
        }
    }
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
    /// The store failed; the bus stops accepting writes (fail-stop).
    Storage(StorageError),
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
    /// The bus (or subscription) has been shut down.
    Closed,
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
            Error::Closed => f.write_str("the bus has been shut down"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Codec(e) => Some(e),
            Error::Storage(e) => Some(e),
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
    fn from(e: StorageError) -> Self {
        Error::Storage(e)
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
