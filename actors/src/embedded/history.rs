//! Query, trace and retention on the embedded store (contract:
//! `weirmq_bus::History`): the span index (Bloom filters over ids and
//! keys), the trace tree, and a retention pass on demand.

use super::*;

#[async_trait]
impl History for EmbeddedBroker {
    async fn query_id(&self, id: MessageId) -> Result<Option<Arc<BusMessage>>, Error> {
        self.check_open()?;
        let mut topics: Vec<(Arc<str>, u32, u32)> = self
            .inner
            .topics
            .iter()
            .map(|h| (h.name.clone(), h.id, h.all_queues()))
            .collect();
        // User topics first; dead letters are copies with ids of their own.
        topics.sort_by_key(|(n, _, _)| (n.starts_with(SYSTEM_TOPIC_PREFIX), n.clone()));
        let reader = self.reader()?;
        self.blocking(move || reader.find_id(&topics, id)).await
    }

    async fn query_key(
        &self,
        topic: &str,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<BusMessage>>, Error> {
        self.check_open()?;
        let h = self.known_topic(topic)?;
        let reader = self.reader()?;
        let key = key.to_string();
        self.blocking(move || reader.find_key(&h.name, h.id, h.all_queues(), &key, max))
            .await
    }

    async fn trace(&self, id: MessageId) -> Result<Option<MessageTrace>, Error> {
        let Some(m) = self.query_id(id).await? else {
            return Ok(None);
        };
        let h = self.known_topic(m.topic())?;
        let reader = self.reader()?;
        let key = QueueKey {
            topic_id: h.id,
            queue: m.queue(),
        };
        let offset = m.offset();
        let events = self.blocking(move || reader.trace_of(key, offset)).await?;
        Ok(Some(MessageTrace {
            id,
            topic: m.topic().to_string(),
            queue: m.queue(),
            offset,
            traced: h.trace.load(Ordering::Relaxed),
            events,
        }))
    }

    async fn enforce_retention(&self) -> Result<RetentionReport, Error> {
        self.check_open()?;
        Ok(self
            .inner
            .persistence
            .send(RunRetention)
            .await
            .map_err(|_| Error::Closed)??)
    }
}
