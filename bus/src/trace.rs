//! Message trace: what happened to one message, in order.
//!
//! A topic configured with [`TopicConfig::trace`](crate::TopicConfig::trace)
//! records one [`TraceEvent`] per step of each message's life; the events
//! are kept as long as the message is (retention removes both), and read by
//! message id.

use std::time::{Duration, SystemTime};

use crate::message::MessageId;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TraceKind {
    /// Stored in its queue (the publish was acknowledged).
    Published,
    /// Handed to a consumer group's subscriber (`attempt` says which try).
    Delivered,
    /// Acknowledged by the group's handler.
    Acked,
    /// Failed; retried later (`detail`: the delay and the error).
    Retried,
    /// Moved to the group's dead-letter queue (`detail`: the reason).
    DeadLettered,
    /// Sent back to the group from its dead-letter queue.
    Resent,
    /// Skipped by the group's filter (never delivered to it).
    Filtered,
}

impl TraceKind {
    /// A stable one-byte code (the stored form).
    pub fn code(self) -> u8 {
        match self {
            TraceKind::Published => 1,
            TraceKind::Delivered => 2,
            TraceKind::Acked => 3,
            TraceKind::Retried => 4,
            TraceKind::DeadLettered => 5,
            TraceKind::Resent => 6,
            TraceKind::Filtered => 7,
        }
    }

    /// The kind of a stored code.
    pub fn from_code(code: u8) -> Option<TraceKind> {
        Some(match code {
            1 => TraceKind::Published,
            2 => TraceKind::Delivered,
            3 => TraceKind::Acked,
            4 => TraceKind::Retried,
            5 => TraceKind::DeadLettered,
            6 => TraceKind::Resent,
            7 => TraceKind::Filtered,
            _ => return None,
        })
    }
}

/// One step of a message's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// When it happened (millisecond precision).
    pub at: SystemTime,
    /// What happened.
    pub kind: TraceKind,
    /// The consumer group concerned (`None` for [`TraceKind::Published`]).
    pub group: Option<String>,
    /// The delivery attempt concerned (0 where none is).
    pub attempt: u32,
    /// The error, reason or delay, where there is one.
    pub detail: Option<String>,
}

impl TraceEvent {
    /// An event happening now.
    pub fn now(kind: TraceKind, group: Option<&str>, attempt: u32, detail: Option<String>) -> Self {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        TraceEvent {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
            kind,
            group: group.map(str::to_string),
            attempt,
            detail,
        }
    }
}

/// A message's trace: where it is stored and what happened to it, oldest
/// event first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTrace {
    /// The message.
    pub id: MessageId,
    /// Its topic.
    pub topic: String,
    /// Its queue.
    pub queue: u32,
    /// Its offset in the queue.
    pub offset: u64,
    /// Whether its topic records traces; if not, `events` is empty.
    pub traced: bool,
    /// The events, in the order they were recorded.
    pub events: Vec<TraceEvent>,
}

impl MessageTrace {
    /// The kinds of the events, in order (handy in tests and logs).
    pub fn kinds(&self) -> Vec<TraceKind> {
        self.events.iter().map(|e| e.kind).collect()
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionReport {
    /// Messages removed.
    pub messages: u64,
    /// Stored bytes of the removed messages (before the store's own
    /// overhead; the store reuses the space for new writes).
    pub bytes: u64,
    /// Queues that lost messages.
    pub queues: u32,
}
