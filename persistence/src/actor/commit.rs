//! One commit, in named steps: [`PersistenceActor::take_commit`] takes what
//! is pending (up to `MAX_COMMIT_MESSAGES` messages, every offset, retry
//! update and trace event); [`Pending::write`] turns it into the trees'
//! batches and writes them (one sled transaction more for each local-outbox
//! append), then syncs if any waiter asked `Flushed`;
//! [`PersistenceActor::after_commit`] tells the disk guard, the retention
//! pass and the scheduler, and every waiter gets the outcome.

use super::*;
use weirmq_bus::metrics as m;

/// What one commit writes, taken from the actor's queues.
pub(super) struct Pending {
    appends: Vec<Append>,
    messages: usize,
    offsets: HashMap<(String, QueueKey), OffsetState>,
    retries: Vec<UpdateRetries>,
    traces: Vec<TraceRecord>,
    /// Staged messages (delayed, half) of these appends, for the delay index.
    scheduled: Vec<ScheduleEntry>,
}

impl PersistenceActor {
    /// Runs one commit of up to `MAX_COMMIT_MESSAGES` pending messages and
    /// all pending offsets. Returns whether appends remain.
    pub(super) fn commit(&mut self) -> bool {
        let mut pending = self.take_commit();
        let result = self
            .store
            .writable()
            .and_then(|store| pending.write(store, self.durable));
        let result = result.map_err(|e| self.store.trip(e));
        self.after_commit(&result, &pending);
        for a in pending.appends {
            (a.done)(result.clone());
        }
        for u in pending.retries {
            (u.done)(result.clone());
        }
        !self.pending.is_empty()
    }

    /// Takes the appends that fit in one commit, and everything else
    /// pending.
    fn take_commit(&mut self) -> Pending {
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
        let scheduled = appends.iter().flat_map(staged).collect();
        Pending {
            appends,
            messages: n,
            offsets: std::mem::take(&mut self.offsets),
            retries: std::mem::take(&mut self.retries),
            traces: std::mem::take(&mut self.traces),
            scheduled,
        }
    }

    /// After a commit: the disk guard counts what was written; staged
    /// messages hold back a running retention pass and go to the scheduler.
    fn after_commit(&mut self, result: &Result<(), StorageError>, pending: &Pending) {
        if result.is_err() {
            return;
        }
        let bytes: usize = pending
            .appends
            .iter()
            .flat_map(|a| &a.messages)
            .map(|m| m.body().len() + 64)
            .sum();
        self.guard.wrote(bytes as u64);
        if pending.scheduled.is_empty() {
            return;
        }
        if let Some(job) = &mut self.retention {
            for e in &pending.scheduled {
                let key = QueueKey {
                    topic_id: e.topic_id,
                    queue: e.queue,
                };
                let f = job.floors.entry(key).or_insert(e.offset);
                *f = (*f).min(e.offset);
            }
        }
        if let Some(s) = &self.scheduler {
            s.do_send(Scheduled(pending.scheduled.clone()));
        }
    }
}

/// The delay-index entries of an append's staged messages (a delayed or
/// half message names its destination and is due at a time).
fn staged(a: &Append) -> impl Iterator<Item = ScheduleEntry> + '_ {
    a.messages.iter().filter_map(move |m| {
        let (Some(_), Some(at)) = (m.destination(), m.deliver_at()) else {
            return None;
        };
        Some(ScheduleEntry {
            // Rounded up: never delivered before its time.
            due_ms: weirmq_bus::unix_ms_ceil(at),
            seq: ScheduleEntry::seq_of(a.key.topic_id, m.offset()),
            topic_id: a.key.topic_id,
            queue: a.key.queue,
            offset: m.offset(),
            checks: m.is_half().then_some(0),
        })
    })
}

