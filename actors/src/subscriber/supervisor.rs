//! The supervisor: decodes each batch once, hands deliveries to the least
//! busy member (rate-limited by a token bucket if asked), restarts members
//! that died, fails deliveries held past the consume timeout, and returns
//! settlements in one batch per mailbox drain.

use super::delivery::{record_outcome, InboxSlot};
use super::*;
use weirmq_persistence::timers::run_later;

/// A token bucket: `rate` tokens per second, at most `capacity` saved up.
#[derive(Debug)]
pub(super) struct TokenBucket {
    pub(super) rate: f64,
    pub(super) capacity: f64,
    pub(super) tokens: f64,
    pub(super) last: SystemTime,
}

impl TokenBucket {
    pub(super) fn new(per_second: u32, now: SystemTime) -> Self {
        let rate = f64::from(per_second);
        TokenBucket {
            rate,
            capacity: (rate / 20.0).max(1.0),
            tokens: 0.0,
            last: now,
        }
    }

    /// Takes a token at `now` (the bus's clock), or says how long until one
    /// is there.
    pub(super) fn take(&mut self, now: SystemTime) -> Result<(), Duration> {
        let elapsed = now
            .duration_since(self.last)
            .unwrap_or_default()
            .as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        // (Within rounding of a whole token counts as one.)
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            // Rounded up to the next microsecond: after this wait the token
            // is there (on a virtual clock that does not move by itself, a
            // wait rounded down would find 0.999... tokens, forever).
            let micros = ((1.0 - self.tokens) / self.rate * 1e6).ceil().max(1.0);
            Err(Duration::from_micros(micros as u64))
        }
    }

    pub(super) fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }
}

pub(super) struct Member<A: Actor> {
    pub(super) addr: Addr<A>,
    pub(super) in_flight: usize,
    pub(super) generation: u64,
    /// How this generation's deliveries were dropped (which one it
    /// panicked with).
    pub(super) panicked: Arc<Witness>,
}

pub(super) struct Supervisor<E, A: Actor> {
    pub(super) members: Vec<Member<A>>,
    pub(super) spawner: Spawner<A>,
    pub(super) settler: Arc<dyn Settler>,
    pub(super) pending: VecDeque<RawDelivery>,
    pub(super) settlements: Vec<(SettleToken, Settlement)>,
    pub(super) flush_queued: bool,
    /// A `DispatchPending` is queued.
    pub(super) dispatch_queued: bool,
    pub(super) in_flight: usize,
    pub(super) bucket: Option<TokenBucket>,
    pub(super) wake_queued: bool,
    pub(super) config: SubscriberConfig,
    pub(super) drained: Option<oneshot::Sender<()>>,
    pub(super) draining: bool,
    pub(super) stream_done: bool,
    pub(super) next: usize,
    /// Deliveries in members' hands, by id: the consume-timeout sweep
    /// fails those held too long (one timer for all, not one per delivery).
    pub(super) in_hand: HashMap<u64, InHand>,
    /// Whether the consume-timeout timer is armed.
    pub(super) sweep_armed: bool,
    /// Deliveries whose member died before replying, by (member,
    /// generation), with their ids: settled once every delivery that
    /// generation held has an answer (see `resolve_casualties`).
    pub(super) casualties: HashMap<(usize, u64), Vec<(u64, InHand)>>,
    pub(super) next_id: u64,
    pub(super) group: String,
    pub(super) topic: String,
    /// The subscription's metric handles.
    pub(super) meters: super::meters::Meters,
    /// An inbox subscription's broker (its outbox role keeps the processed
    /// marks); `None` for other subscriptions.
    pub(super) inbox: Option<Arc<dyn Broker>>,
    /// Store reads and writes of the inbox under way (marks looked up for a
    /// batch, an attempt's state committed before its ack): a drain waits
    /// for them.
    pub(super) io_pending: usize,
    /// Inbox attempts that succeeded, waiting for their state to be
    /// written (one write per mailbox drain).
    pub(super) inbox_writes: Vec<(InHand, weirmq_bus::StateBatch)>,
    pub(super) _event: PhantomData<fn() -> E>,
}

