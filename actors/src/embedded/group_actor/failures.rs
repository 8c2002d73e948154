//! The path of a failure in the group actor: retries (written to the
//! store's delay index, due by one timer) and dead letters (copied to
//! `%DLQ%<group>` with [`DeadLetterCopy`], then acked).

use super::*;

impl GroupActor {
    /// Moves the retries that are due from the schedule to `ready`, by
    /// their priority (their queue's).
    pub(super) fn take_due_retries(&mut self) {
        let now = self.clock.now_ms();
        while let Some(entry) = self.scheduled.pop_due(now) {
            let level = weirmq_bus::queue_priority(self.base, entry.queue) as usize;
            self.ready[level].push_back(entry);
        }
    }

    /// Hands out the ready retries of priority `level` while there is room.
    pub(super) fn deliver_ready(&mut self, level: usize) {
        while self.in_flight < self.max_in_flight {
            let Some(entry) = self.ready[level].pop_front() else {
                break;
            };
            let key = self.key(entry.queue);
            let found = self
                .reader
                .read_range(&self.topic, key, entry.offset, entry.offset + 1, 1);
            match found {
                Ok(mut m) if m.len() == 1 => {
                    let message = m.remove(0);
                    let seq = entry.key.seq;
                    self.note(&message, TraceKind::Delivered, entry.attempt, None);
                    self.outbox.push(RawDelivery {
                        message: message.clone(),
                        attempt: entry.attempt,
                        token: SettleToken::new(RETRY_TOKEN, seq),
                    });
                    self.retrying.insert(seq, RetryFlight { entry, message });
                    self.in_flight += 1;
                    self.stats.delivered += 1;
                }
                Ok(_) => {
                    self.stats.expired += 1;
                    error!(group = %self.group, topic = %self.topic, queue = entry.queue,
                        offset = entry.offset, attempt = entry.attempt,
                        "a scheduled retry names a message that is no longer stored (removed by \
                         retention while it was in flight); dropping the retry");
                    self.update_retries(Vec::new(), vec![entry.key], |_| {});
                }
                Err(e) => {
                    // Keep it: try again in a second.
                    warn!(group = %self.group, topic = %self.topic, error = %e,
                        "reading a due retry failed; trying again in 1 s");
                    // (Its stored key keeps its due time; only the wake-up moves.)
                    let seq = entry.key.seq;
                    self.scheduled
                        .insert(self.clock.now_ms() + 1000, seq, entry);
                    break;
                }
            }
        }
    }

    /// Wakes the group at the earliest due retry (if later than now).
    pub(super) fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        let blocked = self.in_flight >= self.max_in_flight;
        self.scheduled.arm(
            ctx,
            blocked,
            |act: &mut Self| &mut act.scheduled,
            |act, ctx| act.pump(ctx),
        );
    }

    pub(super) fn update_retries(
        &self,
        put: Vec<RetryEntry>,
        remove: Vec<RetryKey>,
        done: impl FnOnce(bool) + Send + 'static,
    ) {
        self.persistence.do_send(UpdateRetries {
            put,
            remove,
            resent: Vec::new(),
            unschedule: Vec::new(),
            reschedule: Vec::new(),
            done: Box::new(move |r: Result<(), weirmq_bus::StorageError>| {
                if let Err(e) = &r {
                    warn!(error = %e, "writing the delay index failed");
                }
                done(r.is_ok())
            }),
        });
    }

    /// What is known of a delivery in flight: message, attempt, first failure.
    pub(super) fn flight(&self, held: Held) -> Option<(Arc<BusMessage>, u32, Option<u64>)> {
        match held {
            Held::Original { queue, offset } => self
                .queues
                .get(queue as usize)?
                .in_flight
                .get(&offset)
                .map(|f| (f.message.clone(), f.attempt, f.first_failed_ms)),
            Held::Retry { seq } => self.retrying.get(&seq).map(|r| {
                (
                    r.message.clone(),
                    r.entry.attempt,
                    Some(r.entry.first_failed_ms),
                )
            }),
        }
    }

    /// A failed delivery: store its next attempt in the delay index, then
    /// let go of it (see the module docs).
    pub(super) fn schedule_retry(
        &mut self,
        held: Held,
        delay: Duration,
        error: String,
        ctx: &mut Context<Self>,
    ) {
        let Some((message, attempt, first_failed)) = self.flight(held) else {
            return;
        };
        let now = self.clock.now_ms();
        let entry = RetryEntry {
            key: RetryKey {
                group: self.group.clone(),
                topic_id: self.topic_id,
                due_ms: due_ms_after(&self.clock, delay),
                seq: next_seq(),
            },
            queue: message.queue(),
            offset: message.offset(),
            attempt: attempt + 1,
            first_failed_ms: first_failed.unwrap_or(now),
            last_error: truncate(error, MAX_REASON),
        };
        let remove = match held {
            Held::Retry { seq } => self
                .retrying
                .get(&seq)
                .map(|r| vec![r.entry.key.clone()])
                .unwrap_or_default(),
            Held::Original { .. } => Vec::new(),
        };
        let me = ctx.address();
        let stored = entry.clone();
        self.writing += 1;
        self.update_retries(vec![entry], remove, move |ok| {
            me.do_send(RetryStored {
                held,
                entry: stored,
                ok,
                delay,
            })
        });
    }

    pub(super) fn dead_letter(&mut self, held: Held, reason: String, ctx: &mut Context<Self>) {
        let Some((m, attempt, first_failed)) = self.flight(held) else {
            return;
        };
        let reason = truncate(reason, MAX_REASON);
        let reason_kept = reason.clone();
        let (queue, offset) = (m.queue(), m.offset());
        error!(group = %self.group, topic = %self.topic, queue, offset, msg_id = %m.id(),
            attempt, %reason, "dead-lettering message");
        let now = self.clock.now_ms();
        let out = DeadLetterCopy {
            origin_topic: self.topic.to_string(),
            origin_queue: queue,
            origin_offset: offset,
            origin_id: Some(m.id()),
            reason,
            attempts: attempt,
            first_failed_ms: first_failed.unwrap_or(now),
            dead_lettered_ms: now,
        }
        .of(&self.group, &m);
        let fut = (self.dead_letters)(out);
        self.writing += 1;
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => {
                act.written();
                act.stats.dead_lettered += 1;
                act.note(&m, TraceKind::DeadLettered, attempt, Some(reason_kept));
                if let Held::Retry { seq } = held {
                    if let Some(r) = act.retrying.get(&seq) {
                        act.update_retries(Vec::new(), vec![r.entry.key.clone()], |_| {});
                    }
                }
                act.release(held, ctx);
                act.pump(ctx);
            }
            Err(e) if act.stopping.is_some() => {
                // Stopping: it stays unacked, delivered again next time.
                warn!(group = %act.group, queue, offset, error = %e,
                    "storing a dead letter failed while the group stops; it stays unacked");
                act.written();
            }
            Err(e) => {
                warn!(group = %act.group, queue, offset, error = %e,
                    "storing a dead letter failed; retrying in 5 s");
                act.written();
                let clock = act.clock.clone();
                run_later(ctx, &clock, DLQ_RETRY, move |act, ctx| {
                    act.dead_letter(held, "dead-letter retry".into(), ctx)
                });
            }
        }));
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
