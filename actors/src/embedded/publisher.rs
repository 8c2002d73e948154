//! The publisher role on the embedded store (contract:
//! `weirmq_bus::Publisher`): admission, routing of delayed messages to the
//! schedule topic, and group commit through each topic's outbox.

use super::*;

/// In memory, the most publishes one outbox send carries: the publisher
/// that brings the outbox to this many sends it without waiting for the
/// rest, so the broker commits one share while the publishing thread is
/// still producing the next (64 single publishers in memory: 1.4× the
/// throughput of one send for all, median of 3 rounds; BENCHMARKS.md). On
/// a disk store every publish gathered goes in one send: there the commit
/// is the cost, and fewer, larger commits win.
const MEMORY_OUTBOX: usize = 16;

impl EmbeddedBroker {
    /// Refuses a user's publish when the disk is nearly full
    /// ([`Error::StoreFull`]; see `weirmq_persistence::DiskGuard`).
    pub(super) fn disk_room(&self, messages: &[OutgoingMessage]) -> Result<(), Error> {
        let bytes: usize = messages.iter().map(|m| m.body.len() + 64).sum();
        self.inner.guard.admit(bytes as u64)
    }

    /// Where the scheduler stores delayed messages that fell due: in their
    /// topic, as they were (same id).
    pub(super) fn move_sink(&self) -> MoveSink {
        let me = self.clone();
        Arc::new(move |topic: String, messages: Vec<BusMessage>| {
            let me = me.clone();
            async move {
                let h = me.existing_or_default(&topic, false).await?;
                let _room = me.inner.admission.admit(messages.len(), true).await?;
                // Buffered: the entry is removed in a later commit, so a
                // crash loses the copy only together with the removal.
                let r = me
                    .publish_stamped(
                        &h,
                        messages.into_iter().enumerate().collect(),
                        Durability::Buffered,
                    )
                    .await?;
                Ok(r.into_iter().map(|(_, r)| r).collect())
            }
            .boxed()
        })
    }

    /// Validates, admits and publishes a batch (to one or more topics).
    pub(super) async fn publish_messages(
        &self,
        mut messages: Vec<OutgoingMessage>,
        durability: Durability,
        wait: bool,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.check_open()?;
        self.inner.admission.check(&mut messages)?;
        self.disk_room(&messages)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.inner.clock.now();
        if messages.iter().any(|m| m.dedupe_key.is_some()) {
            return self.publish_deduped(messages, durability, wait, now).await;
        }
        self.publish_checked(messages, durability, wait, now).await
    }