/// A delivery in a member's hands.
pub(super) struct InHand {
    /// When it was handed out (real time: the processing-time metric).
    pub(super) since: Instant,
    /// When it times out, on the bus's clock.
    pub(super) expires: SystemTime,
    pub(super) member: usize,
    pub(super) generation: u64,
    /// How the member generation's deliveries were dropped.
    pub(super) panicked: Arc<Witness>,
    pub(super) token: SettleToken,
    pub(super) message: Arc<BusMessage>,
    pub(super) attempt: u32,
    /// The attempt's `process` span, kept open until it is settled.
    pub(super) span: tracing::Span,
    /// An inbox subscription's state for this attempt.
    pub(super) inbox: Option<Arc<InboxSlot>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct FlushSettlements;

/// Hands out pending deliveries (see `Supervisor::dispatch_soon`).
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct DispatchPending;

impl<E, A> Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    pub(super) fn settle(
        &mut self,
        token: SettleToken,
        s: Settlement,
        seen: (&BusMessage, u32),
        ctx: &mut Context<Self>,
    ) {
        self.meters.settled(&s);
        self.config.clock.touch();
        if let Some(o) = &self.config.observer {
            o.0.settled(&self.group, seen.0, seen.1, &s);
        }
        self.settlements.push((token, s));
        if !self.flush_queued {
            self.flush_queued = true;
            ctx.notify(FlushSettlements);
        }
    }

    pub(super) fn flush(&mut self) {
        self.flush_queued = false;
        if !self.settlements.is_empty() {
            self.settler.settle(std::mem::take(&mut self.settlements));
        }
    }

