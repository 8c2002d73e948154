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

use crate::timers::{run_interval, run_later};
use tokio::sync::oneshot;
use tracing::{debug, error, info, trace, warn};
use weirmq_bus::{
    Durability, Message as BusMessage, RetentionReport, StorageError, TraceEvent, TraceKind,
};

use crate::delay::{resent_key, resent_prefix, RetryEntry, RetryKey, ScheduleEntry};
use crate::disk::DiskGuard;
use crate::store::{
    offsets_batch, CommitWrites, OffsetState, QueueKey, RecordBuilder, Store, TopicSettings,
    TraceRecord,
};

mod commit;
mod fail_stop;
mod mailbox;
mod messages;
mod retention;

use fail_stop::{closed, FailStop};
use retention::{lower, RetentionJob};

pub use messages::{
    Append, AppendDone, CommitOffsets, ConfigureTopic, CreateTopic, PurgeQueue, RecordTrace,
    RunRetention, Scheduled, SetScheduler, ShutdownStore, UpdateRetries,
};

#[derive(Message)]
#[rtype(result = "()")]
struct Commit;

/// The most messages written in one commit; more waiting go in the next.
const MAX_COMMIT_MESSAGES: usize = 4096;

/// How long offsets wait for an append commit to ride in.
const OFFSETS_DELAY: Duration = Duration::from_millis(20);

/// The store's writer. See the module docs.
pub struct PersistenceActor {
    /// The store, or the failure that stopped it (see `fail_stop`).
    store: FailStop,
    /// What retention and the offsets timer read and wait on.
    clock: weirmq_bus::Clock,
    durable: bool,
    pending: Vec<Append>,
    pending_messages: usize,
    retries: Vec<UpdateRetries>,
    offsets: HashMap<(String, QueueKey), OffsetState>,
    traces: Vec<TraceRecord>,
    commit_queued: bool,
    offsets_timer: bool,
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

impl std::fmt::Debug for PersistenceActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistenceActor")
            .field("pending", &self.pending.len())
            .field("failed", &self.store.failure())
            .finish()
    }
}

impl PersistenceActor {
    /// An actor owning `store`. `durable` is false for an in-memory store
    /// (no sync is attempted).
    pub fn new(store: Store, durable: bool) -> Self {
        PersistenceActor {
            retention_every: store.retention_interval(),
            clock: store.clock().clone(),
            guard: store.disk_guard(),
            pressure_rest: None,
            store: FailStop::new(store),
            durable,
            pending: Vec::new(),
            pending_messages: 0,
            retries: Vec::new(),
            offsets: HashMap::new(),
            traces: Vec::new(),
            commit_queued: false,
            offsets_timer: false,
            retention: None,
            retention_next: Vec::new(),
            scheduler: None,
        }
    }

    /// Offsets and trace events wait up to `OFFSETS_DELAY` for an append's
    /// commit to ride in, then get a small (unsynced) commit of their own.
    fn commit_soon(&mut self, ctx: &mut Context<Self>) {
        if !self.commit_queued && !self.offsets_timer {
            self.offsets_timer = true;
            run_later(ctx, &self.clock, OFFSETS_DELAY, |act, ctx| {
                act.offsets_timer = false;
                if !act.offsets.is_empty() || !act.traces.is_empty() {
                    act.queue_commit(ctx);
                }
            });
        }
    }

    fn queue_commit(&mut self, ctx: &mut Context<Self>) {
        if !self.commit_queued {
            self.commit_queued = true;
            ctx.notify(Commit);
        }
    }
}

impl Actor for PersistenceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let clock = self.clock.clone();
        run_interval(ctx, &clock, self.retention_every, |act, ctx| {
            if act.retention.is_none() && act.store.is_writable() {
                act.start_retention(Vec::new(), ctx);
            }
        });
        if self.guard.reserve().is_some() {
            ctx.run_interval(DISK_EVERY, |act, ctx| {
                act.guard.measure();
                if act.guard.under_pressure() && act.store.is_open() {
                    act.start_pressure(ctx);
                }
            });
        }
        ctx.run_interval(weirmq_bus::metrics::SAMPLE_EVERY, |act, _| {
            if !weirmq_bus::metrics::sampled() {
                return;
            }
            if let Some(bytes) = act.store.store().and_then(|s| s.size_on_disk()) {
                metrics::gauge!(weirmq_bus::metrics::STORE_BYTES).set(bytes as f64);
            }
        });
    }
}
