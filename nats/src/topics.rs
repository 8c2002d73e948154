//! Topics as streams: one stream per topic, one subject per queue, the
//! queue count kept in the stream's description; what this process knows
//! of each ([`TopicState`]).

use crate::prelude::*;

pub(crate) struct TopicState {
    pub(crate) config: TopicConfig,
    pub(crate) next: AtomicU64,
    /// Delayed messages up to this far ahead use the server's message
    /// schedules (2.12+): the definition waits in the topic's stream, so it
    /// must not outlive the stream's `max_age`, and a size-limited stream
    /// could drop it. `None`: every delay takes the forwarder.
    pub(crate) native_horizon: Option<Duration>,
}

impl TopicState {
    pub(crate) fn pick_queue(&self, m: &Message) -> u32 {
        let n = self.config.queue_count();
        match m.message_group() {
            Some(g) => queue_for_message_group(g, n),
            None => (self.next.fetch_add(1, AtomicOrdering::Relaxed) % n as u64) as u32,
        }
    }
}

impl Inner {
    /// The topic's state, creating its stream with `config` (or reading the
    /// existing one's) if this process has not seen it yet.
    pub(crate) async fn topic(
        &self,
        config: TopicConfig,
        explicit: bool,
    ) -> Result<Arc<TopicState>, Error> {
        if let Some(t) = self.topics.get(config.name()) {
            if explicit && t.config.queue_count() != config.queue_count() {
                return Err(Error::TopicConflict {
                    topic: config.name().to_string(),
                    reason: format!(
                        "it has {} queues, not {}",
                        t.config.queue_count(),
                        config.queue_count()
                    ),
                });
            }
            let window = config.get_dedupe_window();
            if !explicit || t.config.get_dedupe_window() == window {
                return Ok(t.clone());
            }
            let t = t.clone();
            self.set_dedupe_window(config.name(), window).await?;
            let state = Arc::new(TopicState {
                config: t.config.clone().dedupe_window(window),
                next: AtomicU64::new(t.next.load(AtomicOrdering::Relaxed)),
                native_horizon: t.native_horizon,
            });
            self.topics.insert(config.name().to_string(), state.clone());
            return Ok(state);
        }
        let name = topic_stream(config.name());
        let read = |name: String| async move {
            let mut s = self.js.get_stream(&name).await.ok()?;
            Some(
                s.info()
                    .await
                    .map(|i| i.config.clone())
                    .map_err(|e| nats_err(format!("reading stream {name}"), e)),
            )
        };
        let stream_config = match read(name.clone()).await {
            Some(c) => c?,
            None => {
                let r = config.retention_limits();
                let age = r.age().unwrap_or(Duration::ZERO);
                let mut subjects = queue_subjects(config.name(), config.queue_count());
                if self.native_schedules {
                    subjects.push(schedule_definitions(config.name()));
                }
                let s = stream::Config {
                    name: name.clone(),
                    subjects,
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::Limits,
                    max_age: age,
                    max_bytes: r
                        .bytes()
                        .map_or(-1, |b| (b * config.queue_count() as u64) as i64),
                    // The idempotency window of `Publish::dedupe_key` (and
                    // of a retry with the same message id).
                    duplicate_window: config.get_dedupe_window(),
                    num_replicas: self.replicas,
                    description: Some(describe(&config)),
                    allow_message_schedules: self.native_schedules,
                    ..Default::default()
                };
                match self.js.create_stream(s).await {
                    Ok(mut s) => s
                        .info()
                        .await
                        .map(|i| i.config.clone())
                        .map_err(|e| nats_err(format!("reading stream {name}"), e))?,
                    // Created by another process meanwhile.
                    Err(e) => match read(name.clone()).await {
                        Some(c) => c?,
                        None => return Err(nats_err(format!("creating stream {name}"), e)),
                    },
                }
            }
        };
        let stored = parse_description(config.name(), stream_config.description.as_deref())?;
        let mut stream_config = self.narrow_subjects(&stored, stream_config).await;
        if explicit && stream_config.duplicate_window != config.get_dedupe_window() {
            self.set_dedupe_window(config.name(), config.get_dedupe_window())
                .await?;
            stream_config.duplicate_window = config.get_dedupe_window();
        }
        let stored = if stream_config.duplicate_window == stored.get_dedupe_window() {
            stored
        } else {
            stored.dedupe_window(stream_config.duplicate_window)
        };
        let native_horizon = match (stream_config.max_age, stream_config.max_bytes) {
            (_, b) if b > 0 => None,
            (age, _) if age.is_zero() => Some(Duration::MAX),
            // A margin for clocks and the publish itself.
            (age, _) => age.checked_sub(Duration::from_secs(60)),
        };
        let native_horizon = match native_horizon {
            Some(h) if self.native_schedules && self.enable_schedules(stream_config).await => {
                Some(h)
            }
            _ => None,
        };
        if explicit && stored.queue_count() != config.queue_count() {
            return Err(Error::TopicConflict {
                topic: config.name().to_string(),
                reason: format!(
                    "it has {} queues, not {}",
                    stored.queue_count(),
                    config.queue_count()
                ),
            });
        }
        let state = Arc::new(TopicState {
            config: stored,
            next: AtomicU64::new(0),
            native_horizon,
        });
        Ok(self
            .topics
            .entry(config.name().to_string())
            .or_insert(state)
            .clone())
    }

