//! `QueueActor`: one queue of a topic, from its share of a publish to the
//! store and on to the listening groups.
//!
//! It owns its queue's offset counter: it places messages at consecutive
//! offsets, hands them to the persistence actor as one [`Append`], and once
//! the commit is reported, advances the queue's end and pushes the
//! committed messages (by `Arc`, never copied) to every consumer group
//! listening. A failed commit fails every publish in it; the persistence
//! actor then refuses all further appends (fail-stop), so the offsets given
//! to a failed commit never become a hole in front of later messages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use tracing::trace;
use weirmq_bus::{Durability, Error, Message as BusMessage, SendReceipt};
use weirmq_persistence::{Append, PersistenceActor, QueueKey};

use super::group_actor::{Appended, GroupActor, HighWater};
use super::topic_actor::PublishPart;

#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct QueueAppend {
    pub(crate) parts: Vec<PublishPart>,
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
    /// By listen id: pushed to in subscription order (the same every run).
    listeners: BTreeMap<u64, Addr<GroupActor>>,
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
            listeners: BTreeMap::new(),
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
