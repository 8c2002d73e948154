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
//! error, and every later write is refused with it (marked with the
//! directory and the time it happened, so it reaches users as
//! `Error::StoreFailed`), so a queue log never gets a hole that a later
//! commit would paper over. The store does not come back by itself — sled
//! refuses further writes after an I/O error too — the bus is reopened.
//!
//! # Shutdown
//!
//! [`ShutdownStore`] commits what is pending, syncs, records the queue ends
//! (see `data_dir`), releases the store and stops the actor. A failed store
//! is closed without another write and answers `Ok`: what it had stored
//! before the failure is on disk, and reopening is the way back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, error, info, trace, warn};
use weirmq_bus::{
    Durability, Message as BusMessage, RetentionReport, StorageError, TraceEvent, TraceKind,
};

use crate::delay::{resent_key, resent_prefix, RetryEntry, RetryKey, ScheduleEntry};
use crate::disk::DiskGuard;
use crate::store::{
    offsets_batch, OffsetState, QueueKey, RecordBuilder, Store, TopicSettings, TraceRecord,
};

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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// One step of a retention pass.
#[derive(Message)]
#[rtype(result = "()")]
struct RetentionStep;

/// A retention pass under way.
#[derive(Debug, Default)]
struct RetentionJob {
    /// Queues still to clean: (queue, cutoff ms, max bytes).
    todo: VecDeque<(QueueKey, Option<u64>, Option<u64>)>,
    /// The lowest offset retry entries name, per queue; kept up to date
    /// with retries written during the pass.
    floors: HashMap<QueueKey, u64>,
    /// A pressure pass (the disk is nearly full): each queue's acked floor
    /// (lowest committed offset of its groups); nothing at or above it, and
    /// nothing in a queue without groups, is removed. `None`: a normal pass.
    acked: Option<HashMap<QueueKey, u64>>,
    report: RetentionReport,
    /// The queue at the front lost messages in this pass.
    touched: bool,
    waiters: Vec<oneshot::Sender<Result<RetentionReport, StorageError>>>,
}

/// How long one retention step may run before the commits waiting get a
/// turn (it removes index spans of up to ~1,000 messages, a few at a time).
const RETENTION_STEP: Duration = Duration::from_millis(1);
/// Spans removed per call into the store within a step.
const RETENTION_SPANS_PER_CALL: usize = 2;

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
    traces: Vec<TraceRecord>,
    commit_queued: bool,
    offsets_timer: bool,
    failed: Option<StorageError>,
    retention_every: Duration,
    retention: Option<RetentionJob>,
    /// Callers who asked for a pass while one was running: they get the
    /// next one.
    retention_next: Vec<oneshot::Sender<Result<RetentionReport, StorageError>>>,
    scheduler: Option<Recipient<Scheduled>>,
    guard: DiskGuard,
    /// No pressure pass before this (the last one found nothing to remove).
    pressure_rest: Option<std::time::Instant>,
}

