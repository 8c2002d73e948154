//! `TopicActor` and `QueueActor`: the publish path up to the store.
//!
//! A [`TopicActor`] picks a queue per message (round-robin) and hands each
//! queue its share of a publish as one message. A [`QueueActor`] owns its
//! queue's offset counter: it places messages at consecutive offsets, hands
//! them to the persistence actor as one [`Append`], and once the commit is
//! reported, advances the queue's end and pushes the committed messages (by
//! `Arc`, never copied) to every consumer group listening.
//!
//! Both live on the broker arbiter; hops between them cost ~60 ns.
//!
//! # Failure
//!
//! A failed commit fails every publish in it; the persistence actor then
//! refuses all further appends (fail-stop), so the offsets given to a failed
//! commit never become a hole in front of later messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::trace;
use weirmq_bus::{Durability, Error, Message as BusMessage, SendReceipt};
use weirmq_persistence::{Append, PersistenceActor, QueueKey};

use super::group::{Appended, GroupActor, HighWater};

/// Gathers the receipts of one publish across queues and answers the
/// publisher once, from the persistence thread, when all parts are stored.
#[derive(Debug)]
pub(crate) struct Collector {
    state: Mutex<CollectorState>,
}

#[derive(Debug)]
struct CollectorState {
    receipts: Vec<Option<SendReceipt>>,
    remaining: usize,
    reply: Option<oneshot::Sender<Result<Vec<SendReceipt>, Error>>>,
}

impl Collector {
    pub(crate) fn new(
        n: usize,
        reply: oneshot::Sender<Result<Vec<SendReceipt>, Error>>,
    ) -> Arc<Collector> {
        Arc::new(Collector {
            state: Mutex::new(CollectorState {
                receipts: vec![None; n],
                remaining: n,
                reply: Some(reply),
            }),
        })
    }

    fn fill(&self, receipts: Vec<(usize, SendReceipt)>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.remaining -= receipts.len();
        for (i, r) in receipts {
            s.receipts[i] = Some(r);
        }
        if s.remaining == 0 {
            if let Some(tx) = s.reply.take() {
                let all = std::mem::take(&mut s.receipts)
                    .into_iter()
                    .flatten()
                    .collect();
                let _ = tx.send(Ok(all));
            }
        }
    }

    pub(crate) fn fail(&self, e: Error) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = s.reply.take() {
            let _ = tx.send(Err(e));
        }
    }
}

/// One publish call's messages for one topic: (index in the publish,
/// message), with where to report.
#[derive(Debug)]
pub(crate) struct PublishPart {
    pub(crate) messages: Vec<(usize, BusMessage)>,
    pub(crate) durability: Durability,
    pub(crate) collector: Arc<Collector>,
    /// Application state written atomically with these messages (the local
    /// outbox); empty for plain publishes.
    pub(crate) state: Vec<weirmq_bus::StateOp>,
}

/// The publishes to one topic gathered since the last send: concurrent
/// publishers share one cross-thread message (see `EmbeddedBroker::publish_to`).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct TopicPublish {
    pub(crate) parts: Vec<PublishPart>,
}

/// Picks queues for a topic's messages: round robin, or by message group
/// for ordered messages.
pub(crate) struct TopicActor {
    queues: Vec<Addr<QueueActor>>,
    next: usize,
}

impl TopicActor {
    pub(crate) fn new(queues: Vec<Addr<QueueActor>>) -> Self {
        TopicActor { queues, next: 0 }
    }
}

impl Actor for TopicActor {
    type Context = Context<Self>;
}

impl Handler<TopicPublish> for TopicActor {
    type Result = ();

