//! The topic registry: what the broker knows of each topic (its actors,
//! queue ends, outbox and settings), and how topics are created and
//! reconfigured. Shared by every role; one topic is created at a time.

use super::*;

/// What the broker knows of a topic; shared by every publisher.
#[derive(Debug)]
pub(super) struct Topic {
    pub(super) name: Arc<str>,
    pub(super) id: u32,
    /// Its queue count as configured (without the priority lanes).
    pub(super) queues: u32,
    pub(super) addr: Addr<TopicActor>,
    /// Its queues, then its priority lanes (`weirmq_bus::priority_queue`).
    pub(super) queue_addrs: Vec<Addr<QueueActor>>,
    /// The next offset of each queue and lane.
    pub(super) ends: Vec<Arc<AtomicU64>>,
    /// Publishes waiting to be sent to the topic actor in one message.
    pub(super) outbox: Mutex<Vec<PublishPart>>,
    /// Retention and trace, as last configured.
    pub(super) settings: Mutex<TopicSettings>,
    /// The trace switch, read by its queue and group actors.
    pub(super) trace: Arc<AtomicBool>,
    /// Idempotency keys whose window is open (`Publish::dedupe_key`).
    pub(super) dedupe: Mutex<super::dedupe::Keys>,
}

pub(super) type TopicHandle = Arc<Topic>;

impl Topic {
    /// How many queues it keeps: its own and its priority lanes.
    pub(super) fn all_queues(&self) -> u32 {
        self.ends.len() as u32
    }

    /// Whether queue `q` is worth showing an operator: one of the topic's
    /// own queues, or a priority lane that has held a message.
    pub(super) fn shown(&self, q: u32, end: u64) -> bool {
        q < self.queues || end > 0
    }

    /// The topic's configuration, as last set.
    pub(super) fn config(&self) -> TopicConfig {
        let s = self
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let c = TopicConfig::new(self.name.to_string())
            .queues(self.queues)
            .retention(s.retention)
            .trace(s.trace);
        match s.dedupe_window {
            Some(w) => c.dedupe_window(w),
            None => c,
        }
    }

    /// How long an idempotency key is remembered, as last configured.
    pub(super) fn dedupe_window(&self) -> std::time::Duration {
        self.config().get_dedupe_window()
    }

    /// Sends everything in the outbox to the topic actor as one message.
    pub(super) fn send_outbox(&self) {
        let parts = std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()));
        if !parts.is_empty() {
            self.addr.do_send(TopicPublish { parts });
        }
    }
}

/// Sends the outbox when dropped, so a publisher whose future is dropped
/// while it waits never strands the publishes of others.
pub(super) struct OutboxSender<'a>(pub(super) &'a Topic);

impl Drop for OutboxSender<'_> {
    fn drop(&mut self) {
        self.0.send_outbox();
    }
}

pub(super) fn spawn_topic(
    arbiter: &ArbiterHandle,
    persistence: &Addr<PersistenceActor>,
    name: &str,
    id: u32,
    queues: u32,
    ends: Vec<u64>,
    settings: TopicSettings,
) -> TopicHandle {
    debug_assert_eq!(ends.len() as u32, weirmq_bus::queues_with_lanes(queues));
    let trace = Arc::new(AtomicBool::new(settings.trace));
    let ends: Vec<Arc<AtomicU64>> = ends
        .into_iter()
        .map(|e| Arc::new(AtomicU64::new(e)))
        .collect();
    let queue_addrs: Vec<Addr<QueueActor>> = ends
        .iter()
        .enumerate()
        .map(|(q, end)| {
            let key = QueueKey {
                topic_id: id,
                queue: q as u32,
            };
            let end = end.clone();
            let p = persistence.clone();
            let t = trace.clone();
            QueueActor::start_in_arbiter(arbiter, move |_| QueueActor::new(key, end, p, t))
        })
        .collect();
    let qa = queue_addrs.clone();
    let lanes = !name.starts_with(SYSTEM_TOPIC_PREFIX);
    let addr = TopicActor::start_in_arbiter(arbiter, move |_| TopicActor::new(qa, queues, lanes));
    Arc::new(Topic {
        name: Arc::from(name),
        id,
        queues,
        addr,
        queue_addrs,
        ends,
        outbox: Mutex::new(Vec::new()),
        settings: Mutex::new(settings),
        trace,
        dedupe: Mutex::new(Default::default()),
    })
}

impl EmbeddedBroker {
    pub(super) async fn topic(
        &self,
        config: TopicConfig,
        system: bool,
    ) -> Result<TopicHandle, Error> {
        if system {
            config.validate_system()?;
        } else {
            config.validate()?;
        }
        let settings = TopicSettings {
            retention: config.retention_limits(),
            trace: config.traced(),
            dedupe_window: config.dedupe_window_set(),
        };
        if let Some(h) = self.inner.topics.get(config.name()) {
            let h = h.clone();
            if h.queues != config.queue_count() {
                return Err(Error::TopicConflict {
                    topic: config.name().to_string(),
                    reason: format!(
                        "it has {} queues, {} were asked for",
                        h.queues,
                        config.queue_count()
                    ),
                });
            }
            self.configure(&h, settings).await?;
            return Ok(h);
        }
        self.check_open()?;
        let _guard = self.inner.create_lock.lock().await;
        if let Some(h) = self.inner.topics.get(config.name()) {
            return Ok(h.clone());
        }
        let id = self
            .inner
            .persistence
            .send(CreateTopic {
                name: config.name().to_string(),
                queues: config.queue_count(),
                settings: settings.clone(),
            })
            .await
            .map_err(|_| Error::Closed)??;
        let h = spawn_topic(
            &self.inner.broker_arbiter,
            &self.inner.persistence,
            config.name(),
            id,
            config.queue_count(),
            vec![0; weirmq_bus::queues_with_lanes(config.queue_count()) as usize],
            settings,
        );
        info!(
            topic = config.name(),
            queues = config.queue_count(),
            "topic created"
        );
        self.inner
            .topics
            .insert(config.name().to_string(), h.clone());
        Ok(h)
    }

    /// Applies new retention and trace settings to an existing topic.
    pub(super) async fn configure(&self, h: &Topic, settings: TopicSettings) -> Result<(), Error> {
        let same = *h.settings.lock().unwrap_or_else(|p| p.into_inner()) == settings;
        if same {
            return Ok(());
        }
        self.check_open()?;
        let _guard = self.inner.create_lock.lock().await;
        self.inner
            .persistence
            .send(ConfigureTopic {
                name: h.name.to_string(),
                id: h.id,
                queues: h.queues,
                settings: settings.clone(),
            })
            .await
            .map_err(|_| Error::Closed)??;
        h.trace.store(settings.trace, Ordering::Relaxed);
        info!(topic = %h.name, ?settings, "topic reconfigured");
        *h.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        Ok(())
    }

    pub(super) async fn existing_or_default(
        &self,
        name: &str,
        system: bool,
    ) -> Result<TopicHandle, Error> {
        if let Some(h) = self.inner.topics.get(name) {
            return Ok(h.clone());
        }
        // Dead-letter topics have one queue: their order is the order of death.
        let queues = if system {
            1
        } else {
            weirmq_bus::DEFAULT_QUEUES
        };
        self.topic(TopicConfig::new(name).queues(queues), system)
            .await
    }
}
