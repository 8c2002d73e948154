//! The delay index: durable entries ordered by due time.
//!
//! It holds consumer retries: a delivery that failed is rescheduled as
//! a [`RetryEntry`] (which message, which attempt comes next, when, and the
//! last error) under its group and topic, ordered by due time, and the
//! original is acked. The entry names the message by queue and offset (the
//! log keeps it), so a 4 MiB body is not copied per retry.
//!
//! Delayed messages use the same tree and the same shape of entry: a
//! [`ScheduleEntry`] under `d` · due (u64) · seq (u64) names a message stored
//! in the schedule topic by topic id, queue and offset; it is written in the
//! commit that stores the message, and removed once the message has been
//! copied to its destination topic.
//!
//! Keys: `r` · group · `0` · topic id (u32) · due (Unix ms, u64) · seq (u64),
//! big-endian, so a prefix scan per (group, topic) returns entries in due
//! order. Dead letters resent to their group are marked under
//! `x` · group · `0` · DLQ offset (u64), so a resend is never repeated.

use std::sync::atomic::{AtomicU64, Ordering};

use weirmq_bus::StorageError;

const RETRY: u8 = b'r';
const RESENT: u8 = b'x';
const SCHEDULED: u8 = b'd';

/// A staged message waiting for its time: a delayed message (due: deliver
/// it), or a transaction's half message (due: check it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduleEntry {
    /// When it is due (Unix milliseconds).
    pub due_ms: u64,
    /// Makes entries unique: [`ScheduleEntry::seq_of`] its place.
    pub seq: u64,
    /// Where the message is stored (a staging topic's id).
    pub topic_id: u32,
    /// Its queue.
    pub queue: u32,
    /// Its offset.
    pub offset: u64,
    /// For a half message, the checks made so far; `None` for a delayed
    /// message.
    pub checks: Option<u32>,
}

impl ScheduleEntry {
    /// The sequence number of the entry of the message at `offset` of a
    /// staging topic (one queue): unique, and known to whoever knows where
    /// the message is, so a transaction can be ended by its half message's
    /// place.
    pub fn seq_of(topic_id: u32, offset: u64) -> u64 {
        ((topic_id as u64) << 40) | (offset & ((1 << 40) - 1))
    }

    pub(crate) fn key(&self) -> [u8; 17] {
        let mut k = [0u8; 17];
        k[0] = SCHEDULED;
        k[1..9].copy_from_slice(&self.due_ms.to_be_bytes());
        k[9..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }

    /// topic id u32 · queue u32 · offset u64, and for a half message
    /// checks u32.
    pub(crate) fn value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.topic_id.to_be_bytes());
        v.extend_from_slice(&self.queue.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        if let Some(c) = self.checks {
            v.extend_from_slice(&c.to_be_bytes());
        }
        v
    }

    fn decode(k: &[u8], v: &[u8]) -> Result<ScheduleEntry, StorageError> {
        let bad = || StorageError::msg("a schedule entry in the delay index is corrupt");
        if k.len() != 17 || (v.len() != 16 && v.len() != 20) {
            return Err(bad());
        }
        let u64_at =
            |b: &[u8], i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at =
            |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Ok(ScheduleEntry {
            due_ms: u64_at(k, 1),
            seq: u64_at(k, 9),
            topic_id: u32_at(v, 0),
            queue: u32_at(v, 4),
            offset: u64_at(v, 8),
            checks: (v.len() == 20).then(|| u32_at(v, 16)),
        })
    }
}

/// The stored entry with `probe`'s seq: at `probe`'s key, or anywhere (it
/// was moved to a later check); `None` if there is none.
pub(crate) fn find_schedule(
    tree: &crate::kv::Tree,
    probe: &ScheduleEntry,
) -> Result<Option<ScheduleEntry>, StorageError> {
    let read = |e| crate::failure::sled_error("reading the delay index", e);
    let key = probe.key();
    if let Some(v) = tree.get(key).map_err(read)? {
        return ScheduleEntry::decode(&key, &v).map(Some);
    }
    for item in tree.scan_prefix([SCHEDULED]) {
        let (k, v) = item.map_err(read)?;
        if k.get(9..17) == Some(&probe.seq.to_be_bytes()[..]) {
            return ScheduleEntry::decode(&k, &v).map(Some);
        }
    }
    Ok(None)
}

/// Up to `limit` schedule entries in due order, after `after` (exclusive).
pub(crate) fn load_schedule(
    tree: &crate::kv::Tree,
    after: Option<&ScheduleEntry>,
    limit: usize,
) -> Result<Vec<ScheduleEntry>, StorageError> {
    let lo = match after {
        Some(e) => {
            let mut k = e.key().to_vec();
            k.push(0); // just past it
            k
        }
        None => vec![SCHEDULED],
    };
    let mut out = Vec::new();
    for item in tree.range(lo..vec![SCHEDULED + 1]).take(limit) {
        let (k, v) = item.map_err(|e| crate::failure::sled_error("reading the delay index", e))?;
        out.push(ScheduleEntry::decode(&k, &v)?);
    }
    Ok(out)
}

/// The key marking dead letter `dlq_offset` of `group` as resent.
pub(crate) fn resent_key(group: &str, dlq_offset: u64) -> Vec<u8> {
    let mut k = resent_prefix(group);
    k.extend_from_slice(&dlq_offset.to_be_bytes());
    k
}

pub(crate) fn resent_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 10);
    k.push(RESENT);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k
}

/// Where a retry entry lives in the index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RetryKey {
    /// The consumer group.
    pub group: String,
    /// The topic's id in the store.
    pub topic_id: u32,
    /// When the next attempt is due (Unix milliseconds).
    pub due_ms: u64,
    /// Makes keys unique.
    pub seq: u64,
}