    /// Publishes a batch with idempotency keys: a key whose window is open
    /// gets its first receipt, one under way waits for it, the rest are
    /// published (see `dedupe.rs`).
    async fn publish_deduped(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
        wait: bool,
        now: std::time::SystemTime,
    ) -> Result<Vec<SendReceipt>, Error> {
        let now_ms = unix_ms(now);
        let n = messages.len();
        let mut out: Vec<Option<SendReceipt>> = vec![None; n];
        let mut fresh = Vec::with_capacity(n);
        let mut fresh_at = Vec::with_capacity(n);
        let mut waits = Vec::new();
        let mut claims = Claims(Vec::new());
        for (i, m) in messages.into_iter().enumerate() {
            let Some(key) = m.dedupe_key.clone() else {
                fresh_at.push(i);
                fresh.push(m);
                continue;
            };
            let h = self.existing_or_default(&m.topic, false).await?;
            let claim = h
                .dedupe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .claim(&key, now_ms);
            match claim {
                dedupe::Claim::Fresh => {
                    claims.0.push((fresh.len(), h, key));
                    fresh_at.push(i);
                    fresh.push(m);
                }
                dedupe::Claim::Duplicate(r) => out[i] = Some(r),
                dedupe::Claim::Wait(rx) => waits.push((i, rx, m)),
            }
        }
        if !fresh.is_empty() {
            // On error the claims' guard frees every key it holds.
            let receipts = self.publish_checked(fresh, durability, wait, now).await?;
            for (j, h, key) in std::mem::take(&mut claims.0) {
                let until = now_ms.saturating_add(h.dedupe_window().as_millis() as u64);
                h.dedupe
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .stored(&key, receipts[j], until);
            }
            for (i, r) in fresh_at.into_iter().zip(receipts) {
                out[i] = Some(r);
            }
        }
        for (i, rx, m) in waits {
            out[i] = Some(match rx.await.ok().flatten() {
                Some(r) => r,
                // The first publish failed: this one is published itself.
                None => {
                    let mut again =
                        Box::pin(self.publish_messages(vec![m], durability, wait)).await?;
                    again.pop().ok_or(Error::Closed)?
                }
            });
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Publishes checked messages (no idempotency keys left to look at),
    /// born at `now`.
    async fn publish_checked(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
        wait: bool,
        now: std::time::SystemTime,
    ) -> Result<Vec<SendReceipt>, Error> {
        let n = messages.len();
        // A delayed message goes to the schedule topic (its own topic is
        // named in it); one whose time has come goes straight through.
        for m in &messages {
            if m.deliver_at.is_some() {
                self.existing_or_default(&m.topic, false).await?;
            }
        }
        // The hot path: no allocation per message to pick its topic.
        fn route(m: &OutgoingMessage) -> &str {
            match m.deliver_at {
                Some(_) => SCHEDULE_TOPIC,
                None => &m.topic,
            }
        }
        let _room = self.inner.admission.admit(n, wait).await?;
        if messages.iter().all(|m| route(m) == route(&messages[0])) {
            // The hot path: one topic, receipts in the messages' order.
            self.check_open()?;
            let first = route(&messages[0]);
            let h = self
                .existing_or_default(first, first == SCHEDULE_TOPIC)
                .await?;
            let stamped = self.stamp(&h, messages.into_iter().enumerate(), now);
            return self.commit_part(&h, stamped, durability, Vec::new()).await;
        }
        let mut by_topic: BTreeMap<String, Vec<(usize, OutgoingMessage)>> = BTreeMap::new();
        for (i, m) in messages.into_iter().enumerate() {
            by_topic
                .entry(route(&m).to_string())
                .or_default()
                .push((i, m));
        }
        let parts = futures::future::try_join_all(by_topic.into_iter().map(|(t, ms)| async move {
            let system = t == SCHEDULE_TOPIC;
            self.publish_to_at(&t, ms, durability, system, now).await
        }))
        .await?;
        let mut out: Vec<Option<SendReceipt>> = vec![None; n];
        for (i, r) in parts.into_iter().flatten() {
            out[i] = Some(r);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Publishes messages that were already validated and admitted, to one
    /// topic.
    pub(super) async fn publish_to(
        &self,
        topic: &str,
        messages: Vec<(usize, OutgoingMessage)>,
        durability: Durability,
        system: bool,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        let now = self.inner.clock.now();
        self.publish_to_at(topic, messages, durability, system, now)
            .await
    }

    /// As `publish_to`, the messages born at `now`.
    async fn publish_to_at(
        &self,
        topic: &str,
        messages: Vec<(usize, OutgoingMessage)>,
        durability: Durability,
        system: bool,
        now: std::time::SystemTime,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        self.check_open()?;
        let h = self.existing_or_default(topic, system).await?;
        let stamped = self.stamp(&h, messages.into_iter(), now);
        self.publish_stamped(&h, stamped, durability).await
    }

    /// Stamps messages for topic `h` (id, birth time, the topic a staged
    /// message is for, the dedupe window of one with a key), keeping each
    /// one's index.
    fn stamp(
        &self,
        h: &Topic,
        messages: impl ExactSizeIterator<Item = (usize, OutgoingMessage)>,
        now: std::time::SystemTime,
    ) -> Vec<(usize, BusMessage)> {
        let mut window = None;
        let mut stamped = Vec::with_capacity(messages.len());
        for (i, m) in messages {
            // Staged in a system topic (a delayed message): say for which.
            let destination = (*m.topic != *h.name).then(|| m.topic.clone());
            let keyed = m.dedupe_key.is_some();
            let mut msg = BusMessage::prepare_at(m, h.name.clone(), now);
            if keyed {
                msg = msg.with_dedupe_window(*window.get_or_insert_with(|| h.dedupe_window()));
            }
            stamped.push((
                i,
                match destination {
                    Some(d) => msg.with_destination(d),
                    None => msg,
                },
            ));
        }
        stamped
    }

    /// Stores messages already stamped (id, birth time) in topic `h`;
    /// returns each one's receipt with its index.
    pub(super) async fn publish_stamped(
        &self,
        h: &Topic,
        messages: Vec<(usize, BusMessage)>,
        durability: Durability,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        self.publish_stamped_with(h, messages, durability, Vec::new())
            .await
    }

    /// As `publish_stamped`, with application state written atomically with
    /// the messages (the local outbox).
    pub(super) async fn publish_stamped_with(
        &self,
        h: &Topic,
        messages: Vec<(usize, BusMessage)>,
        durability: Durability,
        state: Vec<weirmq_bus::StateOp>,
    ) -> Result<Vec<(usize, SendReceipt)>, Error> {
        let idx: Vec<usize> = messages.iter().map(|(i, _)| *i).collect();
        let stamped: Vec<(usize, BusMessage)> = messages
            .into_iter()
            .enumerate()
            .map(|(j, (_, m))| (j, m))
            .collect();
        let receipts = self.commit_part(h, stamped, durability, state).await?;
        Ok(idx.into_iter().zip(receipts).collect())
    }

    /// Puts one publish's messages (numbered `0..n` in order) in the
    /// topic's outbox and waits for their receipts, in that order.
    async fn commit_part(
        &self,
        h: &Topic,
        stamped: Vec<(usize, BusMessage)>,
        durability: Durability,
        state: Vec<weirmq_bus::StateOp>,
    ) -> Result<Vec<SendReceipt>, Error> {
        debug_assert!(stamped.iter().enumerate().all(|(j, (i, _))| *i == j));
        let n = stamped.len();
        let (tx, rx) = oneshot::channel();
        let part = PublishPart {
            state,
            messages: stamped,
            durability,
            collector: Collector::new(n, tx),
        };
        // Group commit starts here: the first publisher to find the outbox
        // empty yields once, so every publish made meanwhile (from this
        // thread or others) crosses to the broker in the same message. In
        // memory the publisher that fills the outbox to `MEMORY_OUTBOX`
        // sends it at once: the broker commits that share while the rest
        // are still being published.
        let (first, full) = {
            let mut outbox = h.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.push(part);
            let full = !self.inner.durable && outbox.len() >= MEMORY_OUTBOX;
            (outbox.len() == 1, full)
        };
        if full {
            h.send_outbox();
        } else if first {
            let _send = OutboxSender(h);
            tokio::task::yield_now().await;
        }
        rx.await.map_err(|_| Error::Closed)?
    }
}

#[async_trait]
impl Publisher for EmbeddedBroker {
    async fn publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.publish_messages(messages, durability, true).await
    }

    async fn try_publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error> {
        self.publish_messages(messages, durability, false).await
    }

    async fn cancel_delayed(
        &self,
        receipt: &SendReceipt,
    ) -> Result<weirmq_bus::CancelOutcome, Error> {
        let at = weirmq_bus::delayed_receipt(receipt)?;
        self.check_open()?;
        // No schedule yet: nothing was ever delayed here.
        let Ok(schedule) = self.known_topic(SCHEDULE_TOPIC) else {
            return Ok(weirmq_bus::CancelOutcome::AlreadyDelivered);
        };
        self.scheduler()?
            .send(scheduler::CancelDelayed {
                receipt: *receipt,
                due_ms: weirmq_bus::unix_ms_ceil(at),
                schedule_topic_id: schedule.id,
            })
            .await
            .map_err(|_| Error::Closed)?
    }
}

/// Idempotency keys claimed by a publish: freed (waiters told to publish
/// themselves) unless the publish stored them, even if the publishing
/// future is dropped.
struct Claims(Vec<(usize, TopicHandle, String)>);

impl Drop for Claims {
    fn drop(&mut self) {
        for (_, h, key) in self.0.drain(..) {
            h.dedupe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .failed(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str, body: &str) -> OutgoingMessage {
        OutgoingMessage::new("orders", body.as_bytes().to_vec()).dedupe_key(key)
    }

    /// One batch mixing keys: a key twice in the batch is stored once (the
    /// second waits for the first's receipt), a plain message and another
    /// key are stored, and a later batch finds the keys stored.
    #[actix::test]
    async fn a_batch_with_repeated_keys_stores_each_key_once() {
        let broker = EmbeddedBroker::open(EmbeddedConfig::default())
            .await
            .unwrap();
        let r = broker
            .publish(
                vec![
                    keyed("a", "1"),
                    keyed("a", "1 again"),
                    OutgoingMessage::new("orders", b"plain".to_vec()),
                    keyed("b", "2"),
                ],
                Durability::Buffered,
            )
            .await
            .unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0], r[1]);
        let ids: std::collections::HashSet<MessageId> =
            [r[0], r[2], r[3]].iter().map(|r| r.message_id).collect();
        assert_eq!(ids.len(), 3);
        let again = broker
            .publish(vec![keyed("b", "x"), keyed("a", "y")], Durability::Buffered)
            .await
            .unwrap();
        assert_eq!(again, vec![r[3], r[0]]);
        let mut stored = 0;
        for q in 0..weirmq_bus::DEFAULT_QUEUES {
            stored += broker.read_queue("orders", q, 0, 100).await.unwrap().len();
        }
        assert_eq!(stored, 3, "the repeated key and the resends stored nothing");
        broker.shutdown().await.unwrap();
    }
}
