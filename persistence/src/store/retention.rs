//! Retention: removing a queue's oldest records by age or size (and, under
//! disk pressure, those every group has acked).

use super::*;

/// What one [`Store::expire`] call removed from a queue.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Expired {
    pub(crate) records: usize,
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    /// The queue's new first offset (when something was removed).
    pub(crate) start: u64,
    /// Stopped at `max_records`: call again.
    pub(crate) more: bool,
}

impl Store {
    pub(super) fn stored_bytes(&mut self, key: QueueKey) -> Result<u64, StorageError> {
        if let Some(b) = self.queue_bytes.get(&key) {
            return Ok(*b);
        }
        let mut total = self.spans.get(&key).map_or(0, |s| s.summary.bytes());
        for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (_, v) = item.map_err(failure::sled("reading the index"))?;
            total += Summary::decode(&v)?.bytes as u64;
        }
        self.queue_bytes.insert(key, total);
        Ok(total)
    }

    /// Removes up to `max_spans` of a queue's oldest spans (whole records,
    /// up to ~1,000 messages) that the retention limits expire, never one
    /// holding an offset at or above `keep_from`; records the new first
    /// offset. The queue's open span (its newest messages) is closed first
    /// when it is expired too. Returns what it removed and whether more may
    /// be due.
    pub(crate) fn expire(
        &mut self,
        key: QueueKey,
        cutoff_ms: Option<u64>,
        max_bytes: Option<u64>,
        keep_from: u64,
        max_spans: usize,
    ) -> Result<Expired, StorageError> {
        let mut total = match max_bytes {
            Some(_) => self.stored_bytes(key)?,
            None => 0,
        };
        // The newest messages are in the open span: close it if they have
        // expired (a quiet queue) or the closed spans cannot bring the queue
        // under its size limit.
        let open_expired = self.spans.get(&key).is_some_and(|s| {
            cutoff_ms.is_some_and(|c| s.summary.max_born() < c)
                || max_bytes.is_some_and(|m| total.saturating_sub(s.summary.bytes()) > m)
        });
        if open_expired {
            if let Some((k, v)) = self.close_span(key) {
                self.index
                    .insert(&k[..], v)
                    .map_err(failure::sled("writing the index"))?;
            }
        }
        let mut out = Expired::default();
        let mut log = crate::kv::Batch::default();
        let mut index = crate::kv::Batch::default();
        let mut trace = crate::kv::Batch::default();
        let mut new_start = None;
        for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            if out.records >= max_spans {
                out.more = true;
                break;
            }
            let (k, v) = item.map_err(failure::sled("reading the index"))?;
            let first = offset_of(&k)?;
            let s = Summary::decode(&v)?;
            let end = first + s.count as u64;
            let old = cutoff_ms.is_some_and(|c| s.max_born < c);
            let big = max_bytes.is_some_and(|m| total > m);
            if !(old || big) || end > keep_from {
                break;
            }
            for r in self.log.range(key.log_key(first)..key.log_key(end)).keys() {
                log.remove(r.map_err(failure::sled("reading the queue log"))?);
            }
            index.remove(&k[..]);
            for t in self
                .trace
                .range(key.trace_key(first, 0)..key.trace_key(end, 0))
                .keys()
            {
                trace.remove(t.map_err(failure::sled("reading the trace"))?);
            }
            total = total.saturating_sub(s.bytes as u64);
            out.records += 1;
            out.messages += s.count as u64;
            out.bytes += s.bytes as u64;
            new_start = Some(end);
        }
        if let Some(start) = new_start {
            self.log
                .apply_batch(log)
                .map_err(failure::sled("removing expired records"))?;
            self.index
                .apply_batch(index)
                .map_err(failure::sled("removing expired summaries"))?;
            self.trace
                .apply_batch(trace)
                .map_err(failure::sled("removing expired traces"))?;
            self.meta
                .insert(key.start_key(), &start.to_be_bytes())
                .map_err(failure::sled("writing a queue's start"))?;
            if let Some(b) = self.queue_bytes.get_mut(&key) {
                *b = b.saturating_sub(out.bytes);
            }
            out.start = start;
        }
        Ok(out)
    }
}
