//! A consumer group's subscription: one fetch loop per queue over the
//! group's durable pull consumer of that queue, one settlement task, one
//! keep-alive task.
//!
//! Backpressure: a loop fetches only as many messages as it has free
//! permits (the queue's share of `max_in_flight`); a permit is held by each
//! unsettled delivery. The consumer's `max_ack_pending` is the same number,
//! so the server enforces it too — across every process of the group (for
//! FIFO it is 1: one message of a queue in flight anywhere).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, warn};

use weirmq_bus::{
    now_ms, BrokerSubscription, DeadLetterCopy, DeliveryBatch, Error, GroupStats, Message,
    Ordering, RawDelivery, ResetTo, SettleToken, Settlement, Settler, StartFrom, SubscriptionSpec,
};

use crate::lease::Lease;
use crate::names::*;
use crate::topics::TopicState;
use crate::{nats_err, Inner};

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
        let _ = self.stop_tx.send(true);
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
        let w = self.fifo[queue as usize]
            .lock()
            .unwrap()
            .retrying
            .remove(&seq);
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

/// The consumer's `max_ack_pending`: the queue's share of the
/// subscription's in-flight limit (for FIFO it also bounds the messages
/// waiting behind a busy message group).
fn per_queue_limit(spec: &SubscriptionSpec, queues: u32) -> usize {
    (spec.max_in_flight / queues.max(1) as usize).max(1)
}

fn consumer_config(
    group: &str,
    topic: &str,
    queue: u32,
    ack_wait: Duration,
    max_ack_pending: usize,
    deliver_policy: consumer::DeliverPolicy,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(consumer_name(group, queue)),
        description: Some(format!("weirmq group={group} topic={topic} queue={queue}")),
        filter_subject: queue_filter(topic, queue),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: max_ack_pending as i64,
        // The retry policy above the seam decides when to give up.
        max_deliver: -1,
        deliver_policy,
        ..Default::default()
    }
}

