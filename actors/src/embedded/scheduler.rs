//! `Scheduler`: delivers delayed messages when they fall due.
//!
//! A delayed message is stored at publish time in the system topic
//! `%SCHEDULE%` (one queue), with an entry `d · due · seq` in the store's
//! delay index written in the same commit. This actor keeps a window of the
//! earliest entries in a [`DueQueue`] (the same mechanism group actors use
//! for retries) with one timer at the earliest; the rest stay in the store
//! and are read in due order as the window empties, so a million scheduled
//! messages cost no memory until their turn.
//!
//! When entries fall due it reads their messages back, copies each to its
//! destination topic — same id, birth time and contents; one publish per
//! destination, in due order — and once that is stored removes the entries.
//! A crash between the two delivers the message twice (at least once), never
//! zero times. Entries that fell due while the process was down fire right
//! after start, in due order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use tracing::{debug, error, info, warn};
use weirmq_bus::{
    CancelOutcome, Error, HalfMessage, Message as BusMessage, SendReceipt, StorageError,
    TransactionCheckers, TransactionOutcome, HALF_TOPIC, SCHEDULE_TOPIC,
};
use weirmq_persistence::{
    PersistenceActor, QueueKey, ScheduleEntry, Scheduled, StoreReader, UpdateRetries,
};

use super::due::DueQueue;
use weirmq_bus::Clock;
use weirmq_persistence::timers::run_later;

/// Stores copies of due messages in their topic (named first); returns
/// their receipts.
pub(crate) type MoveSink = Arc<
    dyn Fn(String, Vec<BusMessage>) -> BoxFuture<'static, Result<Vec<SendReceipt>, Error>>
        + Send
        + Sync,
>;

/// The transaction checkers, by topic.
pub(crate) type Checkers = Arc<TransactionCheckers>;

/// Entries kept in memory at most; the rest wait in the store.
const WINDOW: usize = 4096;
/// Due messages moved per wake-up (then the mailbox gets a turn).
const BATCH: usize = 1024;
/// A half message due a check whose topic has no checker is looked at
/// again after this long (not counted as a check).
const NO_CHECKER_RETRY: Duration = Duration::from_secs(1);
/// A failed move is tried again after this long.
const RETRY_MOVE: Duration = Duration::from_secs(1);

pub(crate) struct Scheduler {
    reader: StoreReader,
    persistence: Addr<PersistenceActor>,
    sink: MoveSink,
    checkers: Checkers,
    schedule_topic: Arc<str>,
    half_topic: Arc<str>,
    due: DueQueue<ScheduleEntry>,
    /// Half messages this scheduler knows the current entry of (loaded, or
    /// rescheduled after a check), by seq.
    halves: HashMap<u64, ScheduleEntry>,
    /// Half messages with a check in flight.
    checking: HashSet<u64>,
    /// Half messages ended while their check was in flight: the check's
    /// answer is ignored.
    ended: HashSet<u64>,
    /// Delayed messages being copied to their topic right now (a cancel
    /// finds them too late).
    moving: HashSet<u64>,
    /// Entries resolved (moved, committed, rolled back) whose removal from
    /// the store is not confirmed yet: a second `end_transaction`, or a
    /// reload of the window, must not see them as open.
    resolving: Arc<std::sync::Mutex<HashSet<u64>>>,
    /// The last entry loaded from the store, when some later ones were
    /// left there; `None` when every stored entry is in memory.
    loaded_to: Option<ScheduleEntry>,
    load_failed: bool,
    /// What entries are due by and the wake-ups wait on.
    clock: Clock,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("in_memory", &self.due.len())
            .field("loaded_to", &self.loaded_to)
            .finish()
    }
}

impl Scheduler {
    pub(crate) fn new(
        reader: StoreReader,
        persistence: Addr<PersistenceActor>,
        sink: MoveSink,
        checkers: Checkers,
        clock: Clock,
    ) -> Self {
        Scheduler {
            reader,
            persistence,
            sink,
            checkers,
            schedule_topic: Arc::from(SCHEDULE_TOPIC),
            half_topic: Arc::from(HALF_TOPIC),
            due: DueQueue::new(clock.clone()),
            halves: HashMap::new(),
            checking: HashSet::new(),
            ended: HashSet::new(),
            moving: HashSet::new(),
            resolving: Arc::default(),
            loaded_to: None,
            load_failed: false,
            clock,
        }
    }

    /// Reads the next window of entries from the store.
    fn load(&mut self, after: Option<ScheduleEntry>) {
        match self.reader.load_schedule(after.as_ref(), WINDOW) {
            Ok(entries) => {
                self.loaded_to = (entries.len() == WINDOW)
                    .then(|| entries.last().copied())
                    .flatten();
                for e in entries {
                    self.add(e);
                }
                self.load_failed = false;
            }
            Err(e) => {
                error!(error = %e, "reading delayed messages failed; trying again in 1 s");
                self.load_failed = true;
            }
        }
    }

