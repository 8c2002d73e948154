//! `GroupActor`: one consumer group's subscription to one topic.
//!
//! It owns the group's positions in every queue of the topic: the committed
//! offset (every message below it acked), the offsets acked above it, the
//! next offset to hand out for the first time, and the messages in flight.
//! It hands out at most `max_in_flight` unsettled deliveries at once:
//! messages come from the queues' pushes when the group keeps up, and are
//! read back from the store in ranges when it falls behind, so memory stays
//! bounded whatever the backlog.
//!
//! # Settlement
//!
//! * `Ack`: the offset is acked; the committed offset moves over every
//!   contiguous acked offset.
//! * `Nack { delay, error }`: the next attempt is written to the store's
//!   delay index (which message, attempt n+1, due time, first failure, last
//!   error), and once it is stored the message counts as acked — later
//!   messages are not held back, and the retry survives a restart with its
//!   attempt number and due time. One timer per group wakes at the earliest
//!   due retry, which is delivered again (read back from the log by queue and
//!   offset) and settled like any delivery. If the index cannot be written,
//!   the retry falls back to an in-memory timer (never lost: unacked).
//! * `DeadLetter { reason }`: the message is copied to the group's
//!   dead-letter topic `%DLQ%<group>`, then acked once that copy is stored.
//!
//! # FIFO (`Ordering::Fifo`)
//!
//! One message per *message group* (its queue and `message_group`, or the
//! queue alone for messages without one) is in flight at a time: a message
//! read while its group is busy waits in memory behind it (bounded by the
//! span) and is handed out when the one before is acked or dead-lettered.
//! A `Nack` is retried in place after its delay (no retry entry: the
//! message stays in flight and unacked, so its group waits and a restart
//! redelivers it first); other groups go on meanwhile. A group stuck on one
//! message holds its queue's committed offset, so the others of that queue
//! can run at most the span ahead of it.
//!
//! # Priority
//!
//! A topic's queues are followed by its priority lanes (queue `n + p - 1`
//! holds priority `p`, see `weirmq_bus::priority_queue`). When there is room
//! in the window, a concurrent subscription fills it level by level from 9
//! down to 0: first the due retries of that level (a retry's level is its
//! queue's), then that level's queue(s) — so under a backlog a higher
//! priority never waits behind a lower one, and a retried message keeps
//! its priority. Within a level: retries by due time, then queue order
//! (level 0's queues fairly, round robin). A FIFO subscription reads every
//! queue and lane fairly, without precedence (messages with a message group
//! are never in a lane).
//!
//! Positions are written to the store at most every 50 ms (riding in append
//! commits), and at stop.
//!
//! # Shutdown
//!
//! [`StopGroup`] closes the delivery stream, waits for the settlements
//! still being written (retry entries, dead-letter copies: the original is
//! acked only once they are stored), then writes the positions and stops.
//! So after a clean stop each message is either acked, or has exactly one
//! way back: unacked in the log (delivered again as attempt 1), or a retry
//! entry (delivered again with its attempt). Deliveries not settled by then
//! are delivered again to the group's next subscription.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod failures;
mod mailbox;

use actix::prelude::*;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::{error, trace, warn};
use weirmq_bus::{
    DeadLetterCopy, DeliveryBatch, Error, Filter, GroupStats, Message as BusMessage,
    Ordering as Order, OutgoingMessage, QueuePosition, RawDelivery, SendReceipt, SettleToken,
    Settlement, StorageError, TraceEvent, TraceKind,
};
use weirmq_persistence::{
    next_seq, CommitOffsets, OffsetState, PersistenceActor, QueueKey, RecordTrace, RetryEntry,
    RetryKey, StoreReader, TraceRecord, UpdateRetries,
};

use mailbox::RetryStored;
pub(crate) use mailbox::{
    AddRetries, Appended, HighWater, Inspect, ResetPositions, Settle, StopGroup,
};

/// Publishes a dead letter (to `%DLQ%<group>`), bypassing user-topic checks.
pub(crate) type DeadLetterSink =
    Arc<dyn Fn(OutgoingMessage) -> BoxFuture<'static, Result<SendReceipt, Error>> + Send + Sync>;