async fn ensure_consumer(
    inner: &Inner,
    stream: &jetstream::stream::Stream,
    spec: &SubscriptionSpec,
    queue: u32,
    limit: usize,
) -> Result<consumer::Consumer<consumer::pull::Config>, Error> {
    let name = consumer_name(&spec.group, queue);
    if let Ok(c) = stream.get_consumer::<consumer::pull::Config>(&name).await {
        let have = &c.cached_info().config;
        if have.max_ack_pending != limit as i64 || have.ack_wait != inner.ack_wait {
            let cfg = consumer_config(
                &spec.group,
                &spec.topic,
                queue,
                inner.ack_wait,
                limit,
                have.deliver_policy,
            );
            if let Err(e) = stream.update_consumer(cfg).await {
                warn!(group = %spec.group, queue, error = %e,
                    "could not update the consumer's limits; using it as it is");
            }
        }
        return Ok(c);
    }
    let policy = match spec.start {
        StartFrom::Latest => consumer::DeliverPolicy::New,
        StartFrom::Earliest => consumer::DeliverPolicy::All,
    };
    let cfg = consumer_config(
        &spec.group,
        &spec.topic,
        queue,
        inner.ack_wait,
        limit,
        policy,
    );
    match stream.create_consumer(cfg).await {
        Ok(c) => Ok(c),
        // Created by another process meanwhile.
        Err(e) => stream
            .get_consumer::<consumer::pull::Config>(&name)
            .await
            .map_err(|_| nats_err(format!("creating consumer {name}"), e)),
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
    let stream = inner.stream(&topic_stream(&spec.topic)).await?;
    let mut consumers = Vec::with_capacity(queues as usize);
    for q in 0..queues {
        consumers.push(ensure_consumer(&inner, &stream, &spec, q, limit).await?);
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
    });
    let mut pumps = Vec::new();
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

#[allow(clippy::too_many_arguments)]
async fn pump(
    inner: Arc<Inner>,
    st: Arc<SubState>,
    queue: u32,
    consumer: consumer::Consumer<consumer::pull::Config>,
    stream: jetstream::stream::Stream,
    tx: mpsc::UnboundedSender<DeliveryBatch>,
    room: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let name = consumer_name(&st.spec.group, queue);
    let topic: Arc<str> = Arc::from(st.spec.topic.as_str());
    let mine = group_target(&st.spec.group);
    let mut consumer = Some(consumer);
    while !*stop.borrow() {
        let c = match consumer.take() {
            Some(c) => c,
            None => match stream.get_consumer::<consumer::pull::Config>(&name).await {
                Ok(c) => c,
                Err(e) => {
                    debug!(consumer = %name, error = %e, "consumer not available; retrying");
                    let _ = tokio::time::timeout(Duration::from_millis(200), stop.changed()).await;
                    continue;
                }
            },
        };
        let fifo = !st.fifo.is_empty();
        let mut permits: Vec<Option<OwnedSemaphorePermit>> = Vec::new();
        if fifo {
            // One process at a time owns a FIFO queue. The server's
            // max_ack_pending bounds what it holds (in flight, retrying,
            // waiting behind a busy message group); no client permits, so
            // a retry coming back always finds a fetch waiting for it.
            let owned = st.leases[queue as usize].lock().await.ensure().await;
            match owned {
                Ok(true) => {}
                Ok(false) => {
                    let _ = tokio::time::timeout(LEASE_POLL, stop.changed()).await;
                    consumer = Some(c);
                    continue;
                }
                Err(()) => {
                    // Lost it (renewal failed): stop handing out this
                    // queue's messages; give back those waiting.
                    let mut held = st.fifo[queue as usize].lock().unwrap().drain_held();
                    held.sort_by_key(|w| w.seq);
                    for w in held {
                        let _ = w.msg.ack_with(AckKind::Nak(None)).await;
                    }
                    consumer = Some(c);
                    continue;
                }
            }
            permits.resize_with(per_queue_limit(&st.spec, st.fifo.len() as u32), || None);
        } else {
            let first = tokio::select! {
                p = room.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stop.changed() => break,
            };
            permits.push(Some(first));
            while permits.len() < MAX_FETCH {
                match room.clone().try_acquire_owned() {
                    Ok(p) => permits.push(Some(p)),
                    Err(_) => break,
                }
            }
        }
        let batch = c
            .batch()
            .max_messages(permits.len())
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut msgs = match batch {
            Ok(m) => m,
            Err(e) => {
                warn!(consumer = %name, error = %e, "fetch failed; retrying");
                let _ = tokio::time::timeout(Duration::from_millis(200), stop.changed()).await;
                continue;
            }
        };
        let mut healthy = true;
        'batch: while let Some(next) = msgs.next().await {
            let mut out = Vec::new();
            let mut next = Some(next);
            while let Some(item) = next.take() {
                match item {
                    Ok(m) => {
                        let Some(permit) = permits.pop() else {
                            // More than asked for (cannot happen): give it back.
                            let _ = m.ack_with(AckKind::Nak(None)).await;
                            continue;
                        };
                        let stopping = *stop.borrow();
                        if let Some(d) =
                            accept(&inner, &st, queue, &topic, &mine, m, permit, stopping).await
                        {
                            out.push(d);
                        }
                    }
                    Err(e) => {
                        debug!(consumer = %name, error = %e, "fetch ended");
                        healthy = false;
                        if !out.is_empty() && tx.send(std::mem::take(&mut out)).is_err() {
                            return;
                        }
                        break 'batch;
                    }
                }
                // Whatever else has arrived goes in the same batch.
                next = msgs.next().now_or_never().flatten();
            }
            if !out.is_empty() && tx.send(out).is_err() {
                return;
            }
        }
        if healthy {
            consumer = Some(c);
        } else {
            let _ = tokio::time::timeout(Duration::from_millis(100), stop.changed()).await;
        }
    }
}

