//! The sparse index: one summary per *span* of a queue (consecutive whole
//! records, up to [`SPAN_MESSAGES`] messages or [`SPAN_BYTES`] bytes, not
//! per message or record, and at most [`SPAN_MILLIS`] of publish time),
//! and the encoding of trace events.
//!
//! A span summary holds what retention and queries need without decoding
//! the records: message count, stored bytes, oldest and newest publish time,
//! and a Bloom filter over the messages' ids and keys. Queries by id or key
//! read the summaries of a topic's queues and decode only the spans whose
//! filter matches (about 1% false positives at 10 bits per item), plus the
//! queue's tail not yet summarised. One index write per ~1,000 messages per
//! queue keeps the publish path at one sled key per record.
//!
//! The hash is FNV-1a 64 with a final mix, written here: it is stored, so it
//! must never change with the Rust release (std's hasher may).

use weirmq_bus::{Message, MessageId, StorageError, TraceEvent, TraceKind};

const HASHES: u64 = 7;
const BITS_PER_ITEM: usize = 10;
/// A span is written once it holds this many messages...
pub(crate) const SPAN_MESSAGES: u32 = 1024;
/// ...or this many stored bytes...
pub(crate) const SPAN_BYTES: u64 = 256 * 1024;
/// ...or when a record arrives this long (publish time) after the span's
/// first message: so retention, which removes whole spans, keeps at most
/// this much past a message's limit, and a quiet queue's messages are not
/// held back by newer ones in the same span.
pub(crate) const SPAN_MILLIS: u64 = 100;

fn fnv1a(tag: u8, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(&tag).chain(bytes) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser: spreads the bits.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// What a query looks for in a summary's filter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Probe<'a> {
    Id(MessageId),
    Key(&'a str),
}

impl Probe<'_> {
    fn hash(&self) -> u64 {
        match self {
            // Ids are unique and well spread already: one mix, no byte loop.
            Probe::Id(id) => {
                let v = id.as_u128();
                mix((v as u64) ^ ((v >> 64) as u64).rotate_left(29) ^ 0x6a09_e667_f3bc_c909)
            }
            Probe::Key(k) => fnv1a(b'k', k.as_bytes()),
        }
    }
}

fn positions(h: u64, bits: u64) -> impl Iterator<Item = u64> {
    let h1 = h & 0xffff_ffff;
    let h2 = (h >> 32) | 1;
    (0..HASHES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
}

/// Builds a record's summary as its messages are added.
#[derive(Debug, Default)]
pub(crate) struct SummaryBuilder {
    count: u32,
    bytes: u32,
    min_born: u64,
    max_born: u64,
    hashes: Vec<u64>,
}

impl SummaryBuilder {
    pub(crate) fn add(&mut self, m: &Message, stored_len: usize) {
        let born = weirmq_bus::unix_ms(m.born_at());
        if self.count == 0 {
            self.min_born = born;
            self.max_born = born;
        } else {
            self.min_born = self.min_born.min(born);
            self.max_born = self.max_born.max(born);
        }
        self.count += 1;
        self.bytes = self.bytes.saturating_add(stored_len as u32 + 4);
        self.hashes.push(Probe::Id(m.id()).hash());
        for k in m.keys() {
            self.hashes.push(Probe::Key(k).hash());
        }
    }

    /// Adds everything `other` summarises (the next record of the span).
    pub(crate) fn merge(&mut self, other: SummaryBuilder) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other;
            return;
        }
        self.min_born = self.min_born.min(other.min_born);
        self.max_born = self.max_born.max(other.max_born);
        self.count += other.count;
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.hashes.extend(other.hashes);
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes as u64
    }

    pub(crate) fn max_born(&self) -> u64 {
        self.max_born
    }

    pub(crate) fn min_born(&self) -> u64 {
        self.min_born
    }

    /// count u32 · bytes u32 · min born ms u64 · max born ms u64 · filter.
    pub(crate) fn finish(self) -> Vec<u8> {
        let bits = (self.hashes.len() * BITS_PER_ITEM).div_ceil(64).max(1) * 64;
        let mut filter = vec![0u8; bits / 8];
        for h in &self.hashes {
            for p in positions(*h, bits as u64) {
                filter[(p / 8) as usize] |= 1 << (p % 8);
            }
        }
        let mut v = Vec::with_capacity(24 + filter.len());
        v.extend_from_slice(&self.count.to_be_bytes());
        v.extend_from_slice(&self.bytes.to_be_bytes());
        v.extend_from_slice(&self.min_born.to_be_bytes());
        v.extend_from_slice(&self.max_born.to_be_bytes());
        v.extend_from_slice(&filter);
        v
    }
}

/// A stored record summary, read back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary<'a> {
    pub(crate) count: u32,
    pub(crate) bytes: u32,
    pub(crate) max_born: u64,
    filter: &'a [u8],
}

