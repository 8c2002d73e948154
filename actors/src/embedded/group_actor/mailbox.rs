//! The group actor's mailbox: the messages it takes (from the queues, the
//! subscriber, the broker's admin calls) and how it handles each.

use super::*;

/// A retry entry was written (or not) to the delay index.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct RetryStored {
    pub(super) held: Held,
    pub(super) entry: RetryEntry,
    pub(super) ok: bool,
    pub(super) delay: Duration,
}

impl Handler<RetryStored> for GroupActor {
    type Result = ();

    fn handle(&mut self, msg: RetryStored, ctx: &mut Context<Self>) {
        self.written();
        match (msg.ok, msg.held) {
            (true, held) => {
                self.release(held, ctx);
                let (due, seq) = (msg.entry.key.due_ms, msg.entry.key.seq);
                self.scheduled.insert(due, seq, msg.entry);
            }
            // Not durable: retry from memory instead (still never lost).
            (false, Held::Original { queue, offset }) => {
                run_later(ctx, &self.clock, msg.delay, move |act, _| {
                    act.redeliver(queue, offset)
                });
            }
            (false, held @ Held::Retry { .. }) => {
                self.release(held, ctx);
                let (due, seq) = (msg.entry.key.due_ms, msg.entry.key.seq);
                self.scheduled.insert(due, seq, msg.entry);
            }
        }
        self.pump(ctx);
    }
}

impl Actor for GroupActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Positions of a new group are written at once, so a restart starts
        // where this subscription did.
        for q in &mut self.queues {
            q.dirty = true;
        }
        self.write_offsets();
        self.pump(ctx);
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

    fn handle(&mut self, msg: HighWater, ctx: &mut Context<Self>) {
        let q = &mut self.queues[msg.queue as usize];
        q.end = q.end.max(msg.end);
        self.pump(ctx);
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

    fn handle(&mut self, msg: Appended, ctx: &mut Context<Self>) {
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
        self.pump(ctx);
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
            let held = Held::of(token);
            let Some((m, attempt, _)) = self.flight(held) else {
                continue; // already settled, or from a previous subscription
            };
            match &settlement {
                Settlement::Ack => self.note(&m, TraceKind::Acked, attempt, None),
                Settlement::Nack { delay, error } => self.note(
                    &m,
                    TraceKind::Retried,
                    attempt,
                    Some(format!("{error} (next attempt in {delay:?})")),
                ),
                // Recorded once the dead letter is stored.
                Settlement::DeadLetter { .. } => {}
            }
            match settlement {
                Settlement::Ack => {
                    self.stats.acked += 1;
                    if let Held::Retry { seq } = held {
                        if let Some(r) = self.retrying.get(&seq) {
                            self.update_retries(Vec::new(), vec![r.entry.key.clone()], |_| {});
                        }
                    }
                    self.release(held, ctx);
                }
                Settlement::Nack { delay, error } => {
                    self.stats.retried += 1;
                    if let Held::Original { queue, offset } = held {
                        if let Some(f) = self.queues[queue as usize].in_flight.get_mut(&offset) {
                            f.first_failed_ms.get_or_insert(self.clock.now_ms());
                        }
                        if self.fifo {
                            // Retried in place: its group waits, the others go on.
                            run_later(ctx, &self.clock, delay, move |act, _| {
                                act.redeliver(queue, offset)
                            });
                            continue;
                        }
                    }
                    self.schedule_retry(held, delay, error, ctx);
                }
                Settlement::DeadLetter { reason } => {
                    self.dead_letter(held, reason, ctx);
                }
            }
        }
        self.pump(ctx);
    }
}

/// Moves the group's positions (one target offset per queue); answers with
/// the positions right after the move.
#[derive(Message)]
#[rtype(result = "Vec<QueuePosition>")]
pub(crate) struct ResetPositions(pub(crate) Vec<u64>);

impl Handler<ResetPositions> for GroupActor {
    type Result = MessageResult<ResetPositions>;

    fn handle(&mut self, msg: ResetPositions, ctx: &mut Context<Self>) -> Self::Result {
        for (q, target) in self.queues.iter_mut().zip(msg.0) {
            q.committed = target;
            q.next = target;
            q.acked_above.clear();
            q.dirty = true;
        }
        // Messages waiting their turn are read again from the new position.
        for waiting in self.fifo_busy.values_mut() {
            waiting.clear();
        }
        let positions = self.positions();
        self.pump(ctx);
        MessageResult(positions)
    }
}

/// Retry entries written by someone else (a dead-letter resend).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct AddRetries(pub(crate) Vec<RetryEntry>);

impl Handler<AddRetries> for GroupActor {
    type Result = ();

    fn handle(&mut self, msg: AddRetries, ctx: &mut Context<Self>) {
        for e in msg.0 {
            let (due, seq) = (e.key.due_ms, e.key.seq);
            self.scheduled.insert(due, seq, e);
        }
        self.pump(ctx);
    }
}

/// The group's positions and counters.
#[derive(Message)]
#[rtype(result = "(Vec<QueuePosition>, GroupStats)")]
pub(crate) struct Inspect;

impl Handler<Inspect> for GroupActor {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> Self::Result {
        let positions = self.positions();
        let mut stats = self.stats;
        stats.in_flight = self.in_flight as u64;
        stats.scheduled_retries =
            (self.scheduled.len() + self.ready.iter().map(VecDeque::len).sum::<usize>()) as u64;
        MessageResult((positions, stats))
    }
}

impl GroupActor {
    fn positions(&mut self) -> Vec<QueuePosition> {
        self.refresh_ends();
        self.queues
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
            .collect()
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
        // Settlements being written ack their originals when stored: the
        // final positions must include those acks.
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.writing == 0 {
            let _ = tx.send(());
        } else {
            self.stopping = Some(tx);
        }
        Box::pin(
            async move {
                let _ = rx.await;
            }
            .into_actor(self)
            .then(|(), act, _| {
                let entries = act.dirty_offsets();
                act.persistence
                    .send(CommitOffsets {
                        group: act.group.clone(),
                        entries,
                        now: true,
                    })
                    .into_actor(act)
            })
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}
