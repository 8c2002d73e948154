//! The `trace` tree: one event per step of a traced message's life.

use super::*;

/// A trace event of the message at `offset` of queue `key`.
#[derive(Debug, Clone)]
pub struct TraceRecord {
    /// The message's queue.
    pub key: QueueKey,
    /// The message's offset.
    pub offset: u64,
    /// What happened.
    pub event: TraceEvent,
}

impl Store {
    /// The trace tree's batch for `events` (each gets the next sequence
    /// number, so a message's events read back in the order recorded).
    pub(crate) fn trace_batch(&mut self, events: &[TraceRecord]) -> crate::kv::Batch {
        let mut b = crate::kv::Batch::default();
        for e in events {
            self.trace_seq += 1;
            b.insert(
                &e.key.trace_key(e.offset, self.trace_seq)[..],
                encode_trace(&e.event),
            );
        }
        b
    }
}

impl StoreReader {
    /// The trace events of the message at `offset` of a queue, in the order
    /// recorded.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn trace_of(&self, key: QueueKey, offset: u64) -> Result<Vec<TraceEvent>, StorageError> {
        self.located(|| {
            self.trace
                .range(key.trace_key(offset, 0)..=key.trace_key(offset, u64::MAX))
                .values()
                .map(|v| decode_trace(&v.map_err(failure::sled("reading the trace"))?))
                .collect()
        })
    }
}
