//! A consumer group's subscription: one fetch loop per queue over the
//! group's durable pull consumer of that queue, one settlement task, one
//! keep-alive task.
//!
//! Backpressure: a loop fetches only as many messages as it has free
//! permits (the queue's share of `max_in_flight`); a permit is held by each
//! unsettled delivery. The consumer is shared by every process of the
//! group, so its `max_ack_pending` leaves room for 16 processes' shares
//! (`consumers::GROUP_SHARES`): a process that dies holding its share
//! stops no one else while the ack wait runs out.
//!
//! FIFO: one process at a time holds a queue's lease (`crate::lease`) and
//! fetches it; it hands out one message per message group at a time and
//! keeps the others of that group waiting behind it in memory (bounded by
//! the same `max_ack_pending`), retrying a failed one in place; different
//! message groups of a queue run in parallel. The group's live processes
//! (heartbeats, `crate::lease::Membership`) share its queues round-robin: a
//! process that is no longer assigned a queue it holds hands it over — it
//! stops handing out the queue's messages, waits until those in handlers
//! are settled, gives the held ones back oldest first, and releases the
//! lease for the assigned process to take (`fetch::hand_over`).
//!
//! Files: `fetch.rs` (the loops and accepting a message), `settle.rs`
//! (settlement), `consumers.rs` (the consumers' configuration and resets);
//! this file holds the subscription's shared state and its start.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use weirmq_bus::{
    now_ms, BrokerSubscription, DeadLetterCopy, DeliveryBatch, Error, GroupStats, Message,
    Ordering, RawDelivery, ResetTo, SettleToken, Settlement, Settler, StartFrom, SubscriptionSpec,
};

use crate::lease::{assigned, Lease, Membership, MEMBER_HEARTBEAT};
use crate::names::*;
use crate::topics::TopicState;
use crate::{nats_err, Inner, Pull};

mod consumers;
mod fetch;
mod settle;

pub(crate) use consumers::reset;
use consumers::{ensure_consumer, per_queue_limit, server_ack_pending};
use fetch::pump;
use settle::settle_loop;

/// A FIFO queue's lease outlives the ack wait by this much, so a dead
/// owner's unacked messages are back on the server before another process
/// takes the queue.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

static NEXT_OWNER: AtomicU64 = AtomicU64::new(0);

/// The most messages one fetch asks for.
const MAX_FETCH: usize = 256;

/// How long one fetch waits for messages before asking again.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// How often a process without a FIFO queue's lease tries to take it.
const LEASE_POLL: Duration = Duration::from_millis(500);