    pub(super) fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        let max = self.config.max_in_flight_per_member.max(1);
        // One clock read per pass that hands something out, not per
        // delivery (the hot path): what is handed out in one pass times out
        // at the same instant.
        let mut expires = None;
        let mut handed_at = None;
        while !self.pending.is_empty() {
            let n = self.members.len();
            let Some(j) = (0..n)
                .map(|i| (self.next + i) % n)
                .find(|&j| self.members[j].in_flight < max)
            else {
                break;
            };
            if let Some(bucket) = &mut self.bucket {
                if let Err(wait) = bucket.take(self.config.clock.now()) {
                    if !self.wake_queued {
                        self.wake_queued = true;
                        run_later(ctx, &self.config.clock, wait, |act, ctx| {
                            act.wake_queued = false;
                            act.dispatch(ctx);
                        });
                    }
                    break;
                }
            }
            self.next = j + 1;
            let Some(d) = self.pending.pop_front() else {
                break;
            };
            let event = match E::decode(d.message.body()) {
                Ok(e) => e,
                Err(e) => {
                    // Not handed to a member: it does not count against the rate.
                    if let Some(bucket) = &mut self.bucket {
                        bucket.refund();
                    }
                    error!(group = %self.group, topic = %self.topic, msg_id = %d.message.id(),
                        error = %e, "body does not decode into the event type; dead-lettering");
                    self.settle(
                        d.token,
                        Settlement::DeadLetter {
                            reason: format!("decode: {e}"),
                        },
                        (&d.message, d.attempt),
                        ctx,
                    );
                    continue;
                }
            };
            self.meters.handed_out(&d.message);
            let member = &mut self.members[j];
            member.in_flight += 1;
            self.in_flight += 1;
            let generation = member.generation;
            let id = self.next_id;
            self.next_id += 1;
            let panicked = member.panicked.clone();
            let span = super::delivery::process_span(
                &self.config.trace_sampling,
                &self.group,
                &d.message,
                d.attempt,
            );
            let inbox = self.inbox.as_ref().map(|_| {
                Arc::new(InboxSlot {
                    key: weirmq_bus::inbox_key(d.message.topic(), &self.group, d.message.id()),
                    at_ms: self.config.clock.now_ms(),
                    ops: Default::default(),
                })
            });
            let fut = member.addr.send(Delivery {
                event,
                message: d.message.clone(),
                attempt: d.attempt,
                span: span.clone(),
                _witness: PanicWitness {
                    slot: panicked.clone(),
                    id,
                },
                inbox: inbox.clone(),
            });
            self.in_hand.insert(
                id,
                InHand {
                    since: *handed_at.get_or_insert_with(Instant::now),
                    expires: *expires.get_or_insert_with(|| {
                        self.config.clock.now() + self.config.consume_timeout
                    }),
                    member: j,
                    generation,
                    panicked,
                    token: d.token,
                    message: d.message,
                    attempt: d.attempt,
                    span,
                    inbox,
                },
            );
            self.arm_sweep(ctx);
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                // Gone if the consume-timeout sweep already failed it.
                if let Some(h) = act.in_hand.remove(&id) {
                    act.completed(id, h, res, ctx);
                }
            }));
        }
    }

    /// Fails every delivery held past the consume timeout, then waits for
    /// the next one to expire.
    pub(super) fn sweep(&mut self, ctx: &mut Context<Self>) {
        self.sweep_armed = false;
        let now = self.config.clock.now();
        let mut expired: Vec<u64> = self
            .in_hand
            .iter()
            .filter(|(_, h)| h.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable(); // in hand-out order, the same every run
        for id in expired {
            if let Some(h) = self.in_hand.remove(&id) {
                self.completed(id, h, Err(MailboxError::Timeout), ctx);
            }
        }
        self.arm_sweep(ctx);
    }

    /// One timer for all deliveries in hand, at the earliest expiry (none
    /// while nothing is in hand).
    pub(super) fn arm_sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweep_armed {
            return;
        }
        let Some(first) = self.in_hand.values().map(|h| h.expires).min() else {
            return;
        };
        self.sweep_armed = true;
        let wait = first
            .duration_since(self.config.clock.now())
            .unwrap_or_default();
        run_later(ctx, &self.config.clock, wait, |act, ctx| act.sweep(ctx));
    }

    pub(super) fn completed(
        &mut self,
        id: u64,
        h: InHand,
        res: Result<Result<(), HandlerError>, MailboxError>,
        ctx: &mut Context<Self>,
    ) {
        let (j, generation) = (h.member, h.generation);
        self.in_flight -= 1;
        // An inbox attempt that succeeded keeps its member's slot until its
        // state is committed (`flush_inbox`): the member's next delivery
        // then reads what this one wrote.
        let committing = self.inbox.is_some() && h.inbox.is_some() && matches!(res, Ok(Ok(())));
        if !committing && self.members[j].generation == generation {
            self.members[j].in_flight = self.members[j].in_flight.saturating_sub(1);
        }
        if matches!(res, Err(MailboxError::Closed)) {
            let m = &mut self.members[j];
            let dead = m.generation != generation || !m.addr.connected();
            if dead {
                // Its actor stopped: this delivery may never have run.
                if m.generation == generation && !self.draining {
                    warn!(group = %self.group, member = j, "handler actor stopped; restarting it");
                    m.addr = (self.spawner.spawn)(j);
                    m.in_flight = 0;
                    m.generation += 1;
                    m.panicked = Arc::default();
                }
                self.casualties
                    .entry((j, generation))
                    .or_default()
                    .push((id, h));
            } else {
                // The actor lives: the future it returned panicked.
                self.failed(h, "the handler's future panicked".to_string(), ctx);
            }
        } else {
            self.outcome(h, res, ctx);
        }
        if self.casualties.contains_key(&(j, generation)) {
            self.resolve_casualties(j, generation, ctx);
        }
        self.dispatch_soon(ctx);
        self.maybe_finish(ctx);
    }

    /// Hands out what the members have room for once the answers that are
    /// in have been taken: one pass (one pair of clock reads, members
    /// filled in turn) per wake-up of the supervisor, not one per answer.
    fn dispatch_soon(&mut self, ctx: &mut Context<Self>) {
        if !self.dispatch_queued && !self.pending.is_empty() {
            self.dispatch_queued = true;
            ctx.notify(DispatchPending);
        }
    }

    /// Settles the deliveries a dead member held without replying, once
    /// none of that generation's is outstanding: the one it panicked on
    /// (known from its drop during the unwind, else the earliest — a member
    /// handles its mailbox in order) is a failed attempt; the rest never
    /// ran and go back to the front of the queue as they were.
    pub(super) fn resolve_casualties(
        &mut self,
        j: usize,
        generation: u64,
        ctx: &mut Context<Self>,
    ) {
        if self
            .in_hand
            .values()
            .any(|h| h.member == j && h.generation == generation)
        {
            return;
        }
        let Some(mut lost) = self.casualties.remove(&(j, generation)) else {
            return;
        };
        lost.sort_by_key(|(id, _)| *id);
        let ids: Vec<u64> = lost.iter().map(|(id, _)| *id).collect();
        if let Some(culprit) = lost[0].1.panicked.culprit(&ids) {
            let (_, h) = lost.remove(culprit);
            self.failed(
                h,
                "the handler panicked (its actor stopped and was replaced)".to_string(),
                ctx,
            );
        }
        for (_, h) in lost.into_iter().rev() {
            self.pending.push_front(RawDelivery {
                message: h.message,
                attempt: h.attempt,
                token: h.token,
            });
        }
    }

    /// Settles a delivery its handler answered (or that timed out).
    pub(super) fn outcome(
        &mut self,
        h: InHand,
        res: Result<Result<(), HandlerError>, MailboxError>,
        ctx: &mut Context<Self>,
    ) {
        self.meters.processed(matches!(res, Ok(Ok(()))), h.since);
        let failure = match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.is_retry() => Err(e.message().to_string()),
            Ok(Err(e)) => {
                let reason = e.message().to_string();
                record_outcome(&h.span, "dead_letter", Some(&reason));
                self.settle(
                    h.token,
                    Settlement::DeadLetter { reason },
                    (&h.message, h.attempt),
                    ctx,
                );
                return;
            }
            Err(MailboxError::Timeout) => Err(format!(
                "consume timeout: the handler took longer than {:?}",
                self.config.consume_timeout
            )),
            Err(MailboxError::Closed) => Err("the handler's actor stopped".to_string()),
        };
        match failure {
            Ok(()) => {
                record_outcome(&h.span, "ack", None);
                match h.inbox.clone() {
                    Some(slot) if self.inbox.is_some() => self.commit_inbox(h, &slot, ctx),
                    _ => self.settle(h.token, Settlement::Ack, (&h.message, h.attempt), ctx),
                }
            }
            Err(error) => self.failed(h, error, ctx),
        }
    }

    /// An inbox attempt succeeded: its state and processed mark are written
    /// in one atomic write, and only then is it acked (a crash in between
    /// leaves the mark, so the redelivery is acked unseen). If the write
    /// fails, the attempt failed.
    fn commit_inbox(&mut self, h: InHand, slot: &InboxSlot, ctx: &mut Context<Self>) {
        let state = slot.take();
        self.io_pending += 1;
        self.inbox_writes.push((h, state));
        // Every attempt that succeeds in this mailbox drain goes in one
        // write (see `flush_inbox`).
        if !self.flush_queued {
            self.flush_queued = true;
            ctx.notify(FlushSettlements);
        }
    }

    /// Writes the states and marks of the inbox attempts that succeeded
    /// since the last flush in **one** atomic write, then acks them all (if
    /// it fails, each attempt failed).
    pub(super) fn flush_inbox(&mut self, ctx: &mut Context<Self>) {
        if self.inbox_writes.is_empty() {
            return;
        }
        let Some(broker) = self.inbox.clone() else {
            return;
        };
        let (done, states): (Vec<InHand>, Vec<weirmq_bus::StateBatch>) =
            std::mem::take(&mut self.inbox_writes).into_iter().unzip();
        let state = states.into_iter().fold(
            weirmq_bus::StateBatch::new(),
            weirmq_bus::StateBatch::extend,
        );
        // Buffered is enough: the acks reach the store in a later commit,
        // and the store recovers a prefix of its writes, so no crash keeps
        // an ack without its mark.
        let write = async move {
            match broker.outbox() {
                Some(o) => o.write_state(state, Durability::Buffered).await,
                None => Err(Error::Closed),
            }
        };
        ctx.spawn(write.into_actor(self).map(move |r, act, ctx| {
            act.io_pending -= done.len();
            for h in done {
                // The member's slot, held since the attempt returned.
                let m = &mut act.members[h.member];
                if m.generation == h.generation {
                    m.in_flight = m.in_flight.saturating_sub(1);
                }
                match &r {
                    Ok(()) => act.settle(h.token, Settlement::Ack, (&h.message, h.attempt), ctx),
                    Err(e) => act.failed(
                        h,
                        format!("inbox: committing the handler's state failed: {e}"),
                        ctx,
                    ),
                }
            }
            act.dispatch(ctx);
            act.maybe_finish(ctx);
        }));
    }

    /// An inbox subscription's batch: the messages whose processed mark is
    /// stored are acked unseen, the rest go to the members.
    fn check_inbox(
        &mut self,
        batch: DeliveryBatch,
        broker: Arc<dyn Broker>,
        ctx: &mut Context<Self>,
    ) {
        let keys: Vec<Vec<u8>> = batch
            .iter()
            .map(|d| weirmq_bus::inbox_key(d.message.topic(), &self.group, d.message.id()))
            .collect();
        self.io_pending += 1;
        let n = keys.len();
        let read = async move {
            match broker.outbox() {
                Some(o) => o.state_get_many(&keys).await,
                None => Err(Error::Closed),
            }
        };
        ctx.spawn(read.into_actor(self).map(move |marks, act, ctx| {
            act.io_pending -= 1;
            let marks: Vec<Result<Option<Vec<u8>>, String>> = match marks {
                Ok(m) => m.into_iter().map(Ok).collect(),
                Err(e) => (0..n).map(|_| Err(e.to_string())).collect(),
            };
            for (d, mark) in batch.into_iter().zip(marks) {
                match mark {
                    Ok(Some(_)) => {
                        debug!(group = %act.group, topic = %act.topic, msg_id = %d.message.id(),
                            "already processed (inbox mark stored); acked without a handler");
                        act.settle(d.token, Settlement::Ack, (&d.message, d.attempt), ctx);
                    }
                    Ok(None) => {
                        if !act.draining && !act.stream_done {
                            act.pending.push_back(d);
                        }
                    }
                    Err(e) => {
                        warn!(group = %act.group, msg_id = %d.message.id(), error = %e,
                            "inbox: reading the processed mark failed; retrying the message");
                        act.settle(
                            d.token,
                            Settlement::Nack {
                                delay: Duration::from_secs(1),
                                error: format!("inbox: reading the processed mark failed: {e}"),
                            },
                            (&d.message, d.attempt),
                            ctx,
                        );
                    }
                }
            }
            act.dispatch(ctx);
            act.maybe_finish(ctx);
        }));
    }

    /// A failed attempt: retried per the policy, or dead-lettered after the
    /// last one.
    pub(super) fn failed(&mut self, h: InHand, error: String, ctx: &mut Context<Self>) {
        let attempt = h.attempt;
        let retry = self.config.retry.delay_after(attempt);
        let outcome = if retry.is_some() {
            "retry"
        } else {
            "dead_letter"
        };
        record_outcome(&h.span, outcome, Some(&error));
        let settlement = match retry {
            Some(delay) => {
                warn!(group = %self.group, topic = %self.topic, msg_id = %h.message.id(),
                    attempt, ?delay, %error, "delivery failed; will retry");
                Settlement::Nack { delay, error }
            }
            None => Settlement::DeadLetter {
                reason: format!(
                    "failed {attempt} of {} attempts; last error: {error}",
                    self.config.retry.max_attempts()
                ),
            },
        };
        self.settle(h.token, settlement, (&h.message, attempt), ctx);
    }

    pub(super) fn maybe_finish(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight == 0 && self.io_pending == 0 && (self.draining || self.stream_done) {
            self.flush();
            if let Some(tx) = self.drained.take() {
                let _ = tx.send(());
            }
            ctx.stop();
        }
    }
}

