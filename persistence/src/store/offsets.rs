//! The `offsets` tree: each group's committed offset per queue and the
//! offsets it acked above it.

use super::*;

/// A consumer group's committed position in one queue: every offset below
/// `committed` is acked, and so are those in `acked_above` (acks out of
/// order, kept so a restart does not redeliver them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetState {
    /// Every offset below this is acked.
    pub committed: u64,
    /// Acked offsets above `committed`, ascending.
    pub acked_above: Vec<u64>,
}

impl OffsetState {
    /// committed u64 · runs u32 · (first u64 · length u32) per run of
    /// consecutive acked offsets: compact however many acks are out of order.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for &o in &self.acked_above {
            match runs.last_mut() {
                Some((first, len)) if *first + *len as u64 == o && *len < u32::MAX => *len += 1,
                _ => runs.push((o, 1)),
            }
        }
        let mut v = Vec::with_capacity(12 + 12 * runs.len());
        v.extend_from_slice(&self.committed.to_be_bytes());
        v.extend_from_slice(&(runs.len() as u32).to_be_bytes());
        for (first, len) in runs {
            v.extend_from_slice(&first.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
        }
        v
    }

    pub(super) fn decode(b: &[u8]) -> Result<OffsetState, StorageError> {
        let bad = || StorageError::msg(format!("offset record of {} bytes is corrupt", b.len()));
        let u64_at = |i: usize| {
            b.get(i..i + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let u32_at = |i: usize| {
            b.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_be_bytes)
        };
        let committed = u64_at(0).ok_or_else(bad)?;
        let n = u32_at(8).ok_or_else(bad)? as usize;
        if b.len() != 12 + 12 * n {
            return Err(bad());
        }
        let mut acked_above = Vec::new();
        for r in 0..n {
            let first = u64_at(12 + 12 * r).ok_or_else(bad)?;
            let len = u32_at(20 + 12 * r).ok_or_else(bad)? as u64;
            if len > (1 << 24) || first.checked_add(len).is_none() {
                return Err(bad());
            }
            acked_above.extend(first..first + len);
        }
        Ok(OffsetState {
            committed,
            acked_above,
        })
    }
}

pub(super) fn offsets_key(group: &str, key: QueueKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 9);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&key.topic_id.to_be_bytes());
    k.extend_from_slice(&key.queue.to_be_bytes());
    k
}

pub(crate) fn offsets_batch(
    entries: &HashMap<(String, QueueKey), OffsetState>,
) -> crate::kv::Batch {
    let mut b = crate::kv::Batch::default();
    for ((group, key), state) in entries {
        b.insert(offsets_key(group, *key), state.encode());
    }
    b
}

impl Store {
    /// Each queue's *acked floor*: the lowest committed offset of any
    /// consumer group with a position in it (`pending`: positions not
    /// written yet, newer than the stored ones). Queues no group has a
    /// position in are absent: nothing in them counts as consumed.
    pub(crate) fn acked_floors(
        &self,
        pending: &HashMap<(String, QueueKey), OffsetState>,
    ) -> Result<HashMap<QueueKey, u64>, StorageError> {
        let mut committed: HashMap<(Vec<u8>, QueueKey), u64> = HashMap::new();
        for item in self.offsets.iter() {
            let (k, v) = item.map_err(failure::sled("reading consumer offsets"))?;
            let n = k.len();
            let word = |at: usize| k.get(at..at + 4).and_then(|b| b.try_into().ok());
            let (Some(t), Some(q)) = (if n >= 9 {
                (word(n - 8), word(n - 4))
            } else {
                (None, None)
            }) else {
                return Err(StorageError::msg("consumer offset key is corrupt"));
            };
            let key = QueueKey {
                topic_id: u32::from_be_bytes(t),
                queue: u32::from_be_bytes(q),
            };
            let group = k[..n - 9].to_vec();
            committed.insert((group, key), OffsetState::decode(&v)?.committed);
        }
        for ((group, key), state) in pending {
            committed.insert((group.as_bytes().to_vec(), *key), state.committed);
        }
        let mut floors: HashMap<QueueKey, u64> = HashMap::new();
        for ((_, key), c) in committed {
            let f = floors.entry(key).or_insert(c);
            *f = (*f).min(c);
        }
        Ok(floors)
    }
}

impl StoreReader {
    /// The committed positions of `group` in the queues of topic `topic_id`.
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or an offset record does not decode.
    pub fn load_offsets(
        &self,
        group: &str,
        topic_id: u32,
    ) -> Result<HashMap<u32, OffsetState>, StorageError> {
        self.located(|| {
            let mut prefix = group.as_bytes().to_vec();
            prefix.push(0);
            prefix.extend_from_slice(&topic_id.to_be_bytes());
            let mut out = HashMap::new();
            for item in self.offsets.scan_prefix(&prefix) {
                let (k, v) = item.map_err(failure::sled("reading consumer offsets"))?;
                let queue = k
                    .get(prefix.len()..prefix.len() + 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| StorageError::msg("consumer offset key is corrupt"))?;
                out.insert(queue, OffsetState::decode(&v)?);
            }
            Ok(out)
        })
    }
}

impl StoreReader {
    /// Every group with a stored position, with the ids of the topics it
    /// has one in, sorted and without repeats.
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or an offset key is corrupt.
    pub fn groups(&self) -> Result<Vec<(String, u32)>, StorageError> {
        self.located(|| {
            let mut out: Vec<(String, u32)> = Vec::new();
            for item in self.offsets.iter() {
                let (k, _) = item.map_err(failure::sled("reading consumer offsets"))?;
                let n = k.len();
                let corrupt = || StorageError::msg("consumer offset key is corrupt");
                if n < 9 || k[n - 9] != 0 {
                    return Err(corrupt());
                }
                let topic_id = k
                    .get(n - 8..n - 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(corrupt)?;
                let group = std::str::from_utf8(&k[..n - 9]).map_err(|_| corrupt())?;
                out.push((group.to_string(), topic_id));
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
    }
}