    /// Whether the entry `seq` is being resolved (committed, rolled back or
    /// cancelled): never to be moved again.
    fn is_resolving(&self, seq: u64) -> bool {
        self.resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&seq)
    }

    fn add(&mut self, e: ScheduleEntry) {
        if self.is_resolving(e.seq) {
            return;
        }
        if e.checks.is_some() {
            self.halves.insert(e.seq, e);
        }
        self.due.insert(e.due_ms, e.seq, e);
    }

    /// Reads the staged message of an entry.
    fn read(&self, entry: &ScheduleEntry) -> Result<Option<Arc<BusMessage>>, StorageError> {
        let key = QueueKey {
            topic_id: entry.topic_id,
            queue: entry.queue,
        };
        let name = if entry.checks.is_some() {
            &self.half_topic
        } else {
            &self.schedule_topic
        };
        Ok(self
            .reader
            .read_range(name, key, entry.offset, entry.offset + 1, 1)?
            .pop())
    }

    /// Asks the topic's checker about a half message whose check is due.
    fn check(&mut self, entry: ScheduleEntry, m: Arc<BusMessage>, ctx: &mut Context<Self>) {
        let dest = m.destination().unwrap_or_default().to_string();
        let Some((checker, config)) = self.checkers.get(&dest) else {
            warn!(topic = %dest, msg_id = %m.id(),
                "a half message is due a check but its topic has no checker registered; \
                 asking again in 1 s (register one with BusBuilder::transaction_checker)");
            self.reschedule(entry, entry.checks.unwrap_or(0), NO_CHECKER_RETRY);
            return;
        };
        self.checking.insert(entry.seq);
        let fut = async move { checker.check(&m).await };
        ctx.spawn(fut.into_actor(self).map(move |outcome, act, ctx| {
            act.checking.remove(&entry.seq);
            if act.ended.remove(&entry.seq) {
                return; // ended by the producer meanwhile
            }
            let checks = entry.checks.unwrap_or(0) + 1;
            match outcome {
                TransactionOutcome::Commit => {
                    info!(topic = %dest, offset = entry.offset, checks, "transaction committed by its checker");
                    act.commit(entry, ctx, None);
                }
                TransactionOutcome::Rollback => {
                    info!(topic = %dest, offset = entry.offset, checks, "transaction rolled back by its checker");
                    act.halves.remove(&entry.seq);
                    act.unschedule(vec![entry]);
                }
                TransactionOutcome::Unknown if checks >= config.max_checks => {
                    warn!(topic = %dest, offset = entry.offset, checks,
                        "transaction still unknown after the last check: rolled back");
                    act.halves.remove(&entry.seq);
                    act.unschedule(vec![entry]);
                }
                TransactionOutcome::Unknown => {
                    act.reschedule(entry, checks, config.check_interval);
                    act.due
                        .arm(ctx, false, |a: &mut Self| &mut a.due, |a, ctx| a.pump(ctx));
                }
            }
        }));
    }

    /// Moves the entry of a half message to a later check.
    fn reschedule(&mut self, entry: ScheduleEntry, checks: u32, after: Duration) {
        let next = ScheduleEntry {
            due_ms: self.clock.now_ms() + after.as_millis() as u64,
            checks: Some(checks),
            ..entry
        };
        self.persistence.do_send(UpdateRetries {
            put: Vec::new(),
            remove: Vec::new(),
            resent: Vec::new(),
            unschedule: vec![entry],
            reschedule: vec![next],
            done: Box::new(|r| {
                if let Err(e) = r {
                    warn!(error = %e, "rescheduling a transaction check failed");
                }
            }),
        });
        self.add(next);
    }

    /// Copies a half message to its topic, then removes its entry; answers
    /// `reply` with the receipt.
    fn commit(
        &mut self,
        entry: ScheduleEntry,
        ctx: &mut Context<Self>,
        reply: Option<tokio::sync::oneshot::Sender<Result<Option<SendReceipt>, Error>>>,
    ) {
        self.halves.remove(&entry.seq);
        let m = match self.read(&entry) {
            Ok(Some(m)) => m,
            Ok(None) => {
                error!(
                    offset = entry.offset,
                    "a half message is no longer stored; dropping its entry"
                );
                self.unschedule(vec![entry]);
                if let Some(r) = reply {
                    let _ = r.send(Ok(None));
                }
                return;
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(Error::from(e)));
                }
                return;
            }
        };
        let dest = m.destination().unwrap_or_default().to_string();
        let copy = m.for_destination(Arc::from(dest.as_str()));
        let fut = (self.sink)(dest, vec![copy]);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(mut receipts) => {
                act.unschedule(vec![entry]);
                if let Some(r) = reply {
                    let _ = r.send(Ok(receipts.pop()));
                }
            }
            Err(e) => {
                warn!(error = %e, "committing a transaction's message failed");
                match reply {
                    // The producer hears of it; the checker will ask later.
                    Some(r) => {
                        let _ = r.send(Err(e));
                        act.resolving
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&entry.seq);
                        act.add(entry);
                    }
                    None => {
                        let again = ScheduleEntry {
                            due_ms: act.clock.now_ms() + RETRY_MOVE.as_millis() as u64,
                            ..entry
                        };
                        act.due.insert(again.due_ms, again.seq, entry);
                        act.due
                            .arm(ctx, false, |a: &mut Self| &mut a.due, |a, ctx| a.pump(ctx));
                    }
                }
            }
        }));
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        self.clock.touch();
        if self.load_failed || (self.due.is_empty() && self.loaded_to.is_some()) {
            let after = self.loaded_to;
            self.load(after);
        }
        let now = self.clock.now_ms();
        // Ordered: topics moved in the same order every run.
        let mut by_topic: BTreeMap<String, (Vec<BusMessage>, Vec<ScheduleEntry>)> = BTreeMap::new();
        let mut n = 0;
        while n < BATCH {
            let Some(entry) = self.due.pop_due(now) else {
                break;
            };
            n += 1;
            match self.read(&entry) {
                Ok(Some(m)) if entry.checks.is_some() => self.check(entry, m, ctx),
                Ok(Some(m)) => {
                    let Some(dest) = m.destination() else {
                        error!(
                            offset = entry.offset,
                            "a delayed message names no topic; dropping it"
                        );
                        self.unschedule(vec![entry]);
                        continue;
                    };
                    let slot = by_topic.entry(dest.to_string()).or_default();
                    slot.0.push(m.for_destination(Arc::from(dest)));
                    slot.1.push(entry);
                }
                Ok(None) => {
                    error!(
                        offset = entry.offset,
                        "a staged message is no longer stored (purged?); dropping its entry"
                    );
                    self.halves.remove(&entry.seq);
                    self.unschedule(vec![entry]);
                }
                Err(e) => {
                    warn!(error = %e, "reading a due delayed message failed; trying again in 1 s");
                    self.due.insert(now + 1000, entry.seq, entry);
                }
            }
        }
        for (topic, (messages, entries)) in by_topic {
            debug!(%topic, n = messages.len(), "delayed messages due");
            self.moving.extend(entries.iter().map(|e| e.seq));
            let fut = (self.sink)(topic.clone(), messages);
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
                Ok(_) => {
                    for e in &entries {
                        act.moving.remove(&e.seq);
                    }
                    act.unschedule(entries);
                }
                Err(e) => {
                    for e in &entries {
                        act.moving.remove(&e.seq);
                    }
                    warn!(%topic, error = %e, "moving due delayed messages failed; trying again in 1 s");
                    let again = act.clock.now_ms() + RETRY_MOVE.as_millis() as u64;
                    for entry in entries {
                        act.due.insert(again, entry.seq, entry);
                    }
                    act.due
                        .arm(ctx, false, |a: &mut Self| &mut a.due, |a, ctx| a.pump(ctx));
                }
            }));
        }
        if n == BATCH || self.load_failed {
            // More may be due: let the mailbox run, then go on.
            let clock = self.clock.clone();
            run_later(
                ctx,
                &clock,
                if self.load_failed {
                    RETRY_MOVE
                } else {
                    Duration::ZERO
                },
                |act, ctx| act.pump(ctx),
            );
        }
        self.due
            .arm(ctx, false, |a: &mut Self| &mut a.due, |a, ctx| a.pump(ctx));
    }

    fn unschedule(&self, entries: Vec<ScheduleEntry>) {
        self.unschedule_then(entries, |_| {});
    }

    /// As `unschedule`; `then` gets the outcome of the store's removal.
    fn unschedule_then(
        &self,
        entries: Vec<ScheduleEntry>,
        then: impl FnOnce(Result<(), StorageError>) + Send + 'static,
    ) {
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        self.resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(seqs.iter().copied());
        let resolving = self.resolving.clone();
        self.persistence.do_send(UpdateRetries {
            put: Vec::new(),
            remove: Vec::new(),
            resent: Vec::new(),
            unschedule: entries,
            reschedule: Vec::new(),
            done: Box::new(move |r| {
                if let Err(e) = &r {
                    warn!(error = %e, "removing delayed-message entries failed (they will be delivered again after a restart)");
                }
                {
                    let mut resolving = resolving.lock().unwrap_or_else(|p| p.into_inner());
                    for s in seqs {
                        resolving.remove(&s);
                    }
                }
                then(r);
            }),
        });
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.load(None);
        self.pump(ctx);
    }
}

