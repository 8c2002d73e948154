//! The admin role on the embedded store (contract: `weirmq_bus::Admin`):
//! topics, positions (from the running group actor, else the store),
//! resets, stats and reads. A topic's priority lanes (the queues after its
//! own, `weirmq_bus::priority_queue`) are positions, stats and resets like
//! any queue; a lane that never held a message is left out of what an
//! operator sees.

use super::*;

#[async_trait]
impl Admin for EmbeddedBroker {
    async fn ensure_topic(&self, config: TopicConfig) -> Result<TopicConfig, Error> {
        config.validate()?;
        let h = self.topic(config, false).await?;
        Ok(h.config())
    }

    async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        let running = self.running_group(group, topic);
        let h = self.known_topic(topic)?;
        if let Some(addr) = running {
            if let Ok((p, _)) = addr.send(Inspect).await {
                return Ok(shown(&h, p));
            }
        }
        let reader = self.reader()?;
        let stored = reader.load_offsets(group, h.id)?;
        (0..h.all_queues())
            .filter(|&q| h.shown(q, h.ends[q as usize].load(Ordering::Acquire)))
            .map(|q| {
                let max = h.ends[q as usize].load(Ordering::Acquire);
                let mut s = stored.get(&q).cloned().unwrap_or_default();
                // Retention may have removed what the group has not read:
                // it will continue at the first kept message.
                let start = reader.queue_start(QueueKey {
                    topic_id: h.id,
                    queue: q,
                })?;
                if s.committed < start {
                    s.committed = start;
                    s.acked_above.retain(|o| *o >= start);
                }
                Ok(QueuePosition {
                    queue: q,
                    committed: s.committed,
                    max,
                    lag: max
                        .saturating_sub(s.committed)
                        .saturating_sub(s.acked_above.len() as u64),
                })
            })
            .collect()
    }

    async fn group_stats(&self, group: &str, topic: &str) -> GroupStats {
        let running = self.running_group(group, topic);
        match running {
            Some(addr) => addr.send(Inspect).await.map(|(_, s)| s).unwrap_or_default(),
            None => GroupStats::default(),
        }
    }

    async fn topics(&self) -> Vec<TopicConfig> {
        let mut v: Vec<TopicConfig> = self.inner.topics.iter().map(|h| h.config()).collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    async fn groups(&self) -> Result<Vec<GroupTopic>, Error> {
        let reader = self.reader()?;
        let stored = self.blocking(move || reader.groups()).await?;
        let names: HashMap<u32, String> = self
            .inner
            .topics
            .iter()
            .map(|h| (h.id, h.name.to_string()))
            .collect();
        let mut out: Vec<GroupTopic> = stored
            .into_iter()
            .filter_map(|(group, id)| {
                names.get(&id).map(|topic| GroupTopic {
                    group,
                    topic: topic.clone(),
                })
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn topic_stats(&self, topic: &str) -> Result<TopicStats, Error> {
        let h = self.known_topic(topic)?;
        let reader = self.reader()?;
        let ends: Vec<(usize, u64)> = h
            .ends
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .enumerate()
            .filter(|&(q, end)| h.shown(q as u32, end))
            .collect();
        let id = h.id;
        self.blocking(move || {
            let mut stats = TopicStats {
                queues: Vec::with_capacity(ends.len()),
                bytes: 0,
            };
            for (q, end) in ends {
                let key = QueueKey {
                    topic_id: id,
                    queue: q as u32,
                };
                let (messages, bytes) = reader.queue_usage(key)?;
                stats.bytes += bytes;
                stats.queues.push(QueueStats {
                    queue: q as u32,
                    first: reader.queue_start(key)?.min(end),
                    end,
                    messages,
                });
            }
            Ok(stats)
        })
        .await
    }

    /// System topics (`%DLQ%<group>`) can be read too.
    async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<BusMessage>>, Error> {
        let h = self.known_topic(topic)?;
        if queue >= h.all_queues() {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "topic `{topic}` has {} queues and {} priority lanes (queues {} to {}), \
                     not a queue {queue}",
                    h.queues,
                    weirmq_bus::PRIORITY_LANES,
                    h.queues,
                    h.all_queues() - 1
                ),
            });
        }
        let reader = self.reader()?;
        let end = h.ends[queue as usize].load(Ordering::Acquire);
        let key = QueueKey {
            topic_id: h.id,
            queue,
        };
        let name = h.name.clone();
        self.blocking(move || reader.read_range(&name, key, from, end, max))
            .await
    }

    async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        self.check_open()?;
        let h = self.known_topic(topic)?;
        let reader = self.reader()?;
        let mut targets = Vec::with_capacity(h.all_queues() as usize);
        for q in 0..h.all_queues() {
            let key = QueueKey {
                topic_id: h.id,
                queue: q,
            };
            let end = h.ends[q as usize].load(Ordering::Acquire);
            let start = reader.queue_start(key)?;
            targets.push(match to {
                ResetTo::Earliest => start,
                ResetTo::Latest => end,
                ResetTo::Time(t) => reader.offset_at_time(&h.name, key, start, end, unix_ms(t))?,
            });
        }
        let running = self.running_group(group, topic);
        if let Some(addr) = running {
            let positions = addr
                .send(ResetPositions(targets.clone()))
                .await
                .map_err(|_| Error::Closed)?;
            info!(group, topic, ?to, ?targets, "positions reset");
            return Ok(shown(&h, positions));
        }
        let entries = targets
            .iter()
            .enumerate()
            .map(|(q, t)| {
                (
                    QueueKey {
                        topic_id: h.id,
                        queue: q as u32,
                    },
                    OffsetState {
                        committed: *t,
                        acked_above: Vec::new(),
                    },
                )
            })
            .collect();
        self.inner
            .persistence
            .send(CommitOffsets {
                group: group.to_string(),
                entries,
                now: true,
            })
            .await
            .map_err(|_| Error::Closed)?;
        info!(group, topic, ?to, ?targets, "positions reset");
        self.positions(group, topic).await
    }
}

/// The positions an operator sees: the topic's queues, and the priority
/// lanes that have held a message.
fn shown(h: &Topic, mut positions: Vec<QueuePosition>) -> Vec<QueuePosition> {
    positions.retain(|p| h.shown(p.queue, p.max));
    positions
}
