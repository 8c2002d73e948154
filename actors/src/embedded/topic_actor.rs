//! `TopicActor`: the publish path from the publishers to the queues.
//!
//! A [`TopicActor`] picks a queue per message (round-robin, by message
//! group, or its priority lane) and hands each queue its share of a publish as one
//! [`QueueAppend`]. The [`QueueActor`](super::queue_actor::QueueActor) owns its
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

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::sync::oneshot;
use weirmq_bus::{Durability, Error, Message as BusMessage, SendReceipt};

use super::queue_actor::{QueueActor, QueueAppend};

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

    pub(crate) fn fill(&self, receipts: Vec<(usize, SendReceipt)>) {
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

/// Picks queues for a topic's messages: by message group for ordered
/// messages, the priority lane for a priority above 0, else round robin.
pub(crate) struct TopicActor {
    /// The topic's queues, then its priority lanes.
    queues: Vec<Addr<QueueActor>>,
    /// How many of them are the topic's own (the rest are lanes).
    base: u32,
    /// Whether priorities pick lanes: not in system topics, whose staged
    /// messages are found by their place in queue 0 (the schedule, half
    /// messages) or kept in order of death (dead letters).
    lanes: bool,
    next: usize,
}

impl TopicActor {
    pub(crate) fn new(queues: Vec<Addr<QueueActor>>, base: u32, lanes: bool) -> Self {
        TopicActor {
            queues,
            base,
            lanes,
            next: 0,
        }
    }
}

impl Actor for TopicActor {
    type Context = Context<Self>;
}

impl Handler<TopicPublish> for TopicActor {
    type Result = ();

    fn handle(&mut self, msg: TopicPublish, _: &mut Context<Self>) {
        let (n, base) = (self.queues.len(), self.base as usize);
        let mut per_queue: Vec<Vec<PublishPart>> = (0..n).map(|_| Vec::new()).collect();
        for mut part in msg.parts {
            let mut split: Vec<Vec<(usize, BusMessage)>> = (0..n).map(|_| Vec::new()).collect();
            for m in part.messages {
                // Ordered messages: one queue per message group, stably,
                // whatever their priority.
                let lane = match self.lanes {
                    true => weirmq_bus::priority_queue(self.base, m.1.priority()),
                    false => None,
                };
                let q = match (m.1.message_group(), lane) {
                    (Some(g), _) => weirmq_bus::queue_for_message_group(g, self.base) as usize,
                    (None, Some(lane)) => lane as usize,
                    (None, None) => {
                        let q = self.next % base;
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