struct Entry {
    msg: jetstream::Message,
    message: Arc<Message>,
    attempt: u32,
    seq: u64,
    queue: u32,
    /// FIFO: the message group (`""` for none) whose turn this is.
    fifo_key: Option<String>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// A FIFO message fetched while its message group is busy: it waits here,
/// unacked (the server's `max_ack_pending` bounds how many).
struct Waiting {
    msg: jetstream::Message,
    message: Message,
    attempt: u32,
    seq: u64,
}

/// FIFO bookkeeping of one queue: which message of each message group is
/// in flight (or waiting for its retry), and what waits behind it.
#[derive(Default)]
struct FifoQueue {
    busy: HashMap<String, u64>,
    waiting: HashMap<String, VecDeque<Waiting>>,
    /// Failed messages waiting out their retry delay here, by sequence.
    retrying: HashMap<u64, Waiting>,
    /// Being handed over to another process: nothing more is handed out.
    releasing: bool,
}

impl FifoQueue {
    /// Everything held but not in a handler: given back when the queue is
    /// let go.
    fn drain_held(&mut self) -> Vec<Waiting> {
        self.busy.clear();
        let mut held: Vec<Waiting> = self.waiting.drain().flat_map(|(_, q)| q).collect();
        held.extend(self.retrying.drain().map(|(_, w)| w));
        held
    }
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    scheduled_retries: AtomicU64,
    filtered: AtomicU64,
}

enum Command {
    Settle(Vec<(SettleToken, Settlement)>),
    /// FIFO: give back what is held of a queue being handed over (none of
    /// its deliveries is in a handler any more).
    HandOver(u32, oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// A running subscription's state.
pub(crate) struct SubState {
    spec: SubscriptionSpec,
    inflight: DashMap<u64, Entry>,
    next_token: AtomicU64,
    counters: Counters,
    /// Stream sequences nacked and not yet redelivered, with when they
    /// first failed.
    failures: DashMap<u64, (u64, bool)>,
    stop_tx: watch::Sender<bool>,
    pumps: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    commands: mpsc::UnboundedSender<Command>,
    /// Where deliveries go (the settlement task releases FIFO successors).
    tx: mpsc::UnboundedSender<DeliveryBatch>,
    /// FIFO: per queue (empty for a concurrent subscription).
    fifo: Vec<Mutex<FifoQueue>>,
    /// FIFO: per queue, this process's lease on it.
    leases: Vec<tokio::sync::Mutex<Lease>>,
    /// FIFO: this subscription as a member of its group.
    membership: Option<Membership>,
    /// FIFO: per queue, whether the group's live members assign it here.
    mine: Vec<std::sync::atomic::AtomicBool>,
}

impl SubState {
    pub(crate) fn stats(&self) -> GroupStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(AtomicOrdering::Relaxed);
        GroupStats {
            delivered: load(&c.delivered),
            acked: load(&c.acked),
            retried: load(&c.retried),
            dead_lettered: load(&c.dead_lettered),
            in_flight: self.inflight.len() as u64,
            scheduled_retries: load(&c.scheduled_retries),
            filtered: load(&c.filtered),
            // Retention removes messages on the server; a consumer never
            // sees what it did not get.
            expired: 0,
        }
    }

    /// Stops fetching, settles what was already settled, and gives every
    /// delivery still unsettled back to the server at once (the next
    /// subscription of the group gets it).
    pub(crate) async fn stop(&self) {
        // Set even when no pump holds a receiver (any started later sees it).
        self.stop_tx.send_replace(true);
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap());
        for p in pumps {
            let _ = p.await;
        }
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
        // Only now, with every held message handed back, may another
        // process take the FIFO queues.
        for l in &self.leases {
            l.lock().await.release().await;
        }
        if let Some(m) = &self.membership {
            m.leave().await;
        }
    }

    /// FIFO: whether the group's live members assign `queue` to this
    /// process.
    fn is_mine(&self, queue: u32) -> bool {
        self.mine
            .get(queue as usize)
            .is_none_or(|m| m.load(AtomicOrdering::Relaxed))
    }

    /// FIFO: records which queues the live `members` assign here.
    fn assign(&self, members: &[String]) {
        let Some(me) = &self.membership else {
            return;
        };
        for (q, m) in self.mine.iter().enumerate() {
            m.store(
                assigned(members, me.owner(), q as u32),
                AtomicOrdering::Relaxed,
            );
        }
    }

    /// A FIFO message's turn: deliver it now if its message group is free
    /// (or it is the group's message coming back for a retry), else keep
    /// it waiting behind the group's current one.
    fn fifo_admit(&self, queue: u32, w: Waiting) -> Option<RawDelivery> {
        let key = w.message.message_group().unwrap_or("").to_string();
        let mut f = self.fifo[queue as usize].lock().unwrap();
        match f.busy.get(&key) {
            Some(&seq) if seq != w.seq => {
                let q = f.waiting.entry(key).or_default();
                match q.iter_mut().find(|x| x.seq == w.seq) {
                    // Redelivered after its ack wait: keep the newer handle.
                    Some(x) => *x = w,
                    None => q.push_back(w),
                }
                None
            }
            _ => {
                f.busy.insert(key.clone(), w.seq);
                drop(f);
                Some(self.hand_out(queue, w, Some(key), None))
            }
        }
    }

