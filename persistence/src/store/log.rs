//! The `log` tree: records (the envelopes of consecutive messages of one
//! queue, one record per queue per commit), how they are built, decoded,
//! read back by range and purged.

use super::*;

pub(super) fn offset_of(key: &[u8]) -> Result<u64, StorageError> {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::msg("queue log key is corrupt"))
}

pub(super) fn record_count(v: &[u8]) -> Result<u32, StorageError> {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StorageError::msg("queue log record is corrupt (no header)"))
}

/// Decodes the messages of a record for which `want(offset)` holds.
pub(super) fn decode_record(
    topic: &Arc<str>,
    queue: u32,
    first: u64,
    v: &[u8],
    mut want: impl FnMut(u64) -> bool,
) -> Result<Vec<Arc<Message>>, StorageError> {
    let count = record_count(v)?;
    let mut pos = 4usize;
    let mut out = Vec::new();
    for i in 0..count as u64 {
        let len = v
            .get(pos..pos + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| {
                StorageError::msg(format!(
                    "queue log record at offset {first} is truncated at message {i}"
                ))
            })? as usize;
        pos += 4;
        let body = v.get(pos..pos + len).ok_or_else(|| {
            StorageError::msg(format!(
                "queue log record at offset {first} is truncated at message {i}"
            ))
        })?;
        pos += len;
        if want(first + i) {
            let (m, _) = Message::decode_envelope(topic.clone(), queue, first + i, body)?;
            out.push(Arc::new(m));
        }
    }
    Ok(out)
}

/// Builds the records of one commit: consecutive messages of a queue go into
/// one record up to [`RecordBuilder::MAX_MESSAGES`] messages or
/// [`RecordBuilder::MAX_BYTES`] bytes.
#[derive(Debug, Default)]
pub(crate) struct RecordBuilder {
    pub(super) open: BTreeMap<QueueKey, (u64, u32, Vec<u8>, SummaryBuilder)>,
    pub(super) batch: crate::kv::Batch,
    pub(super) closed: Vec<ClosedRecord>,
}

impl RecordBuilder {
    pub(crate) const MAX_MESSAGES: u32 = 512;
    /// Small records keep memory bounded when a backlog is read back: sled
    /// caches whole leaves of records and evicts lazily, so with 64 KiB
    /// records a drained 750k-message backlog peaked at 368 MiB RSS, with
    /// 8 KiB at ~130 MiB (64 MiB cache), at no cost in throughput
    /// (docs/delivery.md, "Memory").
    pub(crate) const MAX_BYTES: usize = 8 * 1024;

