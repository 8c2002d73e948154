//! The fetch loop of one queue: pulls batches from the group's consumer
//! (while this process holds the queue's lease, for FIFO), and accepts each
//! message — another group's resend is acked past, an undecodable one is
//! dead-lettered, a filtered one acked — before handing it out.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn pump(
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
            if !st.is_mine(queue) {
                // The group's members assign this queue to another process.
                if st.leases[queue as usize].lock().await.is_held() {
                    hand_over(&st, queue, &mut stop).await;
                } else {
                    let _ = tokio::time::timeout(LEASE_POLL, stop.changed()).await;
                }
                consumer = Some(c);
                continue;
            }
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
        let asked = tokio::time::Instant::now();
        let batch = c
            .batch()
            .max_messages(permits.len())
            .expires(FETCH_WAIT)
            .messages()
            .await;
        let mut msgs = match batch {
            Ok(m) => Pull::new(m, asked, FETCH_WAIT),
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
                next = msgs.ready();
            }
            if !out.is_empty() && tx.send(out).is_err() {
                return;
            }
        }
        // A message reaching a request given up on goes back to the
        // consumer at once (the next request gets it) rather than waiting
        // out the ack wait in an inbox nobody reads.
        msgs.salvage(&inner.handle, |m| async move {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        });
        if healthy {
            consumer = Some(c);
        } else {
            let _ = tokio::time::timeout(Duration::from_millis(100), stop.changed()).await;
        }
    }
}

/// How often a queue being handed over checks whether its deliveries are
/// all settled.
const HAND_OVER_POLL: Duration = Duration::from_millis(20);

/// Hands a FIFO queue this process holds to the process the group's
/// members now assign it to: nothing more of it is handed out; once none of
/// its deliveries is in a handler (the lease renewed meanwhile), what is
/// held goes back to the server oldest first and the lease is released.
/// The order of every message group holds across the handover: the next
/// owner gets the given-back messages before any later one.
async fn hand_over(st: &Arc<SubState>, queue: u32, stop: &mut watch::Receiver<bool>) {
    st.fifo[queue as usize].lock().unwrap().releasing = true;
    let started = std::time::Instant::now();
    loop {
        if *stop.borrow() {
            // The subscription's stop gives everything back.
            return;
        }
        if !st.inflight.iter().any(|e| e.queue == queue) {
            break;
        }
        if st.leases[queue as usize]
            .lock()
            .await
            .ensure()
            .await
            .is_err()
        {
            // Lost meanwhile: give back what is held at once.
            break;
        }
        let _ = tokio::time::timeout(HAND_OVER_POLL, stop.changed()).await;
    }
    let (tx, rx) = oneshot::channel();
    if st.commands.send(Command::HandOver(queue, tx)).is_ok() {
        let _ = rx.await;
    }
    st.leases[queue as usize].lock().await.release().await;
    st.fifo[queue as usize].lock().unwrap().releasing = false;
    info!(group = %st.spec.group, topic = %st.spec.topic, queue,
        waited_ms = started.elapsed().as_millis() as u64,
        "handed the FIFO queue over to the process the group's members assign it to");
}

/// Takes one fetched message: skips what is not for this group, filters,
/// and turns the rest into a delivery holding `permit`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn accept(
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
    let token = parse_queue_subject(&m.subject).map_or(ALL_GROUPS, |(_, t)| t);
    let unaddressed = match parse_target(token) {
        Target::All => None,
        Target::Group(_) if token == mine => None,
        // A resend meant for another group.
        Target::Group(_) => {
            let _ = m.ack().await;
            return None;
        }
        // Stored under a target no group answers to (a publish by hand):
        // surfaced in the dead-letter queue, not skipped in silence.
        Target::Unknown => Some(format!(
            "published to {}, which addresses no consumer group (the last token must be \
             `_` for every group)",
            m.subject
        )),
    };
    if stopping {
        let _ = m.ack_with(AckKind::Nak(None)).await;
        return None;
    }
    let decoded = match unaddressed {
        Some(reason) => Err(reason),
        None => crate::wire::decode_fetched(topic.clone(), queue, seq, &m)
            .map_err(|e| format!("not a weirmq message: {e}")),
    };
    let message = match decoded {
        Ok(message) => message,
        Err(reason) => {
            error!(topic = %topic, queue, seq, subject = %m.subject, reason = %reason,
                "a message in the topic's stream cannot be delivered; dead-lettering it");
            let now = now_ms();
            let dl = DeadLetterCopy {
                origin_topic: st.spec.topic.clone(),
                origin_queue: queue,
                origin_offset: seq,
                origin_id: None,
                reason,
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
