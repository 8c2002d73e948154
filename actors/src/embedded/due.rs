//! `DueQueue`: entries ordered by due time with one timer at the earliest.
//!
//! The one timing mechanism of the broker: a group actor keeps its scheduled
//! retries in one, the scheduler its delayed messages. Both are backed by
//! entries in the store's delay index (`r…` and `d…` keys, ordered by due
//! time the same way); this is their in-memory side. No polling: the owner
//! arms one actix timer at the earliest due time and re-arms it when an
//! earlier entry arrives.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use weirmq_bus::Clock;
use weirmq_persistence::timers::run_later;

/// Entries by (due ms, seq), and the armed wake-up.
#[derive(Debug)]
pub(crate) struct DueQueue<T> {
    entries: BTreeMap<(u64, u64), T>,
    timer: Option<(u64, SpawnHandle)>,
    /// What "due" is measured by and the wake-up waits on.
    clock: Clock,
}

impl<T: 'static> DueQueue<T> {
    pub(crate) fn new(clock: Clock) -> Self {
        DueQueue {
            entries: BTreeMap::new(),
            timer: None,
            clock,
        }
    }

    pub(crate) fn insert(&mut self, due_ms: u64, seq: u64, entry: T) {
        self.entries.insert((due_ms, seq), entry);
    }

    /// Takes out the entry at (due ms, seq), if there.
    pub(crate) fn remove(&mut self, due_ms: u64, seq: u64) -> Option<T> {
        self.entries.remove(&(due_ms, seq))
    }

    /// The earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: u64) -> Option<T> {
        let (&key, _) = self.entries.first_key_value()?;
        if key.0 > now {
            return None;
        }
        self.entries.remove(&key)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Arms the wake-up at the earliest due time (unless one is armed as
    /// early or earlier). `queue` finds this queue in the actor; `wake` runs
    /// then. An entry already due (it fell due after the caller looked)
    /// gets a wake-up in 1 ms — unless the caller is `blocked` (no room to
    /// take it: whatever makes room wakes it).
    pub(crate) fn arm<A>(
        &mut self,
        ctx: &mut Context<A>,
        blocked: bool,
        queue: fn(&mut A) -> &mut DueQueue<T>,
        wake: fn(&mut A, &mut Context<A>),
    ) where
        A: Actor<Context = Context<A>>,
    {
        let Some(&(due, _)) = self.entries.keys().next() else {
            return;
        };
        let now = self.clock.now_ms();
        if due <= now && blocked {
            return;
        }
        let due = due.max(now + 1);
        if let Some((armed, handle)) = self.timer {
            if armed <= due {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = run_later(
            ctx,
            &self.clock,
            Duration::from_millis(due - now),
            move |act, ctx| {
                queue(act).timer = None;
                wake(act, ctx);
            },
        );
        self.timer = Some((due, handle));
    }
}