/// How far past its committed offset a queue may hand out messages, as a
/// multiple of `max_in_flight`: bounds the acked-out-of-order set (and so the
/// position record) while one message is slow or being retried.
const SPAN_FACTOR: u64 = 4;
const OFFSETS_EVERY: Duration = Duration::from_millis(50);
const DLQ_RETRY: Duration = Duration::from_secs(5);
const MAX_REASON: usize = 1024;

/// The first word of a retry delivery's token (queues use their number).
const RETRY_TOKEN: u64 = u64::MAX;

/// What a settlement token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A first delivery (or an in-memory redelivery) of a queue's message.
    Original { queue: u32, offset: u64 },
    /// A delivery of a retry entry, by its sequence number.
    Retry { seq: u64 },
}

impl Held {
    fn of(token: SettleToken) -> Held {
        match token.parts() {
            (RETRY_TOKEN, seq) => Held::Retry { seq },
            (queue, offset) => Held::Original {
                queue: queue as u32,
                offset,
            },
        }
    }
}

/// A retry entry being delivered.
#[derive(Debug)]
struct RetryFlight {
    entry: RetryEntry,
    message: Arc<BusMessage>,
}

/// The first Unix millisecond at or after now + `delay` (rounded up, so a
/// retry is never early).
fn due_ms_after(clock: &Clock, delay: Duration) -> u64 {
    weirmq_bus::unix_ms_ceil(clock.now() + delay)
}

use super::due::DueQueue;
use weirmq_bus::Clock;
use weirmq_persistence::timers::run_later;

#[derive(Debug)]
struct InFlight {
    message: Arc<BusMessage>,
    attempt: u32,
    first_failed_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct QueueState {
    committed: u64,
    acked_above: BTreeSet<u64>,
    next: u64,
    end: u64,
    in_flight: HashMap<u64, InFlight>,
    dirty: bool,
}

impl QueueState {
    fn from_stored(s: OffsetState, end: u64) -> Self {
        QueueState {
            committed: s.committed,
            next: s.committed,
            end: end.max(s.committed),
            acked_above: s.acked_above.into_iter().collect(),
            ..Default::default()
        }
    }

    fn ack(&mut self, offset: u64) {
        if offset == self.committed {
            self.committed += 1;
            while self.acked_above.remove(&self.committed) {
                self.committed += 1;
            }
        } else if offset > self.committed {
            self.acked_above.insert(offset);
        }
        self.dirty = true;
    }