impl Handler<Scheduled> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: Scheduled, ctx: &mut Context<Self>) {
        for e in msg.0 {
            // Past the loaded window: it is in the store, read in its turn.
            if self.loaded_to.is_none_or(|last| e <= last) {
                self.add(e);
            }
        }
        self.pump(ctx);
    }
}

/// Stops the scheduler (at shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopScheduler;

impl Handler<StopScheduler> for Scheduler {
    type Result = ();

    fn handle(&mut self, _: StopScheduler, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Ends a transaction (from its producer).
#[derive(Message)]
#[rtype(result = "Result<Option<SendReceipt>, Error>")]
pub(crate) struct EndTransaction {
    pub(crate) half: HalfMessage,
    pub(crate) half_topic_id: u32,
    pub(crate) outcome: TransactionOutcome,
}

impl Handler<EndTransaction> for Scheduler {
    type Result = ResponseFuture<Result<Option<SendReceipt>, Error>>;

    fn handle(&mut self, msg: EndTransaction, ctx: &mut Context<Self>) -> Self::Result {
        let seq = ScheduleEntry::seq_of(msg.half_topic_id, msg.half.offset);
        if msg.outcome == TransactionOutcome::Unknown || self.is_resolving(seq) {
            return Box::pin(async { Ok(None) });
        }
        // The entry as it is now: known here, or still as first written.
        let entry = match self.halves.get(&seq).copied() {
            Some(e) => Some(e),
            None => {
                let first = ScheduleEntry {
                    due_ms: msg.half.check_at_ms,
                    seq,
                    topic_id: msg.half_topic_id,
                    queue: 0,
                    offset: msg.half.offset,
                    checks: Some(0),
                };
                match self.reader.schedule_entry(&first) {
                    Ok(found) => found,
                    Err(e) => return Box::pin(async move { Err(Error::from(e)) }),
                }
            }
        };
        let Some(entry) = entry else {
            return Box::pin(async { Ok(None) }); // resolved already
        };
        self.due.remove(entry.due_ms, entry.seq);
        self.halves.remove(&seq);
        // Until its removal is stored, a second end finds it resolved.
        self.resolving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq);
        if self.checking.contains(&seq) {
            self.ended.insert(seq);
        }
        match msg.outcome {
            TransactionOutcome::Commit => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.commit(entry, ctx, Some(tx));
                Box::pin(async move { rx.await.unwrap_or(Err(Error::Closed)) })
            }
            _ => {
                debug!(
                    offset = entry.offset,
                    "transaction rolled back by its producer"
                );
                self.unschedule(vec![entry]);
                Box::pin(async { Ok(None) })
            }
        }
    }
}

