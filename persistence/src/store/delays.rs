//! Reading the `delay` tree: retry entries, staged (delayed and half)
//! messages, and dead letters' "resent" marks (their encoding is in
//! `crate::delay`).

use super::*;

impl Store {
    /// The lowest offset each queue's retry entries name.
    pub(crate) fn retry_floors(&self) -> Result<HashMap<QueueKey, u64>, StorageError> {
        crate::delay::retry_floors(&self.delay)
    }
}

impl StoreReader {
    /// The DLQ offsets of `group`'s dead letters already resent.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn resent(&self, group: &str) -> Result<HashSet<u64>, StorageError> {
        self.located(|| {
            let prefix = crate::delay::resent_prefix(group);
            let mut out = HashSet::new();
            for item in self.delay.scan_prefix(&prefix) {
                let (k, _) = item.map_err(failure::sled("reading the delay index"))?;
                let off = k
                    .get(prefix.len()..prefix.len() + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StorageError::msg("a resent mark is corrupt"))?;
                out.insert(off);
            }
            Ok(out)
        })
    }

    /// Up to `limit` delayed-message entries in due order, after `after`.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn load_schedule(
        &self,
        after: Option<&crate::ScheduleEntry>,
        limit: usize,
    ) -> Result<Vec<crate::ScheduleEntry>, StorageError> {
        self.located(|| crate::delay::load_schedule(&self.delay, after, limit))
    }

    /// The stored schedule entry with `probe`'s seq (at its key, or moved
    /// to a later time), if any.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn schedule_entry(
        &self,
        probe: &crate::ScheduleEntry,
    ) -> Result<Option<crate::ScheduleEntry>, StorageError> {
        self.located(|| crate::delay::find_schedule(&self.delay, probe))
    }

    /// The retry entries of `group` on topic `topic_id`, in due order.
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or an entry does not decode.
    pub fn load_retries(
        &self,
        group: &str,
        topic_id: u32,
    ) -> Result<Vec<crate::RetryEntry>, StorageError> {
        self.located(|| crate::delay::load_retries(&self.delay, group, topic_id))
    }
}
