//! Settlement: the subscriber's batches become acks, naks with the retry
//! policy's delay, in-place FIFO retries, and dead letters (copied to the
//! DLQ stream, then terminated).

use super::*;

pub(super) async fn settle_loop(
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
            Command::HandOver(queue, done) => {
                let held = {
                    let mut f = st.fifo[queue as usize].lock().unwrap();
                    let retrying = f.retrying.len() as u64;
                    c_sub(&st.counters.scheduled_retries, retrying);
                    f.drain_held()
                };
                give_back(&inner, held.into_iter().map(|w| (w.seq, w.msg)).collect()).await;
                let _ = done.send(());
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
                give_back(&inner, left).await;
                let _ = done.send(());
                return;
            }
        }
    }
}

fn c_sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// Naks held messages at once, oldest first (for FIFO the next owner gets
/// each message group's messages in order: the server redelivers naked
/// messages in the order of the naks, before any new one).
async fn give_back(inner: &Inner, mut held: Vec<(u64, jetstream::Message)>) {
    held.sort_by_key(|(seq, _)| *seq);
    for (_, m) in held {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
    let _ = inner.client.flush().await;
}

pub(super) async fn settle_one(inner: &Inner, st: &Arc<SubState>, e: Entry, s: Settlement) {
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
