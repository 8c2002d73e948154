//! The `PersistenceActor`: the store's only writer, with group commit.
//!
//! It runs on its own arbiter (thread). Every [`Append`] that arrives while
//! a commit is running waits in the mailbox; when the mailbox is drained the
//! actor runs one commit for everything queued (a self-`notify` runs after
//! the mailbox is empty): one sled batch, then — if any waiter asked for
//! [`Durability::Flushed`] — one real sync (see the crate docs), then every
//! waiter's [`AppendDone`] is called. So `Flushed` costs one sync per commit,
//! not per message, and throughput grows with the number of publishes in
//! flight.
//!
//! Consumer offsets ([`CommitOffsets`]) never cause a sync of their own: they
//! ride in the next append commit, or in a small unsynced commit after
//! 20 ms of no appends (offsets are at-least-once state: losing the last
//! ones redelivers, never loses).
//!
//! # Failure
//!
//! A failed write or sync is fail-stop: every waiter of that commit gets the
//! error, and every later append is refused with it, so a queue log never
//! gets a hole that a later commit would paper over.
//!
//! # Shutdown
//!
//! [`ShutdownStore`] commits what is pending, syncs, releases the store and
//! stops the actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tracing::{debug, error, trace};
use weirmq_bus::{Durability, Message as BusMessage, StorageError};

use crate::delay::{resent_key, resent_prefix, RetryEntry, RetryKey};
use crate::store::{offsets_batch, OffsetState, QueueKey, RecordBuilder, Store};

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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Registers a topic in the store; replies with its id.
#[derive(Debug)]
pub struct CreateTopic {
    /// The topic name.
    pub name: String,
    /// Its queue count.
    pub queues: u32,
}

impl Message for CreateTopic {
    type Result = Result<u32, StorageError>;
}

/// Commits what is pending, syncs, and stops the actor.
#[derive(Debug)]
pub struct ShutdownStore;

impl Message for ShutdownStore {
    type Result = Result<(), StorageError>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct Commit;

/// The most messages written in one commit; more waiting go in the next.
const MAX_COMMIT_MESSAGES: usize = 4096;
/// How long offsets wait for an append commit to ride in.
const OFFSETS_DELAY: Duration = Duration::from_millis(20);

/// The store's writer. See the module docs.
pub struct PersistenceActor {
    store: Option<Store>,
    durable: bool,
    pending: Vec<Append>,
    pending_messages: usize,
    retries: Vec<UpdateRetries>,
    offsets: HashMap<(String, QueueKey), OffsetState>,
    commit_queued: bool,
    offsets_timer: bool,
    failed: Option<StorageError>,
}

impl std::fmt::Debug for PersistenceActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistenceActor")
            .field("pending", &self.pending.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl PersistenceActor {
    /// An actor owning `store`. `durable` is false for an in-memory store
    /// (no sync is attempted).
    pub fn new(store: Store, durable: bool) -> Self {
        PersistenceActor {
            store: Some(store),
            durable,
            pending: Vec::new(),
            pending_messages: 0,
            retries: Vec::new(),
            offsets: HashMap::new(),
            commit_queued: false,
            offsets_timer: false,
            failed: None,
        }
    }

    fn queue_commit(&mut self, ctx: &mut Context<Self>) {
        if !self.commit_queued {
            self.commit_queued = true;
            ctx.notify(Commit);
        }
    }

    fn closed() -> StorageError {
        StorageError::msg("the store is closed (the bus was shut down)")
    }

    /// Why a write must be refused now: the store failed or is closed.
    fn refusal(&self) -> Option<StorageError> {
        match (&self.failed, &self.store) {
            (Some(e), _) => Some(e.clone()),
            (None, None) => Some(Self::closed()),
            (None, Some(_)) => None,
        }
    }

    /// Runs one commit of up to `MAX_COMMIT_MESSAGES` pending messages and
    /// all pending offsets. Returns whether appends remain.
    fn commit(&mut self) -> bool {
        let mut take = 0;
        let mut n = 0;
        for a in &self.pending {
            if take > 0 && n + a.messages.len() > MAX_COMMIT_MESSAGES {
                break;
            }
            n += a.messages.len();
            take += 1;
        }
        let appends: Vec<Append> = self.pending.drain(..take).collect();
        self.pending_messages -= n;
        let offsets = std::mem::take(&mut self.offsets);
        let retries = std::mem::take(&mut self.retries);
        let result = match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err(Self::closed()),
            (None, Some(store)) => {
                let mut records = RecordBuilder::default();
                let mut sync = false;
                for a in &appends {
                    for m in &a.messages {
                        records.push(a.key, m.offset(), m);
                    }
                    sync |= a.durability == Durability::Flushed;
                }
                let (batch, nrecords) = records.finish();
                let off = (!offsets.is_empty()).then(|| offsets_batch(&offsets));
                let delay = (!retries.is_empty()).then(|| {
                    let mut b = sled::Batch::default();
                    for u in &retries {
                        for k in &u.remove {
                            b.remove(k.encode());
                        }
                        for e in &u.put {
                            b.insert(e.key.encode(), e.encode_value());
                        }
                        for (group, offset) in &u.resent {
                            b.insert(resent_key(group, *offset), now_ms().to_be_bytes().to_vec());
                        }
                    }
                    b
                });
                let r = store.write(batch, delay, off).and_then(|()| {
                    if sync && self.durable {
                        store.sync()
                    } else {
                        Ok(())
                    }
                });
                trace!(
                    messages = n,
                    records = nrecords,
                    offsets = offsets.len(),
                    sync,
                    "commit"
                );
                r
            }
        };
        if let Err(e) = &result {
            if self.failed.is_none() {
                error!(error = %e, "store write failed; refusing further writes");
                self.failed = Some(e.clone());
            }
        }
        for a in appends {
            (a.done)(result.clone());
        }
        for u in retries {
            (u.done)(result.clone());
        }
        !self.pending.is_empty()
    }
}

impl Actor for PersistenceActor {
    type Context = Context<Self>;
}

impl Handler<Append> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: Append, ctx: &mut Context<Self>) {
        if let Some(e) = self.refusal() {
            (msg.done)(Err(e));
            return;
        }
        self.pending_messages += msg.messages.len();
        self.pending.push(msg);
        self.queue_commit(ctx);
    }
}

