//! The `index` tree: span summaries (count, bytes, publish times, a Bloom
//! filter over ids and keys) that let queries and retention skip whole
//! spans of records; a queue's newest records are summarised as they come.

use super::*;

/// A queue's newest records, not summarised in the index yet.
#[derive(Debug)]
pub(super) struct Span {
    pub(super) first: u64,
    pub(super) summary: SummaryBuilder,
}

impl Store {
    /// Rebuilds a queue's open span from the records after its last written
    /// summary (the tail not summarised yet; for a store written before
    /// summaries existed, the whole log, written as spans as it goes).
    pub(super) fn rebuild_span(&mut self, key: QueueKey) -> Result<(), StorageError> {
        let from = match self
            .index
            .range(key.log_key(0)..=key.log_key(u64::MAX))
            .next_back()
        {
            Some(item) => {
                let (k, v) = item.map_err(failure::sled("reading the index"))?;
                offset_of(&k)? + Summary::decode(&v)?.count as u64
            }
            None => 0,
        };
        // Spans are whole records: the tail starts with a record at `from`.
        let start = key.log_key(from);
        let mut index = crate::kv::Batch::default();
        let mut written = 0usize;
        let topic: Arc<str> = Arc::from("");
        for item in self.log.range(start..=key.log_key(u64::MAX)) {
            let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
            let first = offset_of(&k)?;
            let mut sb = SummaryBuilder::default();
            for m in decode_record(&topic, key.queue, first, &v, |_| true)? {
                sb.add(&m, m.size_hint());
            }
            if let Some((span_key, summary)) = self.extend_span(key, first, sb) {
                index.insert(&span_key[..], summary);
                written += 1;
            }
        }
        if written > 0 {
            tracing::info!(?key, spans = written, "index summaries rebuilt");
            self.index
                .apply_batch(index)
                .map_err(failure::sled("writing the index"))?;
        }
        Ok(())
    }

    /// Adds a record to its queue's open span; returns a span's summary to
    /// write if one is complete: the open one when the record comes too late
    /// for it (by publish time), or the span with the record when it is full.
    pub(super) fn extend_span(
        &mut self,
        key: QueueKey,
        first: u64,
        summary: SummaryBuilder,
    ) -> Option<([u8; 16], Vec<u8>)> {
        if let Some(b) = self.queue_bytes.get_mut(&key) {
            *b += summary.bytes();
        }
        let late = self.spans.get(&key).is_some_and(|s| {
            s.summary.count() > 0 && summary.max_born() >= s.summary.min_born() + SPAN_MILLIS
        });
        if late {
            let done = self.close_span(key);
            self.spans.insert(key, Span { first, summary });
            return done;
        }
        let span = self.spans.entry(key).or_insert_with(|| Span {
            first,
            summary: SummaryBuilder::default(),
        });
        if span.first + span.summary.count() as u64 != first {
            // Not contiguous (cannot happen: offsets are dense); start over.
            tracing::warn!(?key, span = span.first, first, "index span restarted");
            *span = Span {
                first,
                summary: SummaryBuilder::default(),
            };
        }
        span.summary.merge(summary);
        if span.summary.count() >= SPAN_MESSAGES || span.summary.bytes() >= SPAN_BYTES {
            self.close_span(key)
        } else {
            None
        }
    }

    /// Takes a queue's open span out as (index key, summary).
    pub(super) fn close_span(&mut self, key: QueueKey) -> Option<([u8; 16], Vec<u8>)> {
        let span = self.spans.remove(&key)?;
        (span.summary.count() > 0).then(|| (key.log_key(span.first), span.summary.finish()))
    }

    /// The index batch for a commit's records: their spans' summaries, for
    /// the spans they filled.
    pub(crate) fn index_records(&mut self, records: Vec<ClosedRecord>) -> Option<crate::kv::Batch> {
        let mut batch = None;
        for r in records {
            if let Some((k, v)) = self.extend_span(r.key, r.first, r.summary) {
                batch
                    .get_or_insert_with(crate::kv::Batch::default)
                    .insert(&k[..], v);
            }
        }
        batch
    }
}

