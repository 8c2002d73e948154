//! Topics, positions, resets, stats and reads (contract:
//! `weirmq_bus::Admin`).

use super::*;

impl Bus {
    /// Creates a topic with this configuration, or checks that the existing
    /// one matches. Topics are also created with defaults on first use.
    ///
    /// # Errors
    ///
    /// Invalid name or queue count, [`Error::TopicConflict`], or a storage
    /// error.
    pub async fn create_topic(&self, config: TopicConfig) -> Result<(), Error> {
        self.inner.broker.ensure_topic(config).await.map(|_| ())
    }

    /// The group's committed position and lag in each queue of `topic`.
    ///
    /// # Errors
    ///
    /// An invalid group name, an unknown topic, or a storage error.
    pub async fn positions(&self, group: &str, topic: &str) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        self.inner.broker.positions(group, topic).await
    }

    /// Moves `group`'s position in every queue of `topic` — to the first
    /// stored message (replay), the end (skip the backlog), or the first
    /// message published at or after an instant. A running subscription
    /// picks it up at once; returns the new positions.
    ///
    /// # Errors
    ///
    /// An unknown topic or invalid group name, or a storage error.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(bus: weirmq::Bus) -> Result<(), weirmq::Error> {
    /// use std::time::{Duration, SystemTime};
    /// use weirmq::ResetTo;
    /// let yesterday = SystemTime::now() - Duration::from_secs(24 * 3600);
    /// bus.reset_offsets("analytics", "orders", ResetTo::Time(yesterday)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<QueuePosition>, Error> {
        validate_group_name(group)?;
        self.inner.broker.reset_offsets(group, topic, to).await
    }

    /// Counters of the running subscription of `group` to `topic` in this
    /// process (zeros if none, or if the names are not valid: no
    /// subscription can have them).
    pub async fn group_stats(&self, group: &str, topic: &str) -> GroupStats {
        self.inner.broker.group_stats(group, topic).await
    }

    /// Reads up to `max` stored messages of one queue from offset `from`.
    /// Works for system topics too (`%DLQ%<group>`).
    ///
    /// # Errors
    ///
    /// An unknown topic or queue, or a storage error.
    pub async fn read_queue(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, Error> {
        self.inner.broker.read_queue(topic, queue, from, max).await
    }

    /// The topics that exist, with their queue counts, retention and trace
    /// settings.
    pub async fn topics(&self) -> Vec<TopicConfig> {
        self.inner.broker.topics().await
    }

    /// Every consumer group with a position stored in the backend, and
    /// every group subscribed through this bus (also one that has not
    /// stored a position yet), with its topic; sorted by group then topic.
    /// Broadcast groups keep one position per member and show as their
    /// members' groups.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub async fn groups(&self) -> Result<Vec<GroupTopic>, Error> {
        let mut all: std::collections::BTreeSet<GroupTopic> =
            self.inner.broker.groups().await?.into_iter().collect();
        let watched = self
            .inner
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.extend(
            watched
                .into_iter()
                .map(|(group, topic)| GroupTopic { group, topic }),
        );
        Ok(all.into_iter().collect())
    }

    /// What each queue of `topic` holds (first and next offset, message
    /// count) and how many bytes the topic takes. Reads summaries, not
    /// messages: cheap for any queue length.
    ///
    /// # Errors
    ///
    /// An unknown topic ([`Error::InvalidConfig`]) or a storage error.
    pub async fn topic_stats(&self, topic: &str) -> Result<TopicStats, Error> {
        self.inner.broker.topic_stats(topic).await
    }
}