impl<'a> Summary<'a> {
    pub(crate) fn decode(v: &'a [u8]) -> Result<Summary<'a>, StorageError> {
        if v.len() < 24 + 8 || (v.len() - 24) % 8 != 0 {
            return Err(StorageError::msg(format!(
                "a record summary of {} bytes is corrupt",
                v.len()
            )));
        }
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(Summary {
            count: u32_at(0),
            bytes: u32_at(4),
            max_born: u64_at(16),
            filter: &v[24..],
        })
    }

    /// Whether the record may hold what `probe` names (never a false "no").
    pub(crate) fn may_contain(&self, probe: Probe<'_>) -> bool {
        let bits = self.filter.len() as u64 * 8;
        positions(probe.hash(), bits).all(|p| self.filter[(p / 8) as usize] & (1 << (p % 8)) != 0)
    }
}

/// at ms u64 · kind u8 · attempt u32 · group (u16 length, 0xffff = none) ·
/// detail (u32 length, u32::MAX = none).
pub(crate) fn encode_trace(e: &TraceEvent) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&weirmq_bus::unix_ms(e.at).to_be_bytes());
    v.push(e.kind.code());
    v.extend_from_slice(&e.attempt.to_be_bytes());
    match &e.group {
        Some(g) => {
            let g = &g.as_bytes()[..g.len().min(0xfffe)];
            v.extend_from_slice(&(g.len() as u16).to_be_bytes());
            v.extend_from_slice(g);
        }
        None => v.extend_from_slice(&0xffffu16.to_be_bytes()),
    }
    match &e.detail {
        Some(d) => {
            v.extend_from_slice(&(d.len() as u32).to_be_bytes());
            v.extend_from_slice(d.as_bytes());
        }
        None => v.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
    v
}

pub(crate) fn decode_trace(v: &[u8]) -> Result<TraceEvent, StorageError> {
    let bad = || StorageError::msg(format!("a trace event of {} bytes is corrupt", v.len()));
    let at = v.get(..8).ok_or_else(bad)?;
    let at = u64::from_be_bytes(at.try_into().map_err(|_| bad())?);
    let kind = TraceKind::from_code(*v.get(8).ok_or_else(bad)?).ok_or_else(bad)?;
    let attempt = u32::from_be_bytes(
        v.get(9..13)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let glen = u16::from_be_bytes(
        v.get(13..15)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let mut pos = 15;
    let group = if glen == 0xffff {
        None
    } else {
        let g = v.get(pos..pos + glen as usize).ok_or_else(bad)?;
        pos += glen as usize;
        Some(String::from_utf8_lossy(g).into_owned())
    };
    let dlen = u32::from_be_bytes(
        v.get(pos..pos + 4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    pos += 4;
    let detail = if dlen == u32::MAX {
        None
    } else {
        let d = v.get(pos..pos + dlen as usize).ok_or_else(bad)?;
        Some(String::from_utf8_lossy(d).into_owned())
    };
    Ok(TraceEvent {
        at: weirmq_bus::from_unix_ms(at),
        kind,
        group,
        attempt,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use weirmq_bus::OutgoingMessage;

    #[test]
    fn the_filter_finds_every_member_and_rejects_most_others() {
        let mut b = SummaryBuilder::default();
        let msgs: Vec<Message> = (0..500)
            .map(|i| {
                Message::prepare(
                    OutgoingMessage::new("t", vec![1; 10]).key(format!("order-{i}")),
                    Arc::from("t"),
                )
            })
            .collect();
        for m in &msgs {
            b.add(m, 60);
        }
        let v = b.finish();
        let s = Summary::decode(&v).unwrap();
        assert_eq!(s.count, 500);
        assert_eq!(s.bytes, 500 * 64);
        for (i, m) in msgs.iter().enumerate() {
            assert!(s.may_contain(Probe::Id(m.id())));
            assert!(s.may_contain(Probe::Key(&format!("order-{i}"))));
        }
        let false_hits = (0..10_000)
            .filter(|i| s.may_contain(Probe::Key(&format!("other-{i}"))))
            .count();
        assert!(false_hits < 300, "{false_hits} false positives in 10,000");
        assert!(Summary::decode(&v[..20]).is_err());
    }

    #[test]
    fn trace_events_round_trip() {
        for e in [
            TraceEvent::now(TraceKind::Published, None, 0, None),
            TraceEvent::now(TraceKind::Retried, Some("g"), 2, Some("boom".into())),
            TraceEvent::now(TraceKind::Acked, Some(""), 3, Some(String::new())),
        ] {
            assert_eq!(decode_trace(&encode_trace(&e)).unwrap(), e);
        }
        assert!(decode_trace(&[1, 2, 3]).is_err());
    }
}
