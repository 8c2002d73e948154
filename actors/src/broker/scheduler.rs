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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use tracing::{debug, error, warn};
use weirmq_bus::{Error, Message as BusMessage, SCHEDULE_TOPIC};
use weirmq_persistence::{
    PersistenceActor, QueueKey, ScheduleEntry, Scheduled, StoreReader, UpdateRetries,
};

use super::due::{now_ms, DueQueue};

/// Stores copies of due messages in their topic (named first).
pub(crate) type MoveSink =
    Arc<dyn Fn(String, Vec<BusMessage>) -> BoxFuture<'static, Result<(), Error>> + Send + Sync>;

/// Entries kept in memory at most; the rest wait in the store.
const WINDOW: usize = 4096;
/// Due messages moved per wake-up (then the mailbox gets a turn).
const BATCH: usize = 1024;
/// A failed move is tried again after this long.
const RETRY_MOVE: Duration = Duration::from_secs(1);

pub(crate) struct Scheduler {
    reader: StoreReader,
    persistence: Addr<PersistenceActor>,
    sink: MoveSink,
    topic: Arc<str>,
    due: DueQueue<ScheduleEntry>,
    /// The last entry loaded from the store, when some later ones were
    /// left there; `None` when every stored entry is in memory.
    loaded_to: Option<ScheduleEntry>,
    load_failed: bool,
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
    ) -> Self {
        Scheduler {
            reader,
            persistence,
            sink,
            topic: Arc::from(SCHEDULE_TOPIC),
            due: DueQueue::default(),
            loaded_to: None,
            load_failed: false,
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
                    self.due.insert(e.due_ms, e.seq, e);
                }
                self.load_failed = false;
            }
            Err(e) => {
                error!(error = %e, "reading delayed messages failed; trying again in 1 s");
                self.load_failed = true;
            }
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.load_failed || (self.due.is_empty() && self.loaded_to.is_some()) {
            let after = self.loaded_to;
            self.load(after);
        }
        let now = now_ms();
        let mut by_topic: HashMap<String, (Vec<BusMessage>, Vec<ScheduleEntry>)> = HashMap::new();
        let mut n = 0;
        while n < BATCH {
            let Some(entry) = self.due.pop_due(now) else {
                break;
            };
            n += 1;
            let key = QueueKey {
                topic_id: entry.topic_id,
                queue: entry.queue,
            };
            match self
                .reader
                .read_range(&self.topic, key, entry.offset, entry.offset + 1, 1)
            {
                Ok(mut found) if found.len() == 1 => {
                    let m = found.remove(0);
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
                Ok(_) => {
                    error!(
                        offset = entry.offset,
                        "a delayed message is no longer stored (purged?); dropping its entry"
                    );
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
            let fut = (self.sink)(topic.clone(), messages);
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
                Ok(()) => act.unschedule(entries),
                Err(e) => {
                    warn!(%topic, error = %e, "moving due delayed messages failed; trying again in 1 s");
                    let again = now_ms() + RETRY_MOVE.as_millis() as u64;
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
            ctx.run_later(
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
        self.persistence.do_send(UpdateRetries {
            put: Vec::new(),
            remove: Vec::new(),
            resent: Vec::new(),
            unschedule: entries,
            done: Box::new(|r| {
                if let Err(e) = r {
                    warn!(error = %e, "removing delayed-message entries failed (they will be delivered again after a restart)");
                }
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
                self.due.insert(e.due_ms, e.seq, e);
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
