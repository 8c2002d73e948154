//! The messages the persistence actor takes: what its callers (the queue,
//! group and scheduler actors, the broker) ask of the store.

use super::*;

/// Called on the persistence thread once an append's commit is done.
pub type AppendDone = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// Stores messages of one queue, already placed at consecutive offsets.
pub struct Append {
    /// The queue.
    pub key: QueueKey,
    /// The messages, at consecutive offsets (their own `offset()`).
    pub messages: Vec<Arc<BusMessage>>,
    /// How durable the commit must be before `done` is called.
    pub durability: Durability,
    /// Record a `Published` trace event for each message.
    pub trace: bool,
    /// Writes to the application's state, committed atomically with these
    /// messages (the local outbox); usually empty.
    pub state: Vec<weirmq_bus::StateOp>,
    /// Called once, after the commit (and sync), with its outcome.
    pub done: AppendDone,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Append")
            .field("key", &self.key)
            .field("messages", &self.messages.len())
            .field("durability", &self.durability)
            .finish()
    }
}

impl Message for Append {
    type Result = ();
}

/// Records consumer-group positions (written with the next commit).
#[derive(Debug)]
pub struct CommitOffsets {
    /// The consumer group.
    pub group: String,
    /// The positions to write.
    pub entries: Vec<(QueueKey, OffsetState)>,
    /// Write and sync them now (in the handler) instead of with the next
    /// commit: for a group that stops, so its positions are durable and
    /// readable once it has.
    pub now: bool,
}

impl Message for CommitOffsets {
    type Result = ();
}

/// Changes the delay index (retry entries), written with the next commit;
/// `done` is called once it is written.
pub struct UpdateRetries {
    /// Entries to add.
    pub put: Vec<RetryEntry>,
    /// Entries to remove.
    pub remove: Vec<RetryKey>,
    /// Dead letters (group, DLQ offset) to mark as resent.
    pub resent: Vec<(String, u64)>,
    /// Delayed messages moved to their topic, and transactions ended: their
    /// entries go.
    pub unschedule: Vec<ScheduleEntry>,
    /// Half messages checked again later: their new entries (written after
    /// the removals).
    pub reschedule: Vec<ScheduleEntry>,
    /// Called once, after the commit, with its outcome.
    pub done: AppendDone,
}

impl std::fmt::Debug for UpdateRetries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateRetries")
            .field("put", &self.put.len())
            .field("remove", &self.remove.len())
            .finish()
    }
}

impl Message for UpdateRetries {
    type Result = ();
}

/// Deletes every stored message of a queue (a dead-letter queue being
/// purged) and the group's resent marks; replies with how many messages were
/// deleted. Pending appends are committed first.
#[derive(Debug)]
pub struct PurgeQueue {
    /// The queue.
    pub key: QueueKey,
    /// The group whose resent marks go too.
    pub group: String,
}

impl Message for PurgeQueue {
    type Result = Result<u64, StorageError>;
}

/// Delayed messages just stored (their entries are in the delay index):
/// sent to the scheduler registered with [`SetScheduler`] after each commit
/// that stored some.
#[derive(Debug)]
pub struct Scheduled(pub Vec<ScheduleEntry>);

impl Message for Scheduled {
    type Result = ();
}

/// Registers who hears of new delayed messages.
#[derive(Debug)]
pub struct SetScheduler(pub Recipient<Scheduled>);

impl Message for SetScheduler {
    type Result = ();
}

/// Registers a topic in the store; replies with its id.
#[derive(Debug)]
pub struct CreateTopic {
    /// The topic name.
    pub name: String,
    /// Its queue count.
    pub queues: u32,
    /// Its retention and trace settings.
    pub settings: TopicSettings,
}

impl Message for CreateTopic {
    type Result = Result<u32, StorageError>;
}

/// Changes an existing topic's retention and trace settings.
#[derive(Debug)]
pub struct ConfigureTopic {
    /// The topic name.
    pub name: String,
    /// Its id.
    pub id: u32,
    /// Its queue count (unchanged).
    pub queues: u32,
    /// The new settings.
    pub settings: TopicSettings,
}

impl Message for ConfigureTopic {
    type Result = Result<(), StorageError>;
}

/// Trace events to record (written with the next commit, never synced on
/// their own).
#[derive(Debug)]
pub struct RecordTrace(pub Vec<TraceRecord>);

impl Message for RecordTrace {
    type Result = ();
}

/// Runs a retention pass over every topic (in steps, between commits, so
/// publishes are not held up) and replies with what it removed.
#[derive(Debug)]
pub struct RunRetention;

impl Message for RunRetention {
    type Result = Result<RetentionReport, StorageError>;
}

/// Commits what is pending, syncs, and stops the actor.
#[derive(Debug)]
pub struct ShutdownStore;

impl Message for ShutdownStore {
    type Result = Result<(), StorageError>;
}
