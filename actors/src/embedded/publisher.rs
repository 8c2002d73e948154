//! The publisher role on the embedded store (contract:
//! `weirmq_bus::Publisher`): admission, routing of delayed messages to the
//! schedule topic, and group commit through each topic's outbox.

use super::*;

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
        let n = messages.len();
        if n == 0 {
            return Ok(Vec::new());
        }
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
            let first = route(&messages[0]).to_string();
            let system = first == SCHEDULE_TOPIC;
            let r = self
                .publish_to(
                    &first,
                    messages.into_iter().enumerate().collect(),
                    durability,
                    system,
                )
                .await?;
            return Ok(r.into_iter().map(|(_, r)| r).collect());
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
            self.publish_to(&t, ms, durability, system).await
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
        self.check_open()?;
        let h = self.existing_or_default(topic, system).await?;
        let now = self.inner.clock.now();
        let stamped: Vec<(usize, BusMessage)> = messages
            .into_iter()
            .map(|(i, m)| {
                // Staged in a system topic (a delayed message): say for which.
                let destination = (*m.topic != *h.name).then(|| m.topic.clone());
                let msg = BusMessage::prepare_at(m, h.name.clone(), now);
                (
                    i,
                    match destination {
                        Some(d) => msg.with_destination(d),
                        None => msg,
                    },
                )
            })
            .collect();
        self.publish_stamped(&h, stamped, durability).await
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
        let n = messages.len();
        let idx: Vec<usize> = messages.iter().map(|(i, _)| *i).collect();
        let stamped: Vec<(usize, BusMessage)> = messages
            .into_iter()
            .enumerate()
            .map(|(j, (_, m))| (j, m))
            .collect();
        let (tx, rx) = oneshot::channel();
        let part = PublishPart {
            state,
            messages: stamped,
            durability,
            collector: Collector::new(n, tx),
        };
        // Group commit starts here: the first publisher to find the outbox
        // empty yields once, so every publish made meanwhile (from this
        // thread or others) crosses to the broker in the same message.
        let first = {
            let mut outbox = h.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.push(part);
            outbox.len() == 1
        };
        if first {
            let _send = OutboxSender(h);
            tokio::task::yield_now().await;
        }
        let receipts = rx.await.map_err(|_| Error::Closed)??;
        Ok(idx.into_iter().zip(receipts).collect())
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
}
