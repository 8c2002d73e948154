//! Dead letters as the admin API shows them, and redrive requests.
//!
//! A dead letter is stored as a message in the system topic `%DLQ%<group>`:
//! the original body, tag, keys and properties, plus properties saying where
//! it came from and why it died. [`DeadLetter`] reads those back.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::message::{Message, MessageId};

/// Property: the topic the message was published to.
pub const DLQ_ORIGIN_TOPIC: &str = "DLQ_ORIGIN_TOPIC";
/// Property: its queue in that topic.
pub const DLQ_ORIGIN_QUEUE: &str = "DLQ_ORIGIN_QUEUE";
/// Property: its offset in that queue.
pub const DLQ_ORIGIN_OFFSET: &str = "DLQ_ORIGIN_OFFSET";
/// Property: its message id.
pub const DLQ_ORIGIN_MSG_ID: &str = "DLQ_ORIGIN_MSG_ID";
/// Property: why it was dead-lettered (the last error).
pub const DLQ_REASON: &str = "DLQ_REASON";
/// Property: how many deliveries were attempted.
pub const DLQ_ATTEMPTS: &str = "DLQ_ATTEMPTS";
/// Property: when it first failed (Unix ms).
pub const DLQ_FIRST_FAILED_AT_MS: &str = "DLQ_FIRST_FAILED_AT_MS";
/// Property: when it was dead-lettered (Unix ms).
pub const DLQ_DEAD_LETTERED_AT_MS: &str = "DLQ_DEAD_LETTERED_AT_MS";

/// Every property a dead letter carries besides the original's.
pub const DLQ_PROPERTIES: [&str; 8] = [
    DLQ_ORIGIN_TOPIC,
    DLQ_ORIGIN_QUEUE,
    DLQ_ORIGIN_OFFSET,
    DLQ_ORIGIN_MSG_ID,
    DLQ_REASON,
    DLQ_ATTEMPTS,
    DLQ_FIRST_FAILED_AT_MS,
    DLQ_DEAD_LETTERED_AT_MS,
];

/// One dead letter of a consumer group.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its position in the group's dead-letter queue (for paging).
    pub dlq_offset: u64,
    /// The stored dead letter: the original's body, tag, keys and
    /// properties plus the `DLQ_*` properties.
    pub message: Arc<Message>,
    /// Whether it has been resent to the group already.
    pub resent: bool,
}

impl DeadLetter {
    fn prop(&self, name: &str) -> Option<&str> {
        self.message.properties().get(name).map(String::as_str)
    }

    fn time(&self, name: &str) -> Option<SystemTime> {
        let ms: u64 = self.prop(name)?.parse().ok()?;
        Some(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The original message's id.
    pub fn original_id(&self) -> Option<MessageId> {
        self.prop(DLQ_ORIGIN_MSG_ID)?.parse().ok()
    }
    /// The topic it was published to.
    pub fn origin_topic(&self) -> Option<&str> {
        self.prop(DLQ_ORIGIN_TOPIC)
    }
    /// Its queue in that topic.
    pub fn origin_queue(&self) -> Option<u32> {
        self.prop(DLQ_ORIGIN_QUEUE)?.parse().ok()
    }
    /// Its offset in that queue.
    pub fn origin_offset(&self) -> Option<u64> {
        self.prop(DLQ_ORIGIN_OFFSET)?.parse().ok()
    }
    /// Why it was dead-lettered.
    pub fn reason(&self) -> Option<&str> {
        self.prop(DLQ_REASON)
    }
    /// How many deliveries were attempted.
    pub fn attempts(&self) -> Option<u32> {
        self.prop(DLQ_ATTEMPTS)?.parse().ok()
    }
    /// When it first failed.
    pub fn first_failed_at(&self) -> Option<SystemTime> {
        self.time(DLQ_FIRST_FAILED_AT_MS)
    }
    /// When it was dead-lettered.
    pub fn dead_lettered_at(&self) -> Option<SystemTime> {
        self.time(DLQ_DEAD_LETTERED_AT_MS)
    }
}

/// Which dead letters to resend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resend {
    /// Every dead letter not resent yet.
    All,
    /// Those whose original message has one of these ids.
    Ids(Vec<MessageId>),
}

/// What happened to one dead letter asked to be resent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResendOutcome {
    /// Scheduled for delivery to the group (only that group) as attempt 1.
    Resent,
    /// No dead letter of this group has that id.
    NotFound,
    /// It was resent before; not sent twice.
    AlreadyResent,
    /// It could not be resent (the reason says why); it stays in the DLQ.
    Failed(String),
}

/// The outcome for one message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendReport {
    /// The original message's id.
    pub message_id: MessageId,
    /// What happened.
    pub outcome: ResendOutcome,
}