impl<E, A> Actor for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.spawner.stop_threads();
    }
}

impl<E, A> StreamHandler<DeliveryBatch> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    fn handle(&mut self, batch: DeliveryBatch, ctx: &mut Context<Self>) {
        self.config.clock.touch();
        if self.draining {
            return;
        }
        if let Some(broker) = self.inbox.clone() {
            self.check_inbox(batch, broker, ctx);
            return;
        }
        self.pending.extend(batch);
        self.dispatch(ctx);
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.stream_done = true;
        self.pending.clear();
        self.maybe_finish(ctx);
    }
}

impl<E, A> Handler<FlushSettlements> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Result = ();

    fn handle(&mut self, _: FlushSettlements, ctx: &mut Context<Self>) {
        self.flush_inbox(ctx);
        self.flush();
    }
}

impl<E, A> Handler<DispatchPending> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Result = ();

    fn handle(&mut self, _: DispatchPending, ctx: &mut Context<Self>) {
        self.dispatch_queued = false;
        self.dispatch(ctx);
        self.maybe_finish(ctx);
    }
}

impl<E, A> Handler<Drain> for Supervisor<E, A>
where
    E: Event,
    A: Actor<Context = Context<A>> + Handler<Delivery<E>>,
{
    type Result = MessageResult<Drain>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.draining = true;
        self.pending.clear();
        self.drained = Some(tx);
        self.maybe_finish(ctx);
        MessageResult(rx)
    }
}
