//! The `app-state` tree: the application's own keys (the local outbox),
//! written in one transaction with their message's record (sled's, or
//! both maps locked in memory).

use super::*;

impl Store {
    /// Applies state writes that came without a message, in one batch of
    /// the state tree (atomic: all or none survive a crash).
    pub(crate) fn write_state(&mut self, batch: crate::kv::Batch) -> Result<(), StorageError> {
        self.state
            .apply_batch(batch)
            .map_err(failure::sled("writing application state"))
    }

    /// Writes a commit's log records together with the application's state
    /// writes in one sled transaction; then their index summaries.
    pub(crate) fn write_with_state(
        &mut self,
        log: crate::kv::Batch,
        ops: &[weirmq_bus::StateOp],
        index: Option<crate::kv::Batch>,
    ) -> Result<(), StorageError> {
        use sled::transaction::TransactionError;
        let ops: Vec<(&[u8], Option<&[u8]>)> = ops
            .iter()
            .map(|op| match op {
                weirmq_bus::StateOp::Put { key, value } => (key.as_slice(), Some(value.as_slice())),
                weirmq_bus::StateOp::Delete { key } => (key.as_slice(), None),
            })
            .collect();
        let r = self.log.apply_with(log, &self.state, &ops);
        r.map_err(|e| match e {
            TransactionError::Storage(e) => {
                failure::sled_error("writing a message with application state", e)
            }
            TransactionError::Abort(()) => StorageError::msg("an outbox transaction was aborted"),
        })?;
        if let Some(i) = index {
            self.index
                .apply_batch(i)
                .map_err(failure::sled("writing the index"))?;
        }
        Ok(())
    }
}

/// Inbox marks are kept this long past their topic's retention age (a
/// message still held back by retention can be delivered a little longer).
pub(crate) const INBOX_MARK_MARGIN_MS: u64 = 10 * 60 * 1000;

/// The most inbox marks one retention pass removes (the rest: next pass).
const INBOX_MARKS_PER_PASS: usize = 100_000;

impl Store {
    /// Removes the inbox's processed marks (`weirmq_bus::inbox_key`)
    /// written longer ago than their topic's retention age plus
    /// [`INBOX_MARK_MARGIN_MS`]: a mark is written after its message was
    /// born, so retention has removed that message (or is about to), and
    /// nothing can deliver it again. Marks of a topic without an age limit
    /// are kept. Within a topic and group, marks sort by their message's
    /// id (its time), so a pass stops at a group's first mark still needed
    /// and reads little more than what it removes.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub(crate) fn purge_inbox_marks(&self, now_ms: u64) -> Result<usize, StorageError> {
        let mut batch = crate::kv::Batch::default();
        let mut n = 0;
        for item in self.meta.scan_prefix(TOPIC_PREFIX) {
            let (k, v) = item.map_err(failure::sled("reading topics"))?;
            let name = String::from_utf8_lossy(&k[TOPIC_PREFIX.len()..]).into_owned();
            let (_, _, settings) = decode_topic(&name, &v)?;
            let Some(age) = settings.retention.age() else {
                continue;
            };
            let cutoff = now_ms
                .saturating_sub(age.as_millis() as u64)
                .saturating_sub(INBOX_MARK_MARGIN_MS);
            let mut topic = weirmq_bus::INBOX_PREFIX.to_vec();
            topic.extend_from_slice(name.as_bytes());
            topic.push(0);
            let mut from = topic.clone();
            while n < INBOX_MARKS_PER_PASS {
                let Some(item) = self.state.range(from.clone()..).next() else {
                    break;
                };
                let (k, v) = item.map_err(failure::sled("reading inbox marks"))?;
                if !k.starts_with(&topic) || k.len() < topic.len() + 17 {
                    break;
                }
                // When it was written (the bus's clock; a mark from an older
                // format: its message id's time).
                let written = v.get(..8).and_then(|b| b.try_into().ok()).map_or_else(
                    || {
                        let id = k[k.len() - 16..].try_into().unwrap_or([0; 16]);
                        MessageId::from_u128(u128::from_be_bytes(id)).timestamp_ms()
                    },
                    u64::from_be_bytes,
                );
                if written < cutoff {
                    batch.remove(&k[..]);
                    n += 1;
                    from = k.to_vec();
                    from.push(0);
                } else {
                    // The rest of this group's marks are newer: on to the
                    // next group (names hold no 0 or 1 bytes).
                    from = k[..k.len() - 16].to_vec();
                    if let Some(last) = from.last_mut() {
                        *last = 1;
                    }
                }
            }
        }
        if n > 0 {
            self.state
                .apply_batch(batch)
                .map_err(failure::sled("removing inbox marks"))?;
        }
        Ok(n)
    }
}

impl StoreReader {
    /// One key of the application's state.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.located(|| {
            Ok(self
                .state
                .get(key)
                .map_err(failure::sled("reading application state"))?
                .map(|v| v.to_vec()))
        })
    }

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, StorageError> {
        self.located(|| {
            self.state
                .scan_prefix(prefix)
                .map(|kv| {
                    kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(failure::sled("reading application state"))
                })
                .collect()
        })
    }
}