    /// A FIFO message's retry delay is over: deliver it again (unless the
    /// queue was let go meanwhile).
    fn fifo_retry(&self, queue: u32, seq: u64) {
        let w = {
            let mut f = self.fifo[queue as usize].lock().unwrap();
            if f.releasing {
                // Handed back with the queue instead.
                return;
            }
            f.retrying.remove(&seq)
        };
        if let Some(w) = w {
            self.counters
                .scheduled_retries
                .fetch_sub(1, AtomicOrdering::Relaxed);
            let key = w.message.message_group().unwrap_or("").to_string();
            let d = self.hand_out(queue, w, Some(key), None);
            let _ = self.tx.send(vec![d]);
        }
    }

    /// The message group `key` of `queue` is done with its current message:
    /// the next one waiting, if any, is delivered.
    fn fifo_release(&self, queue: u32, key: &str, seq: u64) {
        let next = {
            let mut f = self.fifo[queue as usize].lock().unwrap();
            if f.busy.get(key) != Some(&seq) {
                // A delivery from before a reset or a lost lease: the
                // group's turn has moved on without it.
                return;
            }
            f.busy.remove(key);
            if f.releasing {
                // The queue is being handed over: the next owner delivers
                // the rest of this message group.
                return;
            }
            let next = f.waiting.get_mut(key).and_then(VecDeque::pop_front);
            if f.waiting.get(key).is_some_and(VecDeque::is_empty) {
                f.waiting.remove(key);
            }
            if let Some(w) = &next {
                f.busy.insert(key.to_string(), w.seq);
            }
            next
        };
        if let Some(w) = next {
            let d = self.hand_out(queue, w, Some(key.to_string()), None);
            let _ = self.tx.send(vec![d]);
        }
    }