    /// Makes sure a topic stream takes schedule definitions (a stream made
    /// before the server was upgraded to 2.12 does not); false, with a
    /// warning, if the server refuses: that topic's delays then take the
    /// forwarder.
    pub(crate) async fn enable_schedules(&self, mut c: stream::Config) -> bool {
        let Some(topic) = c.name.strip_prefix(TOPIC_STREAM_PREFIX).and_then(dec) else {
            return false;
        };
        let defs = schedule_definitions(&topic);
        if c.allow_message_schedules && c.subjects.contains(&defs) {
            return true;
        }
        c.allow_message_schedules = true;
        if !c.subjects.contains(&defs) {
            c.subjects.push(defs);
        }
        match self.js.update_stream(c).await {
            Ok(_) => {
                info!(topic = %topic, "topic stream now takes message schedules (delays are native)");
                true
            }
            Err(e) => {
                warn!(topic = %topic, error = %e,
                    "cannot enable message schedules on the topic's stream; its delays use the forwarder");
                false
            }
        }
    }

    /// A stream made by an earlier version takes every subject under
    /// `wq.<T>.>`, so a message on a queue the topic does not have was
    /// stored where no consumer looks. Narrows it to the topic's queues
    /// (a publish elsewhere is then refused), and says how many messages
    /// are already stranded (they stay in the stream; delete them or
    /// republish them to a queue with a NATS tool). On failure the stream
    /// is used as it is, with a warning.
    async fn narrow_subjects(&self, topic: &TopicConfig, mut c: stream::Config) -> stream::Config {
        let wide = topic_subjects(topic.name());
        if !c.subjects.contains(&wide) {
            return c;
        }
        let mut subjects = queue_subjects(topic.name(), topic.queue_count());
        subjects.extend(c.subjects.iter().filter(|s| **s != wide).cloned());
        c.subjects = subjects;
        match self.js.update_stream(c.clone()).await {
            Ok(_) => info!(topic = %topic.name(), "topic stream narrowed to its queues' subjects"),
            Err(e) => {
                warn!(topic = %topic.name(), error = %e,
                    "cannot narrow the topic stream's subjects; a message published to a queue \
                     the topic does not have is still stored and never delivered");
                return c;
            }
        }
        if let Ok(s) = self.js.get_stream(c.name.clone()).await {
            use futures::TryStreamExt;
            let mut stranded = 0u64;
            if let Ok(mut subjects) = s.info_with_subjects(wide).await {
                while let Ok(Some((subject, count))) = subjects.try_next().await {
                    let ok = parse_queue_subject(&subject)
                        .is_some_and(|(q, t)| q < topic.queue_count() && !t.contains('.'));
                    if !ok {
                        stranded += count as u64;
                    }
                }
            }
            if stranded > 0 {
                warn!(topic = %topic.name(), stranded,
                    "messages stored on subjects outside the topic's queues are never \
                     delivered; move or delete them with a NATS tool");
            }
        }
        c
    }

    /// Sets the duplicate window of `topic`'s stream (the dedupe window of
    /// `Publish::dedupe_key`): keys already stored keep the window they
    /// were stored under until the server's next sweep.
    async fn set_dedupe_window(&self, topic: &str, window: Duration) -> Result<(), Error> {
        let name = topic_stream(topic);
        let mut s = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| nats_err(format!("reading stream {name}"), e))?;
        let mut c = s
            .info()
            .await
            .map_err(|e| nats_err(format!("reading stream {name}"), e))?
            .config
            .clone();
        c.duplicate_window = window;
        self.js
            .update_stream(c)
            .await
            .map_err(|e| nats_err(format!("setting the dedupe window of topic `{topic}`"), e))?;
        info!(topic, ?window, "topic's dedupe window changed");
        Ok(())
    }

    /// A topic that must exist (in this process's view or on the server).
    pub(crate) async fn known_topic(&self, topic: &str) -> Result<Arc<TopicState>, Error> {
        if let Some(t) = self.topics.get(topic) {
            return Ok(t.clone());
        }
        if self.js.get_stream(topic_stream(topic)).await.is_err() {
            return Err(Error::InvalidConfig {
                reason: format!("topic `{topic}` does not exist"),
            });
        }
        self.topic(TopicConfig::new(topic), false).await
    }
}

pub(crate) fn describe(config: &TopicConfig) -> String {
    format!(
        "weirmq topic={} queues={}",
        config.name(),
        config.queue_count()
    )
}

pub(crate) fn parse_description(topic: &str, d: Option<&str>) -> Result<TopicConfig, Error> {
    let queues = d
        .and_then(|d| d.strip_prefix("weirmq topic="))
        .and_then(|rest| rest.split(" queues=").nth(1))
        .and_then(|q| q.trim().parse::<u32>().ok())
        .ok_or_else(|| Error::InvalidConfig {
            reason: format!(
                "stream {} exists but was not made by weirmq (description {d:?}); \
                 rename or delete it",
                topic_stream(topic)
            ),
        })?;
    Ok(TopicConfig::new(topic).queues(queues))
}