/// How often the disk guard measures the filesystem.
const DISK_EVERY: Duration = Duration::from_millis(100);
/// How long after a pressure pass that removed nothing the next may start.
const PRESSURE_REST: Duration = Duration::from_secs(1);

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
            retention_every: store.retention_interval(),
            guard: store.disk_guard(),
            pressure_rest: None,
            store: Some(store),
            durable,
            pending: Vec::new(),
            pending_messages: 0,
            retries: Vec::new(),
            offsets: HashMap::new(),
            traces: Vec::new(),
            commit_queued: false,
            offsets_timer: false,
            failed: None,
            retention: None,
            retention_next: Vec::new(),
            scheduler: None,
        }
    }

    /// Starts a retention pass (if none runs) for `waiters`.
    fn start_retention(
        &mut self,
        waiters: Vec<oneshot::Sender<Result<RetentionReport, StorageError>>>,
        ctx: &mut Context<Self>,
    ) {
        if self.retention.is_some() {
            self.retention_next.extend(waiters);
            return;
        }
        let Some(store) = self.store.as_ref() else {
            for w in waiters {
                let _ = w.send(Err(Self::closed()));
            }
            return;
        };
        let floors = match store.retry_floors() {
            Ok(mut f) => {
                // Retries not written yet count too.
                for u in &self.retries {
                    for e in &u.put {
                        lower(&mut f, e);
                    }
                }
                f
            }
            Err(e) => {
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
                return;
            }
        };
        let now = now_ms();
        let todo = store
            .retention_plan()
            .into_iter()
            .map(|(key, r)| {
                let cutoff = r.age().map(|a| now.saturating_sub(a.as_millis() as u64));
                (key, cutoff, r.bytes())
            })
            .collect();
        self.retention = Some(RetentionJob {
            todo,
            floors,
            acked: None,
            report: RetentionReport::default(),
            touched: false,
            waiters,
        });
        ctx.notify(RetentionStep);
    }

    /// Starts a pressure pass (the disk is nearly full) unless a pass runs:
    /// it removes the oldest acked-by-every-group messages, queue by queue
    /// in turns, until there is room again.
    fn start_pressure(&mut self, ctx: &mut Context<Self>) {
        if self.retention.is_some()
            || self.failed.is_some()
            || self
                .pressure_rest
                .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        let Some(store) = self.store.as_ref() else {
            return;
        };
        let plan = store.retry_floors().and_then(|mut floors| {
            for u in &self.retries {
                for e in &u.put {
                    lower(&mut floors, e);
                }
            }
            Ok((floors, store.acked_floors(&self.offsets)?))
        });
        let (floors, acked) = match plan {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %self.located(e), "planning a disk-pressure pass failed");
                return;
            }
        };
        let now = now_ms();
        let todo = store
            .all_queues()
            .into_iter()
            .filter(|k| acked.get(k).is_some_and(|f| *f > 0))
            .map(|k| (k, Some(now), None))
            .collect();
        warn!(
            available = self.guard.available(),
            reserve = self.guard.reserve(),
            "the disk is nearly full: removing the oldest messages every group has consumed"
        );
        self.retention = Some(RetentionJob {
            todo,
            floors,
            acked: Some(acked),
            report: RetentionReport::default(),
            touched: false,
            waiters: Vec::new(),
        });
        ctx.notify(RetentionStep);
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

    /// Stops the store's writes after `e` (the first failure wins); returns
    /// the failure every waiter and later write gets.
    fn trip(&mut self, e: StorageError) -> StorageError {
        if let Some(f) = &self.failed {
            return f.clone();
        }
        let dir = self.store.as_ref().and_then(Store::dir);
        let e = e.in_dir(dir).stopping(std::time::SystemTime::now());
        error!(error = %e, "store write failed; refusing further writes until the bus is reopened");
        self.failed = Some(e.clone());
        e
    }

    /// `e` with the data directory named.
    fn located(&self, e: StorageError) -> StorageError {
        e.in_dir(self.store.as_ref().and_then(Store::dir))
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
        let mut traces = std::mem::take(&mut self.traces);
        let mut scheduled = Vec::new();
        let result = match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err(Self::closed()),
            (None, Some(store)) => {
                let mut records = RecordBuilder::default();
                let mut sync = false;
                let mut nrecords = 0;
                let mut early: Result<(), StorageError> = Ok(());
                for a in &appends {
                    if a.state.is_empty() {
                        for m in &a.messages {
                            records.push(a.key, m.offset(), m);
                        }
                    } else if early.is_ok() {
                        // The local outbox: what came before it first, then
                        // its messages and the application's writes in one
                        // sled transaction (both or neither survive a crash).
                        let before = std::mem::take(&mut records).finish();
                        nrecords += before.closed.len();
                        let index = store.index_records(before.closed);
                        early = store.write(before.log, index, None, None, None);
                        if early.is_ok() {
                            let mut own = RecordBuilder::default();
                            for m in &a.messages {
                                own.push(a.key, m.offset(), m);
                            }
                            let own = own.finish();
                            nrecords += own.closed.len();
                            let index = store.index_records(own.closed);
                            early = store.write_with_state(own.log, &a.state, index);
                        }
                    }
                    for m in &a.messages {
                        if let (Some(_), Some(at)) = (m.destination(), m.deliver_at()) {
                            scheduled.push(ScheduleEntry {
                                // Rounded up: never delivered before its time.
                                due_ms: at
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_micros().div_ceil(1000) as u64),
                                seq: ScheduleEntry::seq_of(a.key.topic_id, m.offset()),
                                topic_id: a.key.topic_id,
                                queue: a.key.queue,
                                offset: m.offset(),
                                checks: m.is_half().then_some(0),
                            });
                        }
                        if a.trace {
                            traces.push(TraceRecord {
                                key: a.key,
                                offset: m.offset(),
                                event: TraceEvent::now(TraceKind::Published, None, 0, None),
                            });
                        }
                    }
                    sync |= a.durability == Durability::Flushed;
                }
                let records = records.finish();
                nrecords += records.closed.len();
                let index = store.index_records(records.closed);
                let trace_batch = (!traces.is_empty()).then(|| store.trace_batch(&traces));
                let off = (!offsets.is_empty()).then(|| offsets_batch(&offsets));
                let delay = (!retries.is_empty() || !scheduled.is_empty()).then(|| {
                    let mut b = sled::Batch::default();
                    for e in &scheduled {
                        b.insert(&e.key()[..], e.value());
                    }
                    for u in &retries {
                        for e in &u.unschedule {
                            b.remove(&e.key()[..]);
                        }
                        for e in &u.reschedule {
                            b.insert(&e.key()[..], e.value());
                        }
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
                let r = early
                    .and_then(|()| store.write(records.log, index, trace_batch, delay, off))
                    .and_then(|()| {
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
                    traces = traces.len(),
                    sync,
                    "commit"
                );
                r
            }
        };
        let result = result.map_err(|e| self.trip(e));
        if result.is_ok() {
            let bytes: usize = appends
                .iter()
                .flat_map(|a| &a.messages)
                .map(|m| m.body().len() + 64)
                .sum();
            self.guard.wrote(bytes as u64);
        }
        if result.is_ok() && !scheduled.is_empty() {
            if let Some(job) = &mut self.retention {
                for e in &scheduled {
                    let key = QueueKey {
                        topic_id: e.topic_id,
                        queue: e.queue,
                    };
                    let f = job.floors.entry(key).or_insert(e.offset);
                    *f = (*f).min(e.offset);
                }
            }
            if let Some(s) = &self.scheduler {
                s.do_send(Scheduled(scheduled));
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

fn lower(floors: &mut HashMap<QueueKey, u64>, e: &RetryEntry) {
    let key = QueueKey {
        topic_id: e.key.topic_id,
        queue: e.queue,
    };
    let f = floors.entry(key).or_insert(e.offset);
    *f = (*f).min(e.offset);
}

impl Actor for PersistenceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.retention_every, |act, ctx| {
            if act.retention.is_none() && act.store.is_some() && act.failed.is_none() {
                act.start_retention(Vec::new(), ctx);
            }
        });
        if self.guard.reserve().is_some() {
            ctx.run_interval(DISK_EVERY, |act, ctx| {
                act.guard.measure();
                if act.guard.under_pressure() && act.store.is_some() {
                    act.start_pressure(ctx);
                }
            });
        }
    }
}

impl Handler<RunRetention> for PersistenceActor {
    type Result = ResponseFuture<Result<RetentionReport, StorageError>>;

    fn handle(&mut self, _: RunRetention, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.start_retention(vec![tx], ctx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err(Self::closed())) })
    }
}

