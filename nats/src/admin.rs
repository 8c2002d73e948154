//! The admin role on JetStream (contract: `weirmq_bus::Admin`): positions
//! are the consumers' ack floors and pending counts; reads go by stream
//! sequence and subject.

use crate::prelude::*;

impl Inner {
    pub(crate) async fn positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<QueuePosition>, Error> {
        let t = self.known_topic(topic).await?;
        let mut stream = self.stream(&topic_stream(topic)).await?;
        let last = stream
            .info()
            .await
            .map_err(|e| nats_err("reading stream info", e))?
            .state
            .last_sequence;
        let mut out = Vec::new();
        for q in 0..t.config.queue_count() {
            let pos = match stream
                .get_consumer::<consumer::pull::Config>(&consumer_name(group, q))
                .await
            {
                Ok(c) => {
                    let info = c
                        .get_info()
                        .await
                        .map_err(|e| nats_err("reading consumer info", e))?;
                    QueuePosition {
                        queue: q,
                        committed: info.ack_floor.stream_sequence + 1,
                        max: last + 1,
                        lag: info.num_pending + info.num_ack_pending as u64,
                    }
                }
                Err(_) => QueuePosition {
                    queue: q,
                    committed: 0,
                    max: last + 1,
                    lag: self
                        .subject_count(&topic_stream(topic), &queue_filter(topic, q))
                        .await?,
                },
            };
            out.push(pos);
        }
        Ok(out)
    }
}

#[async_trait]
impl Admin for NatsBroker {
    async fn ensure_topic(&self, config: TopicConfig) -> Result<TopicConfig, Error> {
        config.validate()?;
        if config.traced() {
            return Err(Error::Unsupported {
                feature: "message trace (TopicConfig::trace) on the NATS JetStream backend \
                          (see docs/scaling.md)"
                    .into(),
            });
        }
        self.run(|i| async move { Ok(i.topic(config, true).await?.config.clone()) })
            .await
    }

    async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        let (g, t) = (group.to_string(), topic.to_string());
        self.run(|i| async move { i.positions(&g, &t).await }).await
    }

    async fn group_stats(&self, group: &str, topic: &str) -> GroupStats {
        self.inner
            .subs
            .get(&(group.to_string(), topic.to_string()))
            .map(|s| s.stats())
            .unwrap_or_default()
    }

    async fn topics(&self) -> Vec<TopicConfig> {
        self.run(|i| async move {
            use futures::StreamExt;
            let mut names = i.js.stream_names();
            let mut out = Vec::new();
            while let Some(name) = names.next().await {
                let Ok(name) = name else { break };
                let Some(topic) = name.strip_prefix(TOPIC_STREAM_PREFIX).and_then(dec) else {
                    continue;
                };
                if let Ok(t) = i.topic(TopicConfig::new(topic), false).await {
                    out.push(t.config.clone());
                }
            }
            out.sort_by(|a, b| a.name().cmp(b.name()));
            Ok(out)
        })
        .await
        .unwrap_or_default()
    }

    /// The durable consumers `<group>_Q<queue>` of every topic stream.
    async fn groups(&self) -> Result<Vec<GroupTopic>, Error> {
        self.run(|i| async move {
            use futures::StreamExt;
            let mut names = i.js.stream_names();
            let mut streams = Vec::new();
            while let Some(name) = names.next().await {
                let name = name.map_err(|e| nats_err("listing streams", e))?;
                if let Some(topic) = name.strip_prefix(TOPIC_STREAM_PREFIX).and_then(dec) {
                    streams.push((name, topic));
                }
            }
            let mut out = Vec::new();
            for (stream, topic) in streams {
                let s = i.stream(&stream).await?;
                let mut consumers = s.consumer_names();
                while let Some(c) = consumers.next().await {
                    let c =
                        c.map_err(|e| nats_err(format!("listing the consumers of {stream}"), e))?;
                    let group = c
                        .rsplit_once("_Q")
                        .filter(|(_, q)| q.parse::<u32>().is_ok())
                        .and_then(|(g, _)| dec(g));
                    if let Some(group) = group {
                        out.push(GroupTopic {
                            group,
                            topic: topic.clone(),
                        });
                    }
                }
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
    }

    /// Counts per queue from the stream's subjects (`wq.<T>.<q>.<target>`);
    /// the first offset of a queue is its first message's stream sequence.
    async fn topic_stats(&self, topic: &str) -> Result<TopicStats, Error> {
        let topic = topic.to_string();
        self.run(move |i| async move {
            use futures::TryStreamExt;
            let t = i.known_topic(&topic).await?;
            let mut stream = i.stream(&topic_stream(&topic)).await?;
            let state = stream
                .info()
                .await
                .map_err(|e| nats_err("reading stream info", e))?
                .state
                .clone();
            let n = t.config.queue_count();
            let mut counts = vec![0u64; n as usize];
            let mut subjects = stream
                .info_with_subjects(topic_subjects(&topic))
                .await
                .map_err(|e| nats_err(format!("counting the messages of {topic}"), e))?;
            while let Some((subject, count)) = subjects
                .try_next()
                .await
                .map_err(|e| nats_err(format!("counting the messages of {topic}"), e))?
            {
                if let Some((q, _)) = parse_queue_subject(&subject) {
                    if let Some(c) = counts.get_mut(q as usize) {
                        *c += count as u64;
                    }
                }
            }
            let end = state.last_sequence + 1;
            let mut queues = Vec::with_capacity(n as usize);
            for (q, messages) in counts.into_iter().enumerate() {
                let q = q as u32;
                let first = if messages == 0 {
                    end
                } else {
                    i.read_raw(&stream, &queue_filter(&topic, q), state.first_sequence, 1)
                        .await?
                        .first()
                        .map_or(end, |m| m.sequence)
                };
                queues.push(QueueStats {
                    queue: q,
                    first,
                    end,
                    messages,
                });
            }
            Ok(TopicStats {
                queues,
                bytes: state.bytes,
            })
        })
        .await
    }

    async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error> {
        let topic = topic.to_string();
        self.run(move |i| async move {
            let t = i.known_topic(&topic).await?;
            if queue >= t.config.queue_count() {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "topic `{topic}` has {} queues; there is no queue {queue}",
                        t.config.queue_count()
                    ),
                });
            }
            let stream = i.stream(&topic_stream(&topic)).await?;
            let name: Arc<str> = Arc::from(topic.as_str());
            let mut out = Vec::new();
            for raw in i
                .read_raw(&stream, &queue_filter(&topic, queue), from, max)
                .await?
            {
                let m = crate::wire::decode_stored(name.clone(), queue, &raw)?;
                out.push(Arc::new(m));
            }
            Ok(out)
        })
        .await
    }

    async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        let (g, t) = (group.to_string(), topic.to_string());
        self.run(move |i| async move {
            let state = i.known_topic(&t).await?;
            let sub = i.subs.get(&(g.clone(), t.clone())).map(|s| s.clone());
            subscription::reset(&i, &g, &state, to, sub.as_deref()).await?;
            i.positions(&g, &t).await
        })
        .await
    }
}