    fn handle(&mut self, msg: TopicPublish, _: &mut Context<Self>) {
        let n = self.queues.len();
        let mut per_queue: Vec<Vec<PublishPart>> = (0..n).map(|_| Vec::new()).collect();
        for mut part in msg.parts {
            let mut split: Vec<Vec<(usize, BusMessage)>> = (0..n).map(|_| Vec::new()).collect();
            for m in part.messages {
                // Ordered messages: one queue per message group, stably.
                let q = match m.1.message_group() {
                    Some(g) => weirmq_bus::queue_for_message_group(g, n as u32) as usize,
                    None => {
                        let q = self.next % n;
                        self.next = self.next.wrapping_add(1);
                        q
                    }
                };
                split[q].push(m);
            }
            for (q, messages) in split.into_iter().enumerate() {
                if !messages.is_empty() {
                    per_queue[q].push(PublishPart {
                        messages,
                        durability: part.durability,
                        collector: part.collector.clone(),
                        // With the first queue's share: one transaction.
                        state: std::mem::take(&mut part.state),
                    });
                }
            }
        }
        for (q, parts) in per_queue.into_iter().enumerate() {
            if !parts.is_empty() {
                self.queues[q].do_send(QueueAppend { parts });
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct QueueAppend {
    parts: Vec<PublishPart>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Committed {
    messages: Arc<[Arc<BusMessage>]>,
}

/// Registers a consumer group for pushes of committed messages; the queue
/// answers with its current end so the group knows what to read back.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Listen {
    pub(crate) id: u64,
    pub(crate) group: Addr<GroupActor>,
}

/// Removes a listener.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Unlisten {
    pub(crate) id: u64,
}

/// One queue of a topic.
pub(crate) struct QueueActor {
    key: QueueKey,
    next_offset: u64,
    end: Arc<AtomicU64>,
    persistence: Addr<PersistenceActor>,
    listeners: HashMap<u64, Addr<GroupActor>>,
    /// The topic's trace switch.
    trace: Arc<AtomicBool>,
}

impl QueueActor {
    pub(crate) fn new(
        key: QueueKey,
        end: Arc<AtomicU64>,
        persistence: Addr<PersistenceActor>,
        trace: Arc<AtomicBool>,
    ) -> Self {
        QueueActor {
            key,
            next_offset: end.load(Ordering::Acquire),
            end,
            persistence,
            listeners: HashMap::new(),
            trace,
        }
    }
}

impl Actor for QueueActor {
    type Context = Context<Self>;
}

impl Handler<QueueAppend> for QueueActor {
    type Result = ();

    /// All parts become one `Append` (one record, one commit callback, one
    /// `Committed`), synced if any part asked for `Flushed`.
    fn handle(&mut self, msg: QueueAppend, ctx: &mut Context<Self>) {
        let queue = self.key.queue;
        let mut durability = Durability::Buffered;
        let mut stored = Vec::new();
        let mut reports = Vec::with_capacity(msg.parts.len());
        let mut state = Vec::new();
        for part in msg.parts {
            state.extend(part.state);
            if part.durability == Durability::Flushed {
                durability = Durability::Flushed;
            }
            let mut receipts = Vec::with_capacity(part.messages.len());
            for (i, m) in part.messages {
                let m = m.with_position(queue, self.next_offset);
                receipts.push((
                    i,
                    SendReceipt {
                        message_id: m.id(),
                        queue,
                        offset: self.next_offset,
                        // A delayed message waiting in the schedule topic.
                        deliver_at: m.destination().and(m.deliver_at()),
                    },
                ));
                self.next_offset += 1;
                stored.push(Arc::new(m));
            }
            reports.push((part.collector, receipts));
        }
        let committed: Arc<[Arc<BusMessage>]> = stored.clone().into();
        let me = ctx.address();
        let end = self.end.clone();
        let new_end = self.next_offset;
        self.persistence.do_send(Append {
            key: self.key,
            messages: stored,
            durability,
            trace: self.trace.load(Ordering::Relaxed),
            state,
            done: Box::new(move |result| match result {
                Ok(()) => {
                    // Before the publishers hear of it: a group subscribing
                    // "from latest" after this publish must start past it.
                    end.fetch_max(new_end, Ordering::AcqRel);
                    for (collector, receipts) in reports {
                        collector.fill(receipts);
                    }
                    me.do_send(Committed {
                        messages: committed,
                    });
                }
                Err(e) => {
                    for (collector, _) in reports {
                        collector.fail(Error::from(e.clone()));
                    }
                }
            }),
        });
    }
}

impl Handler<Committed> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: Committed, _: &mut Context<Self>) {
        let Some(last) = msg.messages.last() else {
            return;
        };
        let end = last.offset() + 1;
        self.end.fetch_max(end, Ordering::AcqRel);
        trace!(
            topic_id = self.key.topic_id,
            queue = self.key.queue,
            end,
            "committed"
        );
        self.listeners.retain(|_, g| g.connected());
        for g in self.listeners.values() {
            g.do_send(Appended {
                queue: self.key.queue,
                messages: msg.messages.clone(),
            });
        }
    }
}

impl Handler<Listen> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: Listen, _: &mut Context<Self>) {
        msg.group.do_send(HighWater {
            queue: self.key.queue,
            end: self.end.load(Ordering::Acquire),
        });
        self.listeners.insert(msg.id, msg.group);
    }
}

impl Handler<Unlisten> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: Unlisten, _: &mut Context<Self>) {
        self.listeners.remove(&msg.id);
    }
}
