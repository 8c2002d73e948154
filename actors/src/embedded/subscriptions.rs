//! The subscriptions role on the embedded store (contract:
//! `weirmq_bus::Subscriptions`): one `GroupActor` per (group, topic),
//! listening to the topic's queue actors.

use super::*;

impl EmbeddedBroker {
    pub(super) fn dead_letter_sink(&self) -> DeadLetterSink {
        let me = self.clone();
        Arc::new(move |m: OutgoingMessage| {
            let me = me.clone();
            async move {
                let topic = m.topic.clone();
                let _room = me.inner.admission.admit(1, true).await?;
                let mut r = me
                    .publish_to(&topic, vec![(0, m)], Durability::Flushed, true)
                    .await?;
                r.pop().map(|(_, r)| r).ok_or_else(|| {
                    Error::Storage(StorageError::msg("no receipt for a dead letter"))
                })
            }
            .boxed()
        })
    }
}

#[derive(Debug)]
struct GroupSettler {
    addr: Addr<GroupActor>,
}

impl Settler for GroupSettler {
    fn settle(&self, batch: Vec<(SettleToken, Settlement)>) {
        // A control message bounded by the subscription's in-flight window.
        self.addr.do_send(Settle(batch));
    }
}

#[async_trait]
impl Subscriptions for EmbeddedBroker {
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<BrokerSubscription, Error> {
        self.check_open()?;
        validate_group_name(&spec.group)?;
        validate_topic_name(&spec.topic)?;
        let h = self.existing_or_default(&spec.topic, false).await?;
        let key = (spec.group.clone(), spec.topic.clone());
        let _guard = self.inner.create_lock.lock().await;
        if self.inner.groups.contains_key(&key) {
            return Err(Error::AlreadySubscribed {
                group: spec.group,
                topic: spec.topic,
            });
        }
        let reader = self.reader()?;
        let stored = reader.load_offsets(&spec.group, h.id)?;
        let retries = reader.load_retries(&spec.group, h.id)?;
        let mut starts = Vec::with_capacity(h.all_queues() as usize);
        for q in 0..h.all_queues() {
            let s = match stored.get(&q) {
                Some(s) => s.clone(),
                None => OffsetState {
                    committed: match spec.start {
                        StartFrom::Latest => h.ends[q as usize].load(Ordering::Acquire),
                        StartFrom::Earliest => reader.queue_start(QueueKey {
                            topic_id: h.id,
                            queue: q,
                        })?,
                    },
                    acked_above: Vec::new(),
                },
            };
            starts.push(s);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let setup = GroupSetup {
            group: spec.group.clone(),
            topic: h.name.clone(),
            topic_id: h.id,
            base_queues: h.queues,
            starts,
            ends: h.ends.clone(),
            max_in_flight: spec.max_in_flight,
            reader,
            persistence: self.inner.persistence.clone(),
            deliveries: tx,
            dead_letters: self.dead_letter_sink(),
            retries,
            filter: spec.filter.clone(),
            trace: h.trace.clone(),
            ordering: spec.ordering,
            clock: self.inner.clock.clone(),
        };
        let addr = GroupActor::start_in_arbiter(&self.inner.broker_arbiter, move |_| {
            GroupActor::new(setup)
        });
        let listen_id = self.inner.next_listen_id.fetch_add(1, Ordering::Relaxed);
        for q in &h.queue_addrs {
            q.do_send(Listen {
                id: listen_id,
                group: addr.clone(),
            });
        }
        info!(group = %spec.group, topic = %spec.topic, "subscribed");
        self.inner.groups.insert(
            key,
            GroupHandle {
                addr: addr.clone(),
                listen_id,
            },
        );
        Ok(BrokerSubscription {
            deliveries: rx,
            settler: Arc::new(GroupSettler { addr }),
        })
    }

    async fn unsubscribe(&self, group: &str, topic: &str) -> Result<(), Error> {
        let Some((_, g)) = self
            .inner
            .groups
            .remove(&(group.to_string(), topic.to_string()))
        else {
            return Ok(());
        };
        if let Some(h) = self.inner.topics.get(topic) {
            for q in &h.queue_addrs {
                q.do_send(Unlisten { id: g.listen_id });
            }
        }
        let _ = g.addr.send(StopGroup).await;
        info!(group, topic, "unsubscribed");
        Ok(())
    }
}