    fn offset_state(&self) -> OffsetState {
        OffsetState {
            committed: self.committed,
            acked_above: self.acked_above.iter().copied().collect(),
        }
    }
}

/// The setup of a group actor.
pub(crate) struct GroupSetup {
    pub(crate) group: String,
    pub(crate) topic: Arc<str>,
    pub(crate) topic_id: u32,
    /// The topic's own queue count; the queues after them are its
    /// priority lanes.
    pub(crate) base_queues: u32,
    pub(crate) starts: Vec<OffsetState>,
    /// Each queue's end (next offset to be written), advanced by the commit
    /// callback before any publisher hears of its receipt.
    pub(crate) ends: Vec<Arc<AtomicU64>>,
    pub(crate) max_in_flight: usize,
    pub(crate) reader: StoreReader,
    pub(crate) persistence: Addr<PersistenceActor>,
    pub(crate) deliveries: mpsc::UnboundedSender<DeliveryBatch>,
    pub(crate) dead_letters: DeadLetterSink,
    /// The group's retry entries found in the store.
    pub(crate) retries: Vec<RetryEntry>,
    /// Which messages the group wants.
    pub(crate) filter: Filter,
    /// The topic's trace switch.
    pub(crate) trace: Arc<AtomicBool>,
    /// Concurrent or FIFO per message group.
    pub(crate) ordering: Order,
    /// What retries are due by and wait on.
    pub(crate) clock: Clock,
}

/// A FIFO subscription's unit of order: a message group in its queue, or
/// the queue itself for messages without a group.
type FifoKey = (u32, Option<String>);

fn fifo_key(m: &BusMessage) -> FifoKey {
    (m.queue(), m.message_group().map(str::to_string))
}

/// One consumer group's subscription to one topic. See the module docs.
pub(crate) struct GroupActor {
    group: String,
    topic: Arc<str>,
    topic_id: u32,
    /// The topic's queues, then its priority lanes.
    queues: Vec<QueueState>,
    /// How many of `queues` are the topic's own (priority 0).
    base: u32,
    ends: Vec<Arc<AtomicU64>>,
    max_in_flight: usize,
    max_span: u64,
    in_flight: usize,
    rotate: usize,
    reader: StoreReader,
    persistence: Addr<PersistenceActor>,
    tx: Option<mpsc::UnboundedSender<DeliveryBatch>>,
    dead_letters: DeadLetterSink,
    outbox: Vec<RawDelivery>,
    stats: GroupStats,
    offsets_timer: bool,
    read_failed: bool,
    /// Retries waiting for their due time, by (due ms, seq).
    scheduled: DueQueue<RetryEntry>,
    /// Due retries waiting for room, by priority (index = level), each in
    /// due order.
    ready: Vec<VecDeque<RetryEntry>>,
    /// Retries being delivered, by seq.
    retrying: HashMap<u64, RetryFlight>,
    filter: Filter,
    trace: Arc<AtomicBool>,
    /// Trace events not yet sent to the store.
    traces: Vec<TraceRecord>,
    /// FIFO: one message per message group in flight, in offset order.
    fifo: bool,
    /// FIFO: the groups with a message in flight, and their messages
    /// waiting behind it (read already, bounded by the span).
    fifo_busy: HashMap<FifoKey, VecDeque<Arc<BusMessage>>>,
    /// Settlements being written (retry entries, dead-letter copies) whose
    /// original is not acked yet.
    writing: usize,
    /// A stop waiting for `writing` to reach 0.
    stopping: Option<tokio::sync::oneshot::Sender<()>>,
    /// What retries are due by and wait on.
    clock: Clock,
}

impl GroupActor {
    pub(crate) fn new(s: GroupSetup) -> Self {
        GroupActor {
            group: s.group,
            topic: s.topic,
            topic_id: s.topic_id,
            queues: s
                .starts
                .into_iter()
                .zip(&s.ends)
                .map(|(start, end)| QueueState::from_stored(start, end.load(Ordering::Acquire)))
                .collect(),
            base: s.base_queues,
            ends: s.ends,
            max_in_flight: s.max_in_flight.max(1),
            max_span: (s.max_in_flight.max(1) as u64 * SPAN_FACTOR).max(1024),
            in_flight: 0,
            rotate: 0,
            reader: s.reader,
            persistence: s.persistence,
            tx: Some(s.deliveries),
            dead_letters: s.dead_letters,
            outbox: Vec::new(),
            stats: GroupStats::default(),
            offsets_timer: false,
            read_failed: false,
            scheduled: {
                let mut q = DueQueue::new(s.clock.clone());
                for e in s.retries {
                    q.insert(e.key.due_ms, e.key.seq, e);
                }
                q
            },
            ready: (0..=weirmq_bus::MAX_PRIORITY)
                .map(|_| VecDeque::new())
                .collect(),
            retrying: HashMap::new(),
            filter: s.filter,
            trace: s.trace,
            traces: Vec::new(),
            fifo: s.ordering == Order::Fifo,
            fifo_busy: HashMap::new(),
            writing: 0,
            stopping: None,
            clock: s.clock,
        }
    }

    /// Records a trace event of `m` if its topic is traced.
    fn note(&mut self, m: &BusMessage, kind: TraceKind, attempt: u32, detail: Option<String>) {
        if self.trace.load(Ordering::Relaxed) {
            self.traces.push(TraceRecord {
                key: self.key(m.queue()),
                offset: m.offset(),
                event: TraceEvent::at_ms(
                    self.clock.now_ms(),
                    kind,
                    Some(&self.group),
                    attempt,
                    detail,
                ),
            });
        }
    }

    /// Moves a queue past messages retention removed before the group read
    /// them; returns whether it moved. Deliveries in flight below the new
    /// start finish normally.
    fn skip_expired(&mut self, qi: usize) -> Result<bool, StorageError> {
        let start = self.reader.queue_start(self.key(qi as u32))?;
        let q = &mut self.queues[qi];
        if start <= q.next {
            return Ok(false);
        }
        let skipped = start - q.next - q.acked_above.range(q.next..start).count() as u64;
        let from = q.next;
        q.next = start;
        if q.committed < start {
            q.committed = start;
            q.acked_above = q.acked_above.split_off(&start);
            while q.acked_above.remove(&q.committed) {
                q.committed += 1;
            }
            q.dirty = true;
        }
        self.stats.expired += skipped;
        warn!(group = %self.group, topic = %self.topic, queue = qi, from, first_kept = start,
            lost = skipped, "retention removed messages this group had not received");
        Ok(true)
    }

