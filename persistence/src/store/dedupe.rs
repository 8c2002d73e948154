//! Idempotency keys (`Publish::dedupe_key`): one entry per key, in the
//! `log` tree under a prefix no queue's records use (`FF` x 8 · topic id
//! u32 · key), so an entry is written in the same sled batch as its
//! message's record — after a crash both are there or neither is, and a
//! retried publish never finds a key whose message was lost, nor stores a
//! message twice because its key was.
//!
//! Value: window end ms u64 · queue u32 · offset u64 · message id u128.
//! The broker keeps the live keys in memory (loaded once at open,
//! [`StoreReader::dedupe_entries`]); retention passes remove the entries
//! whose window has closed ([`Store::purge_dedupe`]).

use super::*;

/// The prefix of every entry: a topic id and queue no topic has.
const PREFIX: [u8; 8] = [0xFF; 8];

/// An idempotency key's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeEntry {
    /// The topic's id in this store.
    pub topic_id: u32,
    /// The key.
    pub key: String,
    /// When its window closes (Unix ms): a publish from then on is new.
    pub until_ms: u64,
    /// Where the first publish went.
    pub queue: u32,
    /// Its offset.
    pub offset: u64,
    /// Its id.
    pub id: MessageId,
}

/// The tree key of `key` in topic `topic_id`.
pub(crate) fn dedupe_key(topic_id: u32, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(12 + key.len());
    k.extend_from_slice(&PREFIX);
    k.extend_from_slice(&topic_id.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// The entry's value.
pub(crate) fn dedupe_value(until_ms: u64, queue: u32, offset: u64, id: MessageId) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(&until_ms.to_be_bytes());
    v.extend_from_slice(&queue.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&id.as_u128().to_be_bytes());
    v
}

fn decode(k: &[u8], v: &[u8]) -> Option<DedupeEntry> {
    let topic_id = u32::from_be_bytes(k.get(8..12)?.try_into().ok()?);
    let key = String::from_utf8(k.get(12..)?.to_vec()).ok()?;
    if v.len() != 36 {
        return None;
    }
    Some(DedupeEntry {
        topic_id,
        key,
        until_ms: u64::from_be_bytes(v[0..8].try_into().ok()?),
        queue: u32::from_be_bytes(v[8..12].try_into().ok()?),
        offset: u64::from_be_bytes(v[12..20].try_into().ok()?),
        id: MessageId::from_u128(u128::from_be_bytes(v[20..36].try_into().ok()?)),
    })
}

impl RecordBuilder {
    /// Records `m`'s idempotency key (if it has one) beside its record, in
    /// the same batch.
    pub(crate) fn push_dedupe(&mut self, key: QueueKey, m: &Message) {
        if let Some((k, until)) = m.dedupe() {
            self.batch.insert(
                &dedupe_key(key.topic_id, k)[..],
                dedupe_value(until, key.queue, m.offset(), m.id()),
            );
        }
    }
}

impl Store {
    /// Removes the entries whose window closed at or before `now_ms`;
    /// returns how many.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub(crate) fn purge_dedupe(&self, now_ms: u64) -> Result<usize, StorageError> {
        let mut batch = crate::kv::Batch::default();
        let mut n = 0;
        for item in self.log.scan_prefix(&PREFIX[..]) {
            let (k, v) = item.map_err(failure::sled("reading dedupe keys"))?;
            let closed = v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .is_none_or(|b| u64::from_be_bytes(b) <= now_ms);
            if closed {
                batch.remove(&k[..]);
                n += 1;
            }
        }
        if n > 0 {
            self.log
                .apply_batch(batch)
                .map_err(failure::sled("removing closed dedupe keys"))?;
        }
        Ok(n)
    }
}

impl StoreReader {
    /// Every idempotency key whose window is still open at `now_ms`.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn dedupe_entries(&self, now_ms: u64) -> Result<Vec<DedupeEntry>, StorageError> {
        self.located(|| {
            let mut out = Vec::new();
            for item in self.log.scan_prefix(&PREFIX[..]) {
                let (k, v) = item.map_err(failure::sled("reading dedupe keys"))?;
                if let Some(e) = decode(&k, &v).filter(|e| e.until_ms > now_ms) {
                    out.push(e);
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_and_sorts_after_every_record_key() {
        let id = MessageId::generate();
        let k = dedupe_key(7, "order-42");
        let e = decode(&k, &dedupe_value(1_000, 3, 99, id)).unwrap();
        assert_eq!(
            e,
            DedupeEntry {
                topic_id: 7,
                key: "order-42".into(),
                until_ms: 1_000,
                queue: 3,
                offset: 99,
                id,
            }
        );
        let last_record = QueueKey {
            topic_id: u32::MAX - 1,
            queue: u32::MAX,
        }
        .log_key(u64::MAX);
        assert!(k.as_slice() > last_record.as_slice());
    }
}
