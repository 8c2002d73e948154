//! The dead-letters role: a group's dead-letter queue, read, resent and
//! purged; and what a dead letter is, written once for every backend.
//!
//! A dead letter is stored as a message in the system topic `%DLQ%<group>`
//! ([`dlq_topic`]): the original body, tag, keys and properties, plus the
//! `DLQ_*` properties saying where it came from and why it died
//! ([`DeadLetterCopy`] writes them, [`DeadLetter`] reads them back).
//!
//! # Contract
//!
//! * Dead letters are kept in the order they died, each with a DLQ offset
//!   that pages them ([`DeadLetters::dead_letters`]).
//! * [`DeadLetters::resend_dead_letters`] sends a dead letter back to its
//!   group only, as attempt 1, each at most once (it is marked resent, and
//!   stays in the queue until purged); which letters is decided by
//!   [`ResendPlan`], the same on every backend; one report per message.
//! * [`DeadLetters::purge_dead_letters`] deletes them all; the queue's
//!   offsets never go back.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::{Message, MessageId, OutgoingMessage};

/// A group's dead-letter queue.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// One page of `group`'s dead letters, oldest first, from DLQ offset
    /// `from`.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>, Error>;

    /// How many dead letters `group` holds.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn dead_letter_count(&self, group: &str) -> Result<u64, Error>;

    /// Sends dead letters back to `group` only, as attempt 1, each at most
    /// once; one report per message.
    ///
    /// # Errors
    ///
    /// A storage error reading the dead-letter queue.
    async fn resend_dead_letters(
        &self,
        group: &str,
        which: Resend,
    ) -> Result<Vec<ResendReport>, Error>;

    /// Deletes every dead letter of `group`; returns how many.
    ///
    /// # Errors
    ///
    /// A storage error.
    async fn purge_dead_letters(&self, group: &str) -> Result<u64, Error>;
}

/// The prefix of every dead-letter topic.
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";

/// The dead-letter topic of a consumer group: `%DLQ%<group>`.
pub fn dlq_topic(group: &str) -> String {
    format!("{DLQ_TOPIC_PREFIX}{group}")
}

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
        Some(crate::time::from_unix_ms(self.prop(name)?.parse().ok()?))
    }

    /// The original message as it was published, to be stored again: the
    /// dead letter's body, tag, keys and properties without the `DLQ_*`
    /// ones, for `origin_topic` (empty if the letter does not say).
    pub fn original(&self) -> OutgoingMessage {
        let m = &self.message;
        let mut out =
            OutgoingMessage::new(self.origin_topic().unwrap_or_default(), m.body().to_vec());
        out.tag = m.tag().map(str::to_string);
        out.keys = m.keys().to_vec();
        out.properties = m.properties().clone();
        out.priority = m.priority();
        for p in DLQ_PROPERTIES {
            out.properties.remove(p);
        }
        out
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

/// Where a dead letter came from and why it died: the `DLQ_*` properties,
/// by name. Every backend builds its dead letters with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCopy {
    /// The topic the message was published to.
    pub origin_topic: String,
    /// Its queue there.
    pub origin_queue: u32,
    /// Its offset in that queue.
    pub origin_offset: u64,
    /// Its id (`None` for a stored message that could not be decoded).
    pub origin_id: Option<MessageId>,
    /// Why it died (the last error).
    pub reason: String,
    /// Deliveries attempted.
    pub attempts: u32,
    /// When it first failed (Unix ms).
    pub first_failed_ms: u64,
    /// When it was dead-lettered (Unix ms).
    pub dead_lettered_ms: u64,
}

impl DeadLetterCopy {
    /// The dead letter of `original` for `group`: its body, tag, keys and
    /// properties, in `%DLQ%<group>`, with the `DLQ_*` properties set.
    pub fn of(self, group: &str, original: &Message) -> OutgoingMessage {
        let mut out = OutgoingMessage::new(dlq_topic(group), original.body().to_vec());
        out.tag = original.tag().map(str::to_string);
        out.keys = original.keys().to_vec();
        out.properties = original.properties().clone();
        out.priority = original.priority();
        self.stamp(out)
    }

    /// The dead letter of a payload that is not a message (undecodable):
    /// the bytes as its body, in `%DLQ%<group>`.
    pub fn of_bytes(self, group: &str, payload: Vec<u8>) -> OutgoingMessage {
        self.stamp(OutgoingMessage::new(dlq_topic(group), payload))
    }

    fn stamp(self, mut out: OutgoingMessage) -> OutgoingMessage {
        let props = [
            (DLQ_ORIGIN_TOPIC, self.origin_topic),
            (DLQ_ORIGIN_QUEUE, self.origin_queue.to_string()),
            (DLQ_ORIGIN_OFFSET, self.origin_offset.to_string()),
            (
                DLQ_ORIGIN_MSG_ID,
                self.origin_id.map(|id| id.to_string()).unwrap_or_default(),
            ),
            (DLQ_REASON, self.reason),
            (DLQ_ATTEMPTS, self.attempts.to_string()),
            (DLQ_FIRST_FAILED_AT_MS, self.first_failed_ms.to_string()),
            (DLQ_DEAD_LETTERED_AT_MS, self.dead_lettered_ms.to_string()),
        ];
        for (k, v) in props {
            out.properties.insert(k.to_string(), v);
        }
        // The dead-letter queue has one queue: no message group is needed
        // to keep its order, and it is delivered when it is stored.
        out.message_group = None;
        out.deliver_at = None;
        out
    }
}

