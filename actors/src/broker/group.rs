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
//! * `Nack { delay }`: the message stays in flight and is delivered again
//!   after `delay`, as the next attempt (in memory: the durable retry
//!   schedule is the subscriber's retry policy's job).
//! * `DeadLetter { reason }`: the message is copied to the group's
//!   dead-letter topic `%DLQ%<group>`, then acked once that copy is stored.
//!
//! Positions are written to the store at most every 50 ms (riding in append
//! commits), and at stop.
//!
//! # Shutdown
//!
//! [`StopGroup`] writes the positions, closes the delivery stream and stops.
//! Deliveries not settled by then are delivered again to the group's next
//! subscription.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tracing::{error, trace, warn};
use weirmq_bus::{
    DeliveryBatch, Error, GroupStats, Message as BusMessage, OutgoingMessage, QueuePosition,
    RawDelivery, SendReceipt, SettleToken, Settlement,
};
use weirmq_persistence::{CommitOffsets, OffsetState, PersistenceActor, QueueKey, StoreReader};

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

/// Property names a dead letter carries besides the original's properties:
/// origin topic, queue, offset and message id, the reason (last error),
/// the attempts made, and when it first failed and was dead-lettered (Unix
/// milliseconds).
pub const DLQ_PROPERTIES: [&str; 8] = [
    "DLQ_ORIGIN_TOPIC",
    "DLQ_ORIGIN_QUEUE",
    "DLQ_ORIGIN_OFFSET",
    "DLQ_ORIGIN_MSG_ID",
    "DLQ_REASON",
    "DLQ_ATTEMPTS",
    "DLQ_FIRST_FAILED_AT_MS",
    "DLQ_DEAD_LETTERED_AT_MS",
];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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
    pub(crate) starts: Vec<OffsetState>,
    /// Each queue's end (next offset to be written), advanced by the commit
    /// callback before any publisher hears of its receipt.
    pub(crate) ends: Vec<Arc<AtomicU64>>,
    pub(crate) max_in_flight: usize,
    pub(crate) reader: StoreReader,
    pub(crate) persistence: Addr<PersistenceActor>,
    pub(crate) deliveries: mpsc::UnboundedSender<DeliveryBatch>,
    pub(crate) dead_letters: DeadLetterSink,
}

/// One consumer group's subscription to one topic. See the module docs.
pub(crate) struct GroupActor {
    group: String,
    topic: Arc<str>,
    topic_id: u32,
    queues: Vec<QueueState>,
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
        }
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
        let token = SettleToken::new(m.queue() as u64, m.offset());
        q.in_flight.insert(
            m.offset(),
            InFlight {
                message: m.clone(),
                attempt: 1,
                first_failed_ms: None,
            },
        );
        self.in_flight += 1;
        self.stats.delivered += 1;
        self.outbox.push(RawDelivery {
            message: m,
            attempt: 1,
            token,
        });
    }

    /// Fills the in-flight window from the store, fairly across queues,
    /// then sends what is ready as one batch.
    fn pump(&mut self) {
        self.refresh_ends();
        let n = self.queues.len();
        let mut progress = true;
        while progress && self.in_flight < self.max_in_flight && !self.read_failed {
            progress = false;
            for i in 0..n {
                let qi = (self.rotate + i) % n;
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
                    Ok(msgs) if !msgs.is_empty() => {
                        progress = true;
                        for m in msgs {
                            if m.offset() == self.queues[qi].next {
                                self.take_first(m);
                            }
                        }
                    }
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
        self.flush_outbox();
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
        self.outbox.push(RawDelivery {
            message: f.message.clone(),
            attempt: f.attempt,
            token: SettleToken::new(queue as u64, offset),
        });
        self.flush_outbox();
    }

    fn acked(&mut self, queue: u32, offset: u64, ctx: &mut Context<Self>) {
        let q = &mut self.queues[queue as usize];
        if q.in_flight.remove(&offset).is_some() {
            self.in_flight -= 1;
        }
        q.ack(offset);
        if !self.offsets_timer {
            self.offsets_timer = true;
            ctx.run_later(OFFSETS_EVERY, |act, _| {
                act.offsets_timer = false;
                act.write_offsets();
            });
        }
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

    fn dead_letter(&mut self, queue: u32, offset: u64, reason: String, ctx: &mut Context<Self>) {
        let Some(f) = self.queues[queue as usize].in_flight.get(&offset) else {
            return;
        };
        let m = &f.message;
        let mut reason = reason;
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        error!(group = %self.group, topic = %self.topic, queue, offset, msg_id = %m.id(),
            attempt = f.attempt, %reason, "dead-lettering message");
        let mut out = OutgoingMessage {
            topic: format!("%DLQ%{}", self.group),
            tag: m.tag().map(str::to_string),
            keys: m.keys().to_vec(),
            properties: m.properties().clone(),
            body: m.body().to_vec(),
        };
        let now = now_ms();
        let props = [
            self.topic.to_string(),
            queue.to_string(),
            offset.to_string(),
            m.id().to_string(),
            reason,
            f.attempt.to_string(),
            f.first_failed_ms.unwrap_or(now).to_string(),
            now.to_string(),
        ];
        for (k, v) in DLQ_PROPERTIES.iter().zip(props) {
            out.properties.insert((*k).to_string(), v);
        }
        let fut = (self.dead_letters)(out);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => {
                act.stats.dead_lettered += 1;
                act.acked(queue, offset, ctx);
                act.pump();
            }
            Err(e) => {
                warn!(group = %act.group, queue, offset, error = %e,
                    "storing a dead letter failed; retrying in 5 s");
                ctx.run_later(DLQ_RETRY, move |act, ctx| {
                    act.dead_letter(queue, offset, "dead-letter retry".into(), ctx)
                });
            }
        }));
    }
}