/// Takes one fetched message: skips what is not for this group, filters,
/// and turns the rest into a delivery holding `permit`.
#[allow(clippy::too_many_arguments)]
async fn accept(
    inner: &Inner,
    st: &SubState,
    queue: u32,
    topic: &Arc<str>,
    mine: &str,
    m: jetstream::Message,
    permit: Option<OwnedSemaphorePermit>,
    stopping: bool,
) -> Option<RawDelivery> {
    let (seq, delivered) = match m.info() {
        Ok(i) => (i.stream_sequence, i.delivered.max(1) as u32),
        Err(e) => {
            warn!(error = %e, "a fetched message has no JetStream metadata; ignoring it");
            return None;
        }
    };
    let target = parse_queue_subject(&m.subject)
        .map(|(_, t)| t.to_string())
        .unwrap_or_else(|| ALL_GROUPS.to_string());
    if target != ALL_GROUPS && target != mine {
        // A resend meant for another group.
        let _ = m.ack().await;
        return None;
    }
    if stopping {
        let _ = m.ack_with(AckKind::Nak(None)).await;
        return None;
    }
    let message = match Message::decode_envelope(topic.clone(), queue, seq, &m.payload) {
        Ok((message, _)) => message,
        Err(e) => {
            error!(topic = %topic, queue, seq, error = %e,
                "a message in the topic's stream is not a weirmq envelope; dead-lettering it");
            let now = now_ms();
            let dl = DeadLetterCopy {
                origin_topic: st.spec.topic.clone(),
                origin_queue: queue,
                origin_offset: seq,
                origin_id: None,
                reason: format!("not a weirmq message: {e}"),
                attempts: delivered,
                first_failed_ms: now,
                dead_lettered_ms: now,
            }
            .of_bytes(&st.spec.group, m.payload.to_vec());
            match inner.store_dead_letter(&st.spec.group, dl).await {
                Ok(()) => {
                    st.counters
                        .dead_lettered
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    let _ = m.ack_with(AckKind::Term).await;
                }
                Err(e) => {
                    warn!(error = %e, "could not dead-letter an undecodable message; retrying later");
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
            return None;
        }
    };
    if !st.spec.filter.matches(&message) {
        st.counters.filtered.fetch_add(1, AtomicOrdering::Relaxed);
        let _ = m.ack().await;
        return None;
    }
    if let Some(mut f) = st.failures.get_mut(&seq) {
        if f.1 {
            f.1 = false;
            st.counters
                .scheduled_retries
                .fetch_sub(1, AtomicOrdering::Relaxed);
        }
    }
    let w = Waiting {
        msg: m,
        message,
        attempt: delivered,
        seq,
    };
    if st.fifo.is_empty() {
        Some(st.hand_out(queue, w, None, permit))
    } else {
        st.fifo_admit(queue, w)
    }
}

async fn settle_loop(
    inner: Arc<Inner>,
    st: Arc<SubState>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    while let Some(cmd) = commands.recv().await {
        match cmd {
            Command::Settle(batch) => {
                for (token, s) in batch {
                    let Some((_, e)) = st.inflight.remove(&token.parts().0) else {
                        continue;
                    };
                    settle_one(&inner, &st, e, s).await;
                }
            }
            Command::Stop(done) => {
                // Everything still held goes back, oldest first (for FIFO
                // the next owner gets each group's messages in order).
                let mut left: Vec<(u64, jetstream::Message)> = Vec::new();
                let tokens: Vec<u64> = st.inflight.iter().map(|e| *e.key()).collect();
                for t in tokens {
                    if let Some((_, e)) = st.inflight.remove(&t) {
                        left.push((e.seq, e.msg));
                    }
                }
                for f in &st.fifo {
                    let held = f.lock().unwrap().drain_held();
                    left.extend(held.into_iter().map(|w| (w.seq, w.msg)));
                }
                left.sort_by_key(|(seq, _)| *seq);
                for (_, m) in left {
                    let _ = m.ack_with(AckKind::Nak(None)).await;
                }
                let _ = inner.client.flush().await;
                let _ = done.send(());
                return;
            }
        }
    }
}

async fn settle_one(inner: &Inner, st: &Arc<SubState>, e: Entry, s: Settlement) {
    let c = &st.counters;
    match s {
        Settlement::Ack => {
            if let Err(err) = e.msg.ack().await {
                warn!(error = %err, "ack not sent; the message will be redelivered");
            }
            st.failures.remove(&e.seq);
            c.acked.fetch_add(1, AtomicOrdering::Relaxed);
            if let Some(key) = &e.fifo_key {
                st.fifo_release(e.queue, key, e.seq);
            }
        }
        Settlement::Nack { delay, .. } if e.fifo_key.is_some() => {
            // FIFO retries in place, here: the message stays unacked (kept
            // alive) and comes back after its delay with the next attempt.
            // Were it nak'ed, a takeover could see later messages of its
            // group before the server redelivers it.
            st.failures.entry(e.seq).or_insert((now_ms(), false));
            c.retried.fetch_add(1, AtomicOrdering::Relaxed);
            c.scheduled_retries.fetch_add(1, AtomicOrdering::Relaxed);
            let (queue, seq) = (e.queue, e.seq);
            st.fifo[queue as usize].lock().unwrap().retrying.insert(
                seq,
                Waiting {
                    msg: e.msg,
                    message: (*e.message).clone(),
                    attempt: e.attempt + 1,
                    seq,
                },
            );
            let st = st.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                st.fifo_retry(queue, seq);
            });
        }
        Settlement::Nack { delay, .. } => {
            let kind = if delay.is_zero() {
                AckKind::Nak(None)
            } else {
                AckKind::Nak(Some(delay))
            };
            if let Err(err) = e.msg.ack_with(kind).await {
                warn!(error = %err, "nak not sent; the message comes back after the ack wait");
            }
            st.failures.entry(e.seq).or_insert((now_ms(), false)).1 = true;
            c.retried.fetch_add(1, AtomicOrdering::Relaxed);
            c.scheduled_retries.fetch_add(1, AtomicOrdering::Relaxed);
        }
        Settlement::DeadLetter { reason } => {
            let m = &e.message;
            let now = now_ms();
            let first = st.failures.remove(&e.seq).map_or(now, |(_, f)| f.0);
            let dl = DeadLetterCopy {
                origin_topic: st.spec.topic.clone(),
                origin_queue: m.queue(),
                origin_offset: m.offset(),
                origin_id: Some(m.id()),
                reason,
                attempts: e.attempt,
                first_failed_ms: first,
                dead_lettered_ms: now,
            }
            .of(&st.spec.group, m);
            match inner.store_dead_letter(&st.spec.group, dl).await {
                Ok(()) => {
                    let _ = e.msg.ack_with(AckKind::Term).await;
                    c.dead_lettered.fetch_add(1, AtomicOrdering::Relaxed);
                    if let Some(key) = &e.fifo_key {
                        st.fifo_release(e.queue, key, e.seq);
                    }
                }
                Err(err) => {
                    error!(error = %err, msg_id = %m.id(),
                        "could not store the dead letter; the message will be delivered again");
                    let _ = e
                        .msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
    }
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

/// Moves `group`'s consumers of every queue of `topic` to `to` by
/// recreating them (JetStream cannot move a durable consumer's start); a
/// running subscription's fetch loops pick the new ones up.
pub(crate) async fn reset(
    inner: &Inner,
    group: &str,
    topic: &TopicState,
    to: ResetTo,
    running: Option<&SubState>,
) -> Result<(), Error> {
    let name = topic.config.name();
    let stream = inner.stream(&topic_stream(name)).await?;
    let policy = match to {
        ResetTo::Earliest => consumer::DeliverPolicy::All,
        ResetTo::Latest => consumer::DeliverPolicy::New,
        ResetTo::Time(t) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from(t),
        },
    };
    if let Some(s) = running {
        // FIFO: what was held from the old consumers is forgotten before
        // the new ones deliver (it comes again from them).
        for f in &s.fifo {
            f.lock().unwrap().drain_held();
        }
    }
    for q in 0..topic.config.queue_count() {
        let cname = consumer_name(group, q);
        let limit = match stream.get_consumer::<consumer::pull::Config>(&cname).await {
            Ok(c) => c.cached_info().config.max_ack_pending.max(1) as usize,
            Err(_) => running.map_or(16, |s| per_queue_limit(&s.spec, topic.config.queue_count())),
        };
        let _ = stream.delete_consumer(&cname).await;
        let cfg = consumer_config(group, name, q, inner.ack_wait, limit, policy);
        stream
            .create_consumer(cfg)
            .await
            .map_err(|e| nats_err(format!("recreating consumer {cname}"), e))?;
    }
    if let Some(s) = running {
        // Deliveries from the old consumers finish; their settlements go
        // nowhere. Forget their retry bookkeeping.
        s.failures.clear();
        s.counters
            .scheduled_retries
            .store(0, AtomicOrdering::Relaxed);
    }
    Ok(())
}