    pub(crate) fn push(&mut self, key: QueueKey, offset: u64, m: &Message) {
        if let Some((first, count, buf, _)) = self.open.get(&key) {
            let contiguous = first + *count as u64 == offset;
            if !contiguous
                || *count >= Self::MAX_MESSAGES
                || buf.len() + m.size_hint() > Self::MAX_BYTES
            {
                self.close(key);
            }
        }
        let (_, count, buf, summary) = self.open.entry(key).or_insert_with(|| {
            // Room for a full record (and the message that closes it) up
            // front: growing by doubling copied each record ~5 times.
            let mut buf = Vec::with_capacity(Self::MAX_BYTES + m.size_hint());
            buf.extend_from_slice(&0u32.to_be_bytes());
            (offset, 0, buf, SummaryBuilder::default())
        });
        let at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        m.encode_envelope(buf);
        let len = buf.len() - at - 4;
        buf[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
        summary.add(m, len);
        *count += 1;
    }

    pub(super) fn close(&mut self, key: QueueKey) {
        if let Some((first, count, mut buf, summary)) = self.open.remove(&key) {
            buf[..4].copy_from_slice(&count.to_be_bytes());
            self.batch.insert(&key.log_key(first), buf);
            self.closed.push(ClosedRecord {
                key,
                first,
                summary,
            });
        }
    }

    pub(crate) fn finish(mut self) -> Records {
        let keys: Vec<QueueKey> = self.open.keys().copied().collect();
        for k in keys {
            self.close(k);
        }
        Records {
            log: self.batch,
            closed: self.closed,
        }
    }
}

/// A record of a commit, as the index needs it.
#[derive(Debug)]
pub(crate) struct ClosedRecord {
    pub(super) key: QueueKey,
    pub(super) first: u64,
    pub(super) summary: SummaryBuilder,
}

/// What a commit's records hold.
#[derive(Debug)]
pub(crate) struct Records {
    pub(crate) log: crate::kv::Batch,
    /// The records, for [`Store::index_records`].
    pub(crate) closed: Vec<ClosedRecord>,
}

impl Store {
    /// Deletes every record of `key`'s queue and every delay-index key under
    /// `marks`; returns how many messages were deleted.
    pub(crate) fn purge_queue(&mut self, key: QueueKey, marks: &[u8]) -> Result<u64, StorageError> {
        let mut log = crate::kv::Batch::default();
        let mut index = crate::kv::Batch::default();
        let mut n = 0u64;
        let mut end = None;
        for item in self.log.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
            let count = record_count(&v)? as u64;
            n += count;
            end = Some(offset_of(&k)? + count);
            index.remove(&k);
            log.remove(k);
        }
        let mut delay = crate::kv::Batch::default();
        for item in self.delay.scan_prefix(marks) {
            let (k, _) = item.map_err(failure::sled("reading the delay index"))?;
            delay.remove(k);
        }
        let mut trace = crate::kv::Batch::default();
        for k in self
            .trace
            .range(key.trace_key(0, 0)..=key.trace_key(u64::MAX, u64::MAX))
            .keys()
        {
            trace.remove(k.map_err(failure::sled("reading the trace"))?);
        }
        self.write(CommitWrites {
            index: Some(index),
            trace: Some(trace),
            delay: Some(delay),
            ..CommitWrites::log(log)
        })?;
        if let Some(end) = end {
            // Offsets go on from where they were after a reopen.
            self.meta
                .insert(key.start_key(), &end.to_be_bytes())
                .map_err(failure::sled("writing a queue's start"))?;
        }
        self.queue_bytes.remove(&key);
        self.spans.remove(&key);
        Ok(n)
    }
}

impl StoreReader {
    /// Reads up to `max` messages of a queue from offset `from` (inclusive)
    /// to `end` (exclusive).
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or a record does not decode.
    pub fn read_range(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, StorageError> {
        self.located(|| {
            let mut out = Vec::new();
            if from >= end || max == 0 {
                return Ok(out);
            }
            let lo = key.log_key(0);
            let hi = key.log_key(u64::MAX);
            let start = match self.log.range(lo..=key.log_key(from)).next_back() {
                Some(item) => item
                    .map_err(failure::sled("reading the queue log"))?
                    .0
                    .to_vec(),
                None => lo.to_vec(),
            };
            for item in self.log.range(start..=hi.to_vec()) {
                let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
                let first = offset_of(&k)?;
                if first >= end || out.len() >= max {
                    break;
                }
                let room = max - out.len();
                let mut taken = 0usize;
                let msgs = decode_record(topic, key.queue, first, &v, |o| {
                    let ok = o >= from && o < end && taken < room;
                    taken += ok as usize;
                    ok
                })?;
                out.extend(msgs);
            }
            Ok(out)
        })
    }

    /// How many messages a queue holds (counts records, decodes nothing).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn count(&self, key: QueueKey) -> Result<u64, StorageError> {
        self.located(|| {
            let mut n = 0;
            for item in self.log.range(key.log_key(0)..=key.log_key(u64::MAX)) {
                let (_, v) = item.map_err(failure::sled("reading the queue log"))?;
                n += record_count(&v)? as u64;
            }
            Ok(n)
        })
    }

    /// The first offset in `[start, end)` of a queue whose message was
    /// published at or after `ms` (Unix milliseconds), or `end` if none:
    /// a binary search over publish times (monotonic per queue to the
    /// millisecond).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn offset_at_time(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        start: u64,
        end: u64,
        ms: u64,
    ) -> Result<u64, StorageError> {
        self.located(|| {
            let (mut lo, mut hi) = (start, end);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let born = self
                    .read_range(topic, key, mid, mid + 1, 1)?
                    .first()
                    .map(|m| weirmq_bus::unix_ms(m.born_at()));
                match born {
                    Some(b) if b >= ms => hi = mid,
                    Some(_) => lo = mid + 1,
                    // A hole (purged range): look after it.
                    None => lo = mid + 1,
                }
            }
            Ok(lo)
        })
    }
}