    /// Records a delivery as in flight and builds it.
    fn hand_out(
        &self,
        queue: u32,
        w: Waiting,
        fifo_key: Option<String>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> RawDelivery {
        let token = self.next_token.fetch_add(1, AtomicOrdering::Relaxed);
        let message = Arc::new(w.message);
        self.inflight.insert(
            token,
            Entry {
                msg: w.msg,
                message: message.clone(),
                attempt: w.attempt,
                seq: w.seq,
                queue,
                fifo_key,
                _permit: permit,
            },
        );
        self.counters
            .delivered
            .fetch_add(1, AtomicOrdering::Relaxed);
        RawDelivery {
            message,
            attempt: w.attempt,
            token: SettleToken::new(token, queue as u64),
        }
    }
}

#[derive(Debug)]
struct NatsSettler {
    commands: mpsc::UnboundedSender<Command>,
}

impl Settler for NatsSettler {
    fn settle(&self, batch: Vec<(SettleToken, Settlement)>) {
        let _ = self.commands.send(Command::Settle(batch));
    }
}

/// Starts a subscription.
pub(crate) async fn start(
    inner: Arc<Inner>,
    spec: SubscriptionSpec,
    topic: Arc<TopicState>,
) -> Result<(Arc<SubState>, BrokerSubscription), Error> {
    let queues = topic.config.queue_count();
    let limit = per_queue_limit(&spec, queues);
    let server_limit = server_ack_pending(&spec, queues);
    let stream = inner.stream(&topic_stream(&spec.topic)).await?;
    let mut consumers = Vec::with_capacity(queues as usize);
    for q in 0..queues {
        consumers.push(ensure_consumer(&inner, &stream, &spec, q, server_limit).await?);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let fifo = spec.ordering == Ordering::Fifo;
    let spec_group = spec.group.clone();
    // This subscription's name as a lease owner: unique per process and
    // subscription.
    let owner = format!(
        "{}-{}-{}",
        std::process::id(),
        now_ms(),
        NEXT_OWNER.fetch_add(1, AtomicOrdering::Relaxed)
    );
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (tx, deliveries) = mpsc::unbounded_channel();
    let state = Arc::new(SubState {
        spec,
        inflight: DashMap::new(),
        next_token: AtomicU64::new(1),
        counters: Counters::default(),
        failures: DashMap::new(),
        stop_tx,
        pumps: Mutex::new(Vec::new()),
        commands: commands.clone(),
        tx: tx.clone(),
        fifo: match fifo {
            true => (0..queues).map(|_| Mutex::default()).collect(),
            false => Vec::new(),
        },
        leases: match fifo {
            true => (0..queues)
                .map(|q| {
                    tokio::sync::Mutex::new(Lease::new(
                        inner.js.clone(),
                        &spec_group,
                        q,
                        owner.clone(),
                        inner.ack_wait + LEASE_MARGIN,
                    ))
                })
                .collect(),
            false => Vec::new(),
        },
        membership: fifo.then(|| Membership::new(inner.js.clone(), &spec_group, owner.clone())),
        mine: match fifo {
            true => (0..queues)
                .map(|_| std::sync::atomic::AtomicBool::new(true))
                .collect(),
            false => Vec::new(),
        },
    });
    let mut pumps = Vec::new();
    if let Some(m) = &state.membership {
        // Known to the others, and knowing them, before competing for a
        // queue: processes starting together take their own shares.
        m.heartbeat().await;
        if let Some(live) = m.live().await {
            state.assign(&live);
        }
        pumps.push(tokio::spawn(keep_membership(
            state.clone(),
            stop_rx.clone(),
        )));
    }
    for (q, c) in consumers.into_iter().enumerate() {
        pumps.push(tokio::spawn(pump(
            inner.clone(),
            state.clone(),
            q as u32,
            c,
            stream.clone(),
            tx.clone(),
            Arc::new(Semaphore::new(limit)),
            stop_rx.clone(),
        )));
    }
    pumps.push(tokio::spawn(keep_alive(
        inner.ack_wait,
        state.clone(),
        stop_rx,
    )));
    *state.pumps.lock().unwrap() = pumps;
    tokio::spawn(settle_loop(inner, state.clone(), command_rx));
    Ok((
        state,
        BrokerSubscription {
            deliveries,
            settler: Arc::new(NatsSettler { commands }),
        },
    ))
}

/// Tells the server every ack-wait/3 that unsettled deliveries are still
/// being worked on, so a slow handler is not raced by a redelivery.
async fn keep_alive(ack_wait: Duration, st: Arc<SubState>, mut stop: watch::Receiver<bool>) {
    let every = (ack_wait / 3).max(Duration::from_millis(300));
    loop {
        if tokio::time::timeout(every, stop.changed()).await.is_ok() {
            return;
        }
        let mut msgs: Vec<jetstream::Message> =
            st.inflight.iter().map(|e| e.value().msg.clone()).collect();
        for f in &st.fifo {
            let f = f.lock().unwrap();
            msgs.extend(f.waiting.values().flatten().map(|w| w.msg.clone()));
            msgs.extend(f.retrying.values().map(|w| w.msg.clone()));
        }
        for m in msgs {
            let _ = m.ack_with(AckKind::Progress).await;
        }
    }
}

/// FIFO: writes this member's heartbeat and reassigns the queues over the
/// live members, every [`MEMBER_HEARTBEAT`].
async fn keep_membership(st: Arc<SubState>, mut stop: watch::Receiver<bool>) {
    let Some(m) = &st.membership else {
        return;
    };
    loop {
        if tokio::time::timeout(MEMBER_HEARTBEAT, stop.changed())
            .await
            .is_ok()
        {
            return;
        }
        if !m.heartbeat().await {
            debug!(group = %st.spec.group, "member heartbeat not stored; keeping the last view");
            continue;
        }
        if let Some(live) = m.live().await {
            st.assign(&live);
        }
    }
}