impl Handler<RetentionStep> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, _: RetentionStep, ctx: &mut Context<Self>) {
        let Some(mut job) = self.retention.take() else {
            return;
        };
        let outcome = match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err(Self::closed()),
            (None, Some(store)) => {
                let started = std::time::Instant::now();
                let mut result = Ok(());
                while started.elapsed() < RETENTION_STEP {
                    let Some(&(key, cutoff, max_bytes)) = job.todo.front() else {
                        break;
                    };
                    let mut keep_from = job.floors.get(&key).copied().unwrap_or(u64::MAX);
                    if let Some(acked) = &job.acked {
                        keep_from = keep_from.min(acked.get(&key).copied().unwrap_or(0));
                    }
                    match store.expire(key, cutoff, max_bytes, keep_from, RETENTION_SPANS_PER_CALL)
                    {
                        Ok(x) => {
                            self.guard.freed(x.bytes);
                            if x.messages > 0 {
                                info!(
                                    topic_id = key.topic_id,
                                    queue = key.queue,
                                    messages = x.messages,
                                    bytes = x.bytes,
                                    first_kept = x.start,
                                    "retention removed expired messages"
                                );
                                job.touched = true;
                            }
                            job.report.messages += x.messages;
                            job.report.bytes += x.bytes;
                            if !x.more {
                                job.todo.pop_front();
                                job.report.queues += job.touched as u32;
                                job.touched = false;
                            } else if job.acked.is_some() {
                                // Pressure: queues take turns, a few spans each.
                                job.report.queues += job.touched as u32;
                                job.touched = false;
                                job.todo.rotate_left(1);
                            }
                            if job.acked.is_some() && !self.guard.under_pressure() {
                                job.todo.clear();
                                break;
                            }
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
        };
        match outcome {
            Err(e) => {
                let e = self.located(e);
                warn!(error = %e, "retention pass failed; the next one tries again");
                for w in job.waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
            Ok(()) if job.todo.is_empty() => {
                if job.acked.is_some() {
                    info!(
                        removed = job.report.messages,
                        bytes = job.report.bytes,
                        room = !self.guard.under_pressure(),
                        "disk-pressure pass done"
                    );
                    // Nothing consumed was left to remove: try again later.
                    self.pressure_rest = (job.report.messages == 0)
                        .then(|| std::time::Instant::now() + PRESSURE_REST);
                } else if job.report.messages > 0 {
                    debug!(?job.report, "retention pass done");
                }
                for w in job.waiters {
                    let _ = w.send(Ok(job.report));
                }
                let next = std::mem::take(&mut self.retention_next);
                if !next.is_empty() {
                    self.start_retention(next, ctx);
                }
            }
            Ok(()) => {
                self.retention = Some(job);
                // Yield as long as the step ran: at most half of this thread's
                // time goes to removing while commits are waiting.
                ctx.run_later(RETENTION_STEP, |_, ctx| ctx.notify(RetentionStep));
            }
        }
    }
}

impl Handler<SetScheduler> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: SetScheduler, _: &mut Context<Self>) {
        self.scheduler = Some(msg.0);
    }
}

impl Handler<RecordTrace> for PersistenceActor {
    type Result = ();