/// Which dead letters a resend sends, and the report for each id asked:
/// the same choice on every backend.
#[derive(Debug, Clone)]
pub struct ResendPlan {
    /// One report per message id, in the order asked (for
    /// [`Resend::All`], in DLQ order); those chosen say `Resent` until the
    /// backend says otherwise.
    pub reports: Vec<ResendReport>,
    /// The letters to resend, each with the index of its report.
    pub chosen: Vec<(usize, DeadLetter)>,
}

impl ResendPlan {
    /// Chooses among all of a group's dead letters: [`Resend::All`] takes
    /// every letter not resent yet (letters without an original id are
    /// skipped); [`Resend::Ids`] takes, per id, a letter with that original
    /// id not resent yet and not already chosen (an id asked twice is
    /// resent once), else reports `AlreadyResent` or `NotFound`.
    pub fn choose(letters: &[DeadLetter], which: &Resend) -> ResendPlan {
        let mut reports: Vec<ResendReport> = Vec::new();
        let mut chosen: Vec<(usize, DeadLetter)> = Vec::new();
        match which {
            Resend::All => {
                for dl in letters.iter().filter(|d| !d.resent) {
                    let Some(id) = dl.original_id() else { continue };
                    reports.push(ResendReport {
                        message_id: id,
                        outcome: ResendOutcome::Resent,
                    });
                    chosen.push((reports.len() - 1, dl.clone()));
                }
            }
            Resend::Ids(ids) => {
                for id in ids {
                    let found: Vec<&DeadLetter> = letters
                        .iter()
                        .filter(|d| d.original_id() == Some(*id))
                        .collect();
                    let free = found.iter().find(|d| {
                        !d.resent && !chosen.iter().any(|(_, c)| c.dlq_offset == d.dlq_offset)
                    });
                    let outcome = match free {
                        Some(dl) => {
                            chosen.push((reports.len(), (*dl).clone()));
                            ResendOutcome::Resent
                        }
                        None if found.is_empty() => ResendOutcome::NotFound,
                        None => ResendOutcome::AlreadyResent,
                    };
                    reports.push(ResendReport {
                        message_id: *id,
                        outcome,
                    });
                }
            }
        }
        ResendPlan { reports, chosen }
    }

    /// Marks the report of chosen letter `index` (into `chosen`) failed.
    pub fn fail(&mut self, index: usize, reason: impl Into<String>) {
        let at = self.chosen[index].0;
        self.reports[at].outcome = ResendOutcome::Failed(reason.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn letter(dlq_offset: u64, id: u128, resent: bool) -> DeadLetter {
        let original = Message::prepare(
            OutgoingMessage::new("orders", b"x".to_vec()),
            Arc::from("orders"),
        )
        .with_identity(MessageId::from_u128(id), SystemTime::now());
        let copy = DeadLetterCopy {
            origin_topic: "orders".into(),
            origin_queue: 1,
            origin_offset: 7,
            origin_id: Some(MessageId::from_u128(id)),
            reason: "boom".into(),
            attempts: 3,
            first_failed_ms: 10,
            dead_lettered_ms: 20,
        }
        .of("g", &original);
        DeadLetter {
            dlq_offset,
            message: Arc::new(Message::prepare(copy, Arc::from("%DLQ%g"))),
            resent,
        }
    }

    #[test]
    fn a_copy_reads_back_and_restores_the_original() {
        let dl = letter(0, 5, false);
        assert_eq!(dl.message.topic(), dlq_topic("g"));
        assert_eq!(dl.origin_topic(), Some("orders"));
        assert_eq!(dl.origin_queue(), Some(1));
        assert_eq!(dl.origin_offset(), Some(7));
        assert_eq!(dl.original_id(), Some(MessageId::from_u128(5)));
        assert_eq!(dl.reason(), Some("boom"));
        assert_eq!(dl.attempts(), Some(3));
        assert_eq!(dl.first_failed_at(), Some(crate::time::from_unix_ms(10)));
        let o = dl.original();
        assert_eq!(o.topic, "orders");
        assert!(DLQ_PROPERTIES
            .iter()
            .all(|p| !o.properties.contains_key(*p)));
    }

    #[test]
    fn an_id_asked_twice_is_resent_once() {
        let letters = [letter(0, 1, false), letter(1, 2, true), letter(2, 1, false)];
        let ids = Resend::Ids(vec![
            MessageId::from_u128(1),
            MessageId::from_u128(1),
            MessageId::from_u128(1),
            MessageId::from_u128(2),
            MessageId::from_u128(3),
        ]);
        let plan = ResendPlan::choose(&letters, &ids);
        let outcomes: Vec<_> = plan.reports.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            [
                ResendOutcome::Resent,
                ResendOutcome::Resent,
                ResendOutcome::AlreadyResent,
                ResendOutcome::AlreadyResent,
                ResendOutcome::NotFound
            ]
        );
        assert_eq!(
            plan.chosen
                .iter()
                .map(|(_, d)| d.dlq_offset)
                .collect::<Vec<_>>(),
            [0, 2]
        );
        let all = ResendPlan::choose(&letters, &Resend::All);
        assert_eq!(all.chosen.len(), 2);
    }
}