impl Actor for GroupActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        // Positions of a new group are written at once, so a restart starts
        // where this subscription did.
        for q in &mut self.queues {
            q.dirty = true;
        }
        self.write_offsets();
        self.pump();
    }
}

/// A queue's end, learned when the group starts listening.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct HighWater {
    pub(crate) queue: u32,
    pub(crate) end: u64,
}

impl Handler<HighWater> for GroupActor {
    type Result = ();

    fn handle(&mut self, msg: HighWater, _: &mut Context<Self>) {
        let q = &mut self.queues[msg.queue as usize];
        q.end = q.end.max(msg.end);
        self.pump();
    }
}

/// Messages just committed to a queue.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Appended {
    pub(crate) queue: u32,
    pub(crate) messages: Arc<[Arc<BusMessage>]>,
}

impl Handler<Appended> for GroupActor {
    type Result = ();

    fn handle(&mut self, msg: Appended, _: &mut Context<Self>) {
        let Some(last) = msg.messages.last() else {
            return;
        };
        let qi = msg.queue as usize;
        let q = &mut self.queues[qi];
        q.end = q.end.max(last.offset() + 1);
        // Caught up: take the pushed messages directly (the tail), no read.
        let first = msg.messages[0].offset();
        if q.next >= first {
            let skip = (q.next - first) as usize;
            let span_end = q.committed + self.max_span;
            for m in msg.messages.iter().skip(skip) {
                if self.in_flight >= self.max_in_flight || m.offset() >= span_end {
                    break;
                }
                self.take_first(m.clone());
            }
        }
        self.pump();
    }
}

/// Settlements from the subscriber.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Settle(pub(crate) Vec<(SettleToken, Settlement)>);

impl Handler<Settle> for GroupActor {
    type Result = ();

    fn handle(&mut self, msg: Settle, ctx: &mut Context<Self>) {
        for (token, settlement) in msg.0 {
            let (queue, offset) = token.parts();
            let queue = queue as u32;
            if queue as usize >= self.queues.len()
                || !self.queues[queue as usize].in_flight.contains_key(&offset)
            {
                continue;
            }
            match settlement {
                Settlement::Ack => {
                    self.stats.acked += 1;
                    self.acked(queue, offset, ctx);
                }
                Settlement::Nack { delay } => {
                    self.stats.retried += 1;
                    if let Some(f) = self.queues[queue as usize].in_flight.get_mut(&offset) {
                        f.first_failed_ms.get_or_insert_with(now_ms);
                    }
                    ctx.run_later(delay, move |act, _| act.redeliver(queue, offset));
                }
                Settlement::DeadLetter { reason } => {
                    self.dead_letter(queue, offset, reason, ctx);
                }
            }
        }
        self.pump();
    }
}

/// The group's positions and counters.
#[derive(Message)]
#[rtype(result = "(Vec<QueuePosition>, GroupStats)")]
pub(crate) struct Inspect;

impl Handler<Inspect> for GroupActor {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> Self::Result {
        self.refresh_ends();
        let positions = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueuePosition {
                queue: i as u32,
                committed: q.committed,
                max: q.end,
                lag: q
                    .end
                    .saturating_sub(q.committed)
                    .saturating_sub(q.acked_above.len() as u64),
            })
            .collect();
        let mut stats = self.stats;
        stats.in_flight = self.in_flight as u64;
        MessageResult((positions, stats))
    }
}

/// Writes positions, closes the delivery stream and stops.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StopGroup;

impl Handler<StopGroup> for GroupActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopGroup, _: &mut Context<Self>) -> Self::Result {
        self.tx = None;
        let entries = self.dirty_offsets();
        let write = self.persistence.send(CommitOffsets {
            group: self.group.clone(),
            entries,
            now: true,
        });
        Box::pin(write.into_actor(self).map(|_, _, ctx| ctx.stop()))
    }
}