/// Recalls a delayed message (from its publisher's receipt).
#[derive(Message)]
#[rtype(result = "Result<CancelOutcome, Error>")]
pub(crate) struct CancelDelayed {
    pub(crate) receipt: SendReceipt,
    pub(crate) due_ms: u64,
    pub(crate) schedule_topic_id: u32,
}

impl Handler<CancelDelayed> for Scheduler {
    type Result = ResponseFuture<Result<CancelOutcome, Error>>;

    fn handle(&mut self, msg: CancelDelayed, _: &mut Context<Self>) -> Self::Result {
        let seq = ScheduleEntry::seq_of(msg.schedule_topic_id, msg.receipt.offset);
        let too_late = || Box::pin(async { Ok(CancelOutcome::AlreadyDelivered) });
        if self.moving.contains(&seq) || self.is_resolving(seq) {
            return too_late();
        }
        let probe = ScheduleEntry {
            due_ms: msg.due_ms,
            seq,
            topic_id: msg.schedule_topic_id,
            queue: msg.receipt.queue,
            offset: msg.receipt.offset,
            checks: None,
        };
        let entry = match self.reader.schedule_entry(&probe) {
            // A half message's entry is not a delayed message's.
            Ok(Some(e)) if e.checks.is_none() => e,
            Ok(_) => return too_late(),
            Err(e) => return Box::pin(async move { Err(Error::from(e)) }),
        };
        self.due.remove(entry.due_ms, entry.seq);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // From here it is `resolving`: never moved, and a second cancel
        // is too late; answered once the removal is stored.
        self.unschedule_then(vec![entry], move |r| {
            let _ = tx.send(r);
        });
        debug!(msg_id = %msg.receipt.message_id, "delayed message cancelled");
        Box::pin(async move {
            rx.await.map_err(|_| Error::Closed)?.map_err(Error::from)?;
            Ok(CancelOutcome::Cancelled)
        })
    }
}