    fn key(&self, queue: u32) -> QueueKey {
        QueueKey {
            topic_id: self.topic_id,
            queue,
        }
    }

    /// Hands out `m` (first delivery) if it is the next of its queue.
    fn take_first(&mut self, m: Arc<BusMessage>) {
        let q = &mut self.queues[m.queue() as usize];
        debug_assert_eq!(m.offset(), q.next);
        q.next += 1;
        if q.acked_above.contains(&m.offset()) {
            return;
        }
        if !self.filter.matches(&m) {
            // Not for this group: skip it, as if acked.
            q.ack(m.offset());
            self.stats.filtered += 1;
            self.note(&m, TraceKind::Filtered, 0, None);
            return;
        }
        if self.fifo {
            let key = fifo_key(&m);
            if let Some(waiting) = self.fifo_busy.get_mut(&key) {
                // Its message group has one in flight: it waits its turn.
                waiting.push_back(m);
                return;
            }
            self.fifo_busy.insert(key, VecDeque::new());
        }
        self.deliver_first(m);
    }

    /// Hands out a message for the first time.
    fn deliver_first(&mut self, m: Arc<BusMessage>) {
        let token = SettleToken::new(m.queue() as u64, m.offset());
        self.queues[m.queue() as usize].in_flight.insert(
            m.offset(),
            InFlight {
                message: m.clone(),
                attempt: 1,
                first_failed_ms: None,
            },
        );
        self.in_flight += 1;
        self.stats.delivered += 1;
        self.note(&m, TraceKind::Delivered, 1, None);
        self.outbox.push(RawDelivery {
            message: m,
            attempt: 1,
            token,
        });
    }

    /// Fills the in-flight window — level by level from the highest
    /// priority, each level's due retries before its queues (see the
    /// module docs) — sends what is ready as one batch, and arms the retry
    /// timer.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        self.clock.touch();
        self.take_due_retries();
        self.refresh_ends();
        if self.fifo {
            // No precedence: every ready retry, then every queue and lane.
            for level in 0..self.ready.len() {
                self.deliver_ready(level);
            }
            self.pump_queues(0..self.queues.len());
        } else if self.lanes_idle() {
            // The common case: nothing above priority 0 waits.
            self.deliver_ready(0);
            self.pump_queues(0..self.base as usize);
        } else {
            for level in (0..self.ready.len()).rev() {
                if self.in_flight >= self.max_in_flight {
                    break;
                }
                self.deliver_ready(level);
                match weirmq_bus::priority_queue(self.base, level as u8) {
                    Some(lane) => self.pump_queues(lane as usize..lane as usize + 1),
                    None => self.pump_queues(0..self.base as usize),
                }
            }
        }
        self.flush_outbox();
        if !self.traces.is_empty() {
            self.persistence
                .do_send(RecordTrace(std::mem::take(&mut self.traces)));
        }
        self.arm_timer(ctx);
        if self.queues.iter().any(|q| q.dirty) {
            self.schedule_offsets(ctx);
        }
    }

    /// Writes dirty positions within `OFFSETS_EVERY`.
    fn schedule_offsets(&mut self, ctx: &mut Context<Self>) {
        if !self.offsets_timer {
            self.offsets_timer = true;
            run_later(ctx, &self.clock, OFFSETS_EVERY, |act, _| {
                act.offsets_timer = false;
                act.write_offsets();
            });
        }
    }

    /// Lets go of a delivery that is settled (acked, dead-lettered or
    /// rescheduled).
    fn release(&mut self, held: Held, ctx: &mut Context<Self>) {
        match held {
            Held::Original { queue, offset } => self.acked(queue, offset, ctx),
            Held::Retry { seq } => {
                if self.retrying.remove(&seq).is_some() {
                    self.in_flight -= 1;
                }
            }
        }
    }

    /// Whether no priority lane has a message to hand out and no retry
    /// above priority 0 is ready.
    fn lanes_idle(&self) -> bool {
        self.queues[self.base as usize..]
            .iter()
            .all(|q| q.next >= q.end)
            && self.ready[1..].iter().all(VecDeque::is_empty)
    }