impl Pending {
    /// Writes the commit: the log records (an outbox append in a sled
    /// transaction of its own, with what came before it written first),
    /// then the index, trace, delay and offsets batches; then one sync if
    /// a waiter asked `Flushed` and the store is durable.
    fn write(&mut self, store: &mut Store, durable: bool) -> Result<(), StorageError> {
        let now = store.clock().now_ms();
        let mut records = RecordBuilder::default();
        let mut nrecords = 0;
        // State writes without a message (`write_state`, an inbox's marks):
        // consecutive ones go in one batch of the state tree (atomic by
        // itself: no transaction needed), written before anything that
        // comes after them.
        let mut state = crate::kv::Batch::default();
        let mut state_ops = 0;
        for a in &self.appends {
            if a.state.is_empty() {
                for m in &a.messages {
                    records.push(a.key, m.offset(), m);
                    records.push_dedupe(a.key, m);
                }
            } else if a.messages.is_empty() {
                for op in &a.state {
                    match op {
                        weirmq_bus::StateOp::Put { key, value } => {
                            state.insert(&key[..], &value[..]);
                        }
                        weirmq_bus::StateOp::Delete { key } => state.remove(&key[..]),
                    }
                }
                state_ops += a.state.len();
            } else {
                if state_ops > 0 {
                    store.write_state(std::mem::take(&mut state))?;
                    state_ops = 0;
                }
                // The local outbox: what came before it first, then its
                // messages and the application's writes in one sled
                // transaction (both or neither survive a crash).
                let before = std::mem::take(&mut records).finish();
                nrecords += before.closed.len();
                let index = store.index_records(before.closed);
                store.write(CommitWrites {
                    index,
                    ..CommitWrites::log(before.log)
                })?;
                let mut own = RecordBuilder::default();
                for m in &a.messages {
                    own.push(a.key, m.offset(), m);
                }
                let own = own.finish();
                nrecords += own.closed.len();
                let index = store.index_records(own.closed);
                store.write_with_state(own.log, &a.state, index)?;
            }
            if a.trace {
                self.traces.extend(a.messages.iter().map(|m| TraceRecord {
                    key: a.key,
                    offset: m.offset(),
                    event: TraceEvent::at_ms(now, TraceKind::Published, None, 0, None),
                }));
            }
        }
        if state_ops > 0 {
            store.write_state(state)?;
        }
        let records = records.finish();
        nrecords += records.closed.len();
        let writes = CommitWrites {
            index: store.index_records(records.closed),
            trace: (!self.traces.is_empty()).then(|| store.trace_batch(&self.traces)),
            delay: self.delay_batch(now),
            offsets: (!self.offsets.is_empty()).then(|| offsets_batch(&self.offsets)),
            ..CommitWrites::log(records.log)
        };
        store.write(writes)?;
        let sync = self
            .appends
            .iter()
            .any(|a| a.durability == Durability::Flushed);
        // Sampled: at most one commit a millisecond (see `SampleGate`).
        static COMMITS: m::SampleGate = m::SampleGate::new();
        static SYNCS: m::SampleGate = m::SampleGate::new();
        if COMMITS.due() {
            metrics::histogram!(m::COMMIT_MESSAGES).record(self.messages as f64);
        }
        if sync && durable {
            let started = std::time::Instant::now();
            store.sync()?;
            if SYNCS.due() {
                metrics::histogram!(m::SYNC_DURATION).record(m::seconds(started.elapsed()));
            }
        }
        trace!(
            messages = self.messages,
            records = nrecords,
            offsets = self.offsets.len(),
            traces = self.traces.len(),
            sync,
            "commit"
        );
        Ok(())
    }

    /// The delay index's changes: staged messages, and the retry updates
    /// (unscheduled and rescheduled staged messages, removed and new retry
    /// entries, "resent" marks).
    fn delay_batch(&self, now: u64) -> Option<crate::kv::Batch> {
        if self.retries.is_empty() && self.scheduled.is_empty() {
            return None;
        }
        let mut b = crate::kv::Batch::default();
        for e in &self.scheduled {
            b.insert(&e.key()[..], e.value());
        }
        for u in &self.retries {
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
                b.insert(resent_key(group, *offset), now.to_be_bytes().to_vec());
            }
        }
        Some(b)
    }
}