impl StoreReader {
    /// Finds the message with `id` in the given queues (`(topic name, key,
    /// how many queues to look in — priority lanes included)`): reads record summaries and decodes only the records
    /// whose filter matches.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn find_id(
        &self,
        topics: &[(Arc<str>, u32, u32)],
        id: MessageId,
    ) -> Result<Option<Arc<Message>>, StorageError> {
        self.located(|| {
            for (name, topic_id, queues) in topics {
                for queue in 0..*queues {
                    let key = QueueKey {
                        topic_id: *topic_id,
                        queue,
                    };
                    let mut found = None;
                    self.scan_matching(name, key, Probe::Id(id), |m| {
                        if m.id() == id {
                            found = Some(m.clone());
                        }
                        found.is_none()
                    })?;
                    if found.is_some() {
                        return Ok(found);
                    }
                }
            }
            Ok(None)
        })
    }

    /// Up to `max` messages of a topic's first `queues` queues (priority
    /// lanes included when counted in) carrying `key`, oldest first.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn find_key(
        &self,
        topic: &Arc<str>,
        topic_id: u32,
        queues: u32,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, StorageError> {
        self.located(|| {
            let mut out = Vec::new();
            for queue in 0..queues {
                let qk = QueueKey { topic_id, queue };
                self.scan_matching(topic, qk, Probe::Key(key), |m| {
                    if m.keys().iter().any(|k| k == key) {
                        out.push(m.clone());
                    }
                    true
                })?;
            }
            out.sort_by_key(|m| (m.born_at(), m.queue(), m.offset()));
            out.truncate(max);
            Ok(out)
        })
    }

    /// Calls `f` on every message of the spans whose summary may contain
    /// `probe`, and of the queue's tail not summarised yet, until `f`
    /// returns false.
    pub(super) fn scan_matching(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        probe: Probe<'_>,
        mut f: impl FnMut(&Arc<Message>) -> bool,
    ) -> Result<(), StorageError> {
        let mut visit = |from: u64, to: u64| -> Result<bool, StorageError> {
            for item in self.log.range(key.log_key(from)..key.log_key(to)) {
                let (k, record) = item.map_err(failure::sled("reading the queue log"))?;
                let first = offset_of(&k)?;
                for m in decode_record(topic, key.queue, first, &record, |_| true)? {
                    if !f(&m) {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        };
        let mut tail = 0;
        for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (k, v) = item.map_err(failure::sled("reading the index"))?;
            let first = offset_of(&k)?;
            let summary = Summary::decode(&v)?;
            let end = first + summary.count as u64;
            tail = end;
            if summary.may_contain(probe) && !visit(first, end)? {
                return Ok(());
            }
        }
        visit(tail, u64::MAX)?;
        Ok(())
    }
}

impl StoreReader {
    /// How many messages a queue holds and how many bytes they take: the
    /// index summaries' counts and sizes, plus the records after the last
    /// summary (the open span, counted by record size). Reads one summary
    /// per span and the last span's records: cheap at any queue length.
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or a summary or record is corrupt.
    pub fn queue_usage(&self, key: QueueKey) -> Result<(u64, u64), StorageError> {
        self.located(|| {
            let (mut messages, mut bytes, mut summarised_to) = (0u64, 0u64, 0u64);
            for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
                let (k, v) = item.map_err(failure::sled("reading the index"))?;
                let s = Summary::decode(&v)?;
                messages += s.count as u64;
                bytes += s.bytes as u64;
                summarised_to = offset_of(&k)? + s.count as u64;
            }
            for item in self
                .log
                .range(key.log_key(summarised_to)..=key.log_key(u64::MAX))
            {
                let (_, v) = item.map_err(failure::sled("reading the queue log"))?;
                messages += record_count(&v)? as u64;
                bytes += v.len() as u64;
            }
            Ok((messages, bytes))
        })
    }
}