/// A delivery waiting for its next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryEntry {
    /// Its place in the index.
    pub key: RetryKey,
    /// The message's queue.
    pub queue: u32,
    /// The message's offset in that queue.
    pub offset: u64,
    /// The attempt number of the next delivery.
    pub attempt: u32,
    /// When the message first failed (Unix milliseconds).
    pub first_failed_ms: u64,
    /// The last failure's description.
    pub last_error: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A sequence number unique in this process and across restarts (seeded
/// from the clock in nanoseconds on first use).
pub fn next_seq() -> u64 {
    if SEQ.load(Ordering::Relaxed) == 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let _ = SEQ.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn prefix(group: &str, topic_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 6);
    k.push(RETRY);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&topic_id.to_be_bytes());
    k
}

impl RetryKey {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut k = prefix(&self.group, self.topic_id);
        k.extend_from_slice(&self.due_ms.to_be_bytes());
        k.extend_from_slice(&self.seq.to_be_bytes());
        k
    }
}

impl RetryEntry {
    pub(crate) fn encode_value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(28 + self.last_error.len());
        v.extend_from_slice(&self.queue.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.attempt.to_be_bytes());
        v.extend_from_slice(&self.first_failed_ms.to_be_bytes());
        v.extend_from_slice(&(self.last_error.len() as u32).to_be_bytes());
        v.extend_from_slice(self.last_error.as_bytes());
        v
    }

    fn decode(
        group: &str,
        topic_id: u32,
        key: &[u8],
        v: &[u8],
    ) -> Result<RetryEntry, StorageError> {
        let bad = || StorageError::msg("a retry entry in the delay index is corrupt");
        let p = prefix(group, topic_id).len();
        let u64_at = |b: &[u8], i: usize| {
            b.get(i..i + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let u32_at = |b: &[u8], i: usize| {
            b.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_be_bytes)
        };
        let due_ms = u64_at(key, p).ok_or_else(bad)?;
        let seq = u64_at(key, p + 8).ok_or_else(bad)?;
        let len = u32_at(v, 24).ok_or_else(bad)? as usize;
        let last_error = v
            .get(28..28 + len)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(bad)?;
        Ok(RetryEntry {
            key: RetryKey {
                group: group.to_string(),
                topic_id,
                due_ms,
                seq,
            },
            queue: u32_at(v, 0).ok_or_else(bad)?,
            offset: u64_at(v, 4).ok_or_else(bad)?,
            attempt: u32_at(v, 12).ok_or_else(bad)?,
            first_failed_ms: u64_at(v, 16).ok_or_else(bad)?,
            last_error,
        })
    }
}

/// The retry entries of `group` on topic `topic_id`, in due order.
pub(crate) fn load_retries(
    tree: &crate::kv::Tree,
    group: &str,
    topic_id: u32,
) -> Result<Vec<RetryEntry>, StorageError> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(prefix(group, topic_id)) {
        let (k, v) = item.map_err(|e| crate::failure::sled_error("reading the delay index", e))?;
        out.push(RetryEntry::decode(group, topic_id, &k, &v)?);
    }
    Ok(out)
}

/// For every queue that has retry entries (of any group), the lowest offset
/// they name: retention keeps everything from there on.
pub(crate) fn retry_floors(
    tree: &crate::kv::Tree,
) -> Result<std::collections::HashMap<crate::QueueKey, u64>, StorageError> {
    let mut out = std::collections::HashMap::new();
    let bad = || StorageError::msg("a retry entry in the delay index is corrupt");
    for item in tree.scan_prefix([RETRY]) {
        let (k, v) = item.map_err(|e| crate::failure::sled_error("reading the delay index", e))?;
        let topic_at = k.len().checked_sub(20).ok_or_else(bad)?;
        let topic_id = u32::from_be_bytes(k[topic_at..topic_at + 4].try_into().map_err(|_| bad())?);
        let queue = u32::from_be_bytes(v.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        let offset = u64::from_be_bytes(
            v.get(4..12)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        let floor = out
            .entry(crate::QueueKey { topic_id, queue })
            .or_insert(offset);
        *floor = (*floor).min(offset);
    }
    // Delayed messages waiting in the schedule topic stay too.
    for item in tree.scan_prefix([SCHEDULED]) {
        let (k, v) = item.map_err(|e| crate::failure::sled_error("reading the delay index", e))?;
        let e = ScheduleEntry::decode(&k, &v)?;
        let floor = out
            .entry(crate::QueueKey {
                topic_id: e.topic_id,
                queue: e.queue,
            })
            .or_insert(e.offset);
        *floor = (*floor).min(e.offset);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_in_due_order() {
        let tree = crate::kv::Tree::memory(Default::default());
        let mk = |due_ms, offset| RetryEntry {
            key: RetryKey {
                group: "g".into(),
                topic_id: 3,
                due_ms,
                seq: next_seq(),
            },
            queue: 1,
            offset,
            attempt: 4,
            first_failed_ms: 99,
            last_error: "boom".into(),
        };
        let entries = [mk(300, 1), mk(100, 2), mk(200, 3)];
        for e in &entries {
            tree.insert(e.key.encode(), e.encode_value()).unwrap();
        }
        // Another group and topic are not mixed in.
        let other = RetryEntry {
            key: RetryKey {
                group: "g2".into(),
                ..entries[0].key.clone()
            },
            ..entries[0].clone()
        };
        tree.insert(other.key.encode(), other.encode_value())
            .unwrap();
        let loaded = load_retries(&tree, "g", 3).unwrap();
        assert_eq!(
            loaded.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![2, 3, 1]
        );
        assert_eq!(loaded[0], entries[1]);
        assert!(load_retries(&tree, "g", 4).unwrap().is_empty());
    }
}