    /// Hands out first deliveries from `queues` (indexes into
    /// `self.queues`), fairly, while there is room.
    fn pump_queues(&mut self, queues: std::ops::Range<usize>) {
        let n = queues.len();
        let mut progress = true;
        while progress && n > 0 && self.in_flight < self.max_in_flight && !self.read_failed {
            progress = false;
            for i in 0..n {
                let qi = queues.start + (self.rotate + i) % n;
                let room = self.max_in_flight.saturating_sub(self.in_flight);
                if room == 0 {
                    break;
                }
                let q = &mut self.queues[qi];
                // Skip offsets acked out of order before a restart.
                while q.next < q.end && q.acked_above.contains(&q.next) {
                    q.next += 1;
                }
                let end = q.end.min(q.committed + self.max_span);
                if q.next >= end {
                    continue;
                }
                let from = q.next;
                let chunk = room.min(256);
                match self
                    .reader
                    .read_range(&self.topic, self.key(qi as u32), from, end, chunk)
                {
                    Ok(msgs) if msgs.first().is_some_and(|m| m.offset() == from) => {
                        progress = true;
                        for m in msgs {
                            if m.offset() == self.queues[qi].next {
                                self.take_first(m);
                            }
                        }
                    }
                    // A gap: retention removed messages the group had not read.
                    Ok(_) if matches!(self.skip_expired(qi), Ok(true)) => progress = true,
                    Ok(_) => {
                        error!(group = %self.group, topic = %self.topic, queue = qi, from, end,
                            "queue log has no messages where the queue end says there are");
                        self.read_failed = true;
                    }
                    Err(e) => {
                        error!(group = %self.group, topic = %self.topic, queue = qi, error = %e,
                            "reading the queue log failed; delivery of this group stops");
                        self.read_failed = true;
                    }
                }
            }
            self.rotate = self.rotate.wrapping_add(1);
        }
    }

    /// Reads the queues' ends: everything below them is committed.
    fn refresh_ends(&mut self) {
        for (q, end) in self.queues.iter_mut().zip(&self.ends) {
            q.end = q.end.max(end.load(Ordering::Acquire));
        }
    }

    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.outbox);
        trace!(group = %self.group, n = batch.len(), "deliver batch");
        if let Some(tx) = &self.tx {
            if tx.send(batch).is_err() {
                // The subscriber is gone; what it held stays in flight and is
                // delivered again to the next subscription.
                self.tx = None;
            }
        }
    }

    fn redeliver(&mut self, queue: u32, offset: u64) {
        let Some(f) = self.queues[queue as usize].in_flight.get_mut(&offset) else {
            return;
        };
        f.attempt += 1;
        self.stats.delivered += 1;
        let (m, attempt) = (f.message.clone(), f.attempt);
        self.note(&m, TraceKind::Delivered, attempt, None);
        let f = &self.queues[queue as usize].in_flight[&offset];
        self.outbox.push(RawDelivery {
            message: f.message.clone(),
            attempt: f.attempt,
            token: SettleToken::new(queue as u64, offset),
        });
        self.flush_outbox();
    }

    fn acked(&mut self, queue: u32, offset: u64, ctx: &mut Context<Self>) {
        let q = &mut self.queues[queue as usize];
        let done = q.in_flight.remove(&offset);
        if done.is_some() {
            self.in_flight -= 1;
        }
        q.ack(offset);
        if let (true, Some(f)) = (self.fifo, done) {
            // The next message of its group, if one waits.
            let key = fifo_key(&f.message);
            match self.fifo_busy.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => self.deliver_first(next),
                None => {
                    self.fifo_busy.remove(&key);
                }
            }
        }
        self.schedule_offsets(ctx);
    }

    fn write_offsets(&mut self) {
        let entries = self.dirty_offsets();
        if !entries.is_empty() {
            self.persistence.do_send(CommitOffsets {
                group: self.group.clone(),
                entries,
                now: false,
            });
        }
    }

    fn dirty_offsets(&mut self) -> Vec<(QueueKey, OffsetState)> {
        let mut entries = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.dirty {
                q.dirty = false;
                entries.push((
                    QueueKey {
                        topic_id: self.topic_id,
                        queue: i as u32,
                    },
                    q.offset_state(),
                ));
            }
        }
        entries
    }

    /// A settlement write finished; a stop waiting for it may go on.
    fn written(&mut self) {
        self.writing -= 1;
        if self.writing == 0 {
            if let Some(tx) = self.stopping.take() {
                let _ = tx.send(());
            }
        }
    }
}