impl Handler<Commit> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, _: Commit, ctx: &mut Context<Self>) {
        self.commit_queued = false;
        if self.commit() {
            self.queue_commit(ctx);
        }
    }
}

impl Handler<UpdateRetries> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: UpdateRetries, ctx: &mut Context<Self>) {
        if let Some(e) = self.refusal() {
            (msg.done)(Err(e));
            return;
        }
        self.retries.push(msg);
        self.queue_commit(ctx);
    }
}

impl Handler<CommitOffsets> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: CommitOffsets, ctx: &mut Context<Self>) {
        if self.store.is_none() {
            return;
        }
        for (key, state) in msg.entries {
            self.offsets.insert((msg.group.clone(), key), state);
        }
        if msg.now {
            while !self.pending.is_empty() || !self.offsets.is_empty() || !self.retries.is_empty() {
                self.commit();
                if self.failed.is_some() {
                    return;
                }
            }
            if let (true, Some(store)) = (self.durable, self.store.as_mut()) {
                if let Err(e) = store.sync() {
                    error!(error = %e, "syncing consumer offsets failed; refusing further writes");
                    self.failed = Some(e);
                }
            }
            return;
        }
        if !self.commit_queued && !self.offsets_timer {
            self.offsets_timer = true;
            ctx.run_later(OFFSETS_DELAY, |act, ctx| {
                act.offsets_timer = false;
                if !act.offsets.is_empty() {
                    act.queue_commit(ctx);
                }
            });
        }
    }
}

impl Handler<PurgeQueue> for PersistenceActor {
    type Result = Result<u64, StorageError>;

    fn handle(&mut self, msg: PurgeQueue, _: &mut Context<Self>) -> Self::Result {
        while !self.pending.is_empty() || !self.retries.is_empty() {
            self.commit();
        }
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let store = self.store.as_mut().ok_or_else(Self::closed)?;
        let n = store.purge_queue(msg.key, &resent_prefix(&msg.group))?;
        debug!(?msg.key, group = %msg.group, purged = n, "queue purged");
        Ok(n)
    }
}

impl Handler<CreateTopic> for PersistenceActor {
    type Result = Result<u32, StorageError>;

    fn handle(&mut self, msg: CreateTopic, _: &mut Context<Self>) -> Self::Result {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let store = self.store.as_mut().ok_or_else(Self::closed)?;
        let id = store.create_topic(&msg.name, msg.queues)?;
        debug!(topic = %msg.name, id, queues = msg.queues, "topic created");
        Ok(id)
    }
}

impl Handler<ShutdownStore> for PersistenceActor {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, _: ShutdownStore, ctx: &mut Context<Self>) -> Self::Result {
        while !self.pending.is_empty() || !self.offsets.is_empty() || !self.retries.is_empty() {
            self.commit();
            if self.failed.is_some() {
                break;
            }
        }
        let result = match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => Err(e.clone()),
            (None, Some(store)) if self.durable => store.sync(),
            _ => Ok(()),
        };
        self.store = None;
        ctx.stop();
        debug!("store closed");
        result
    }
}