    fn handle(&mut self, msg: RecordTrace, ctx: &mut Context<Self>) {
        if self.store.is_none() || self.failed.is_some() {
            return;
        }
        self.traces.extend(msg.0);
        if !self.commit_queued && !self.offsets_timer {
            self.offsets_timer = true;
            ctx.run_later(OFFSETS_DELAY, |act, ctx| {
                act.offsets_timer = false;
                if !act.offsets.is_empty() || !act.traces.is_empty() {
                    act.queue_commit(ctx);
                }
            });
        }
    }
}

impl Handler<ConfigureTopic> for PersistenceActor {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, msg: ConfigureTopic, _: &mut Context<Self>) -> Self::Result {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let store = self.store.as_mut().ok_or_else(Self::closed)?;
        let written = store.write_topic(&msg.name, msg.id, msg.queues, &msg.settings);
        written.map_err(|e| self.located(e))?;
        debug!(topic = %msg.name, settings = ?msg.settings, "topic reconfigured");
        Ok(())
    }
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
        if let Some(job) = &mut self.retention {
            for e in &msg.put {
                lower(&mut job.floors, e);
            }
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
                    self.trip(e);
                }
            }
            return;
        }
        if !self.commit_queued && !self.offsets_timer {
            self.offsets_timer = true;
            ctx.run_later(OFFSETS_DELAY, |act, ctx| {
                act.offsets_timer = false;
                if !act.offsets.is_empty() || !act.traces.is_empty() {
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
        let purged = store.purge_queue(msg.key, &resent_prefix(&msg.group));
        let n = purged.map_err(|e| self.located(e))?;
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
        let created = store.create_topic(&msg.name, msg.queues, &msg.settings);
        let id = created.map_err(|e| self.located(e))?;
        debug!(topic = %msg.name, id, queues = msg.queues, "topic created");
        Ok(id)
    }
}

impl Handler<ShutdownStore> for PersistenceActor {
    type Result = Result<(), StorageError>;

    fn handle(&mut self, _: ShutdownStore, ctx: &mut Context<Self>) -> Self::Result {
        while !self.pending.is_empty()
            || !self.offsets.is_empty()
            || !self.retries.is_empty()
            || !self.traces.is_empty()
        {
            self.commit();
            if self.failed.is_some() {
                break;
            }
        }
        if let Some(job) = self.retention.take() {
            for w in job.waiters {
                let _ = w.send(Err(Self::closed()));
            }
        }
        for w in self.retention_next.drain(..) {
            let _ = w.send(Err(Self::closed()));
        }
        let result = match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => {
                // Nothing more is written to a failed store: it is closed as
                // it is, and reopening the bus is the way back.
                warn!(error = %e, "closing a store that had stopped after a failure");
                Ok(())
            }
            (None, Some(store)) if self.durable => store.sync().and_then(|()| store.record_ends()),
            _ => Ok(()),
        };
        let result = result.map_err(|e| self.located(e));
        self.store = None;
        ctx.stop();
        debug!("store closed");
        result
    }
}
