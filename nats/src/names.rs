//! How weirmq names map to JetStream streams, subjects and consumers.
//!
//! | weirmq | JetStream |
//! |---|---|
//! | topic `T` with `n` queues | stream `WQ_T_<T>`, subjects `wq.<T>.<q>.*` for `q` in `0..n`; a message is on `wq.<T>.<queue>.<target>` |
//! | message for every group | target `_` |
//! | message resent to group `G` only | target `g<G>` |
//! | group `G`, queue `q` | durable pull consumer `<G>_Q<q>`, filter `wq.<T>.<q>.>` |
//! | FIFO lease of `G`'s queue `q` | stream `WQ_SYS_LEASES`, subject `wqlease.<G>.<q>` |
//! | a live FIFO subscription of `G` | heartbeat on `wqlease.<G>.m.<owner>`, same stream |
//! | dead letters of `G` | stream `WQ_SYS_DLQ`, subject `wqdlq.<G>.m` (resent marks `.r`) |
//! | delayed message for `T` (2.12+) | schedule definition `wqs.<T>.<id>` in `T`'s stream, target `wq.<T>.<queue>._` |
//! | delayed message for `T` (before 2.12) | stream `WQ_SYS_SCHEDULE`, subject `wqsched.<T>` |
//! | half message for `T` | stream `WQ_SYS_HALF`, subject `wqhalf.<T>`; check counts in `WQ_SYS_HALFC` |
//!
//! Names are encoded so every weirmq name is a valid subject token and
//! stream/consumer name, injectively: ASCII letters, digits and `-` stay,
//! any other byte becomes `_` and two upper-case hex digits.

/// Encodes a weirmq name as one subject token / stream-name part.
pub(crate) fn enc(name: &str) -> String {
    escape(name, b'_', |b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Decodes [`enc`]; `None` if `s` is not an encoded name.
pub(crate) fn dec(s: &str) -> Option<String> {
    unescape(s, b'_')
}

/// `s` with every byte `keep` rejects written as `marker` and two
/// upper-case hex digits (subject tokens here, NATS header values in
/// `wire`).
pub(crate) fn escape(s: &str, marker: u8, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push(marker as char);
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Decodes [`escape`]; `None` if an escape is malformed or the result is
/// not UTF-8.
pub(crate) fn unescape(s: &str, marker: u8) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == marker {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Prefix of every topic stream's name.
pub(crate) const TOPIC_STREAM_PREFIX: &str = "WQ_T_";
/// The dead-letter stream (every group).
pub(crate) const DLQ_STREAM: &str = "WQ_SYS_DLQ";
/// The delayed-message stream.
pub(crate) const SCHEDULE_STREAM: &str = "WQ_SYS_SCHEDULE";
/// The half-message stream.
pub(crate) const HALF_STREAM: &str = "WQ_SYS_HALF";
/// Check counts of half messages (one message per subject).
pub(crate) const HALF_CHECKS_STREAM: &str = "WQ_SYS_HALFC";
/// FIFO queue leases (one message per subject).
pub(crate) const LEASE_STREAM: &str = "WQ_SYS_LEASES";
/// The target token of a message for every group.
pub(crate) const ALL_GROUPS: &str = "_";

pub(crate) fn topic_stream(topic: &str) -> String {
    format!("{TOPIC_STREAM_PREFIX}{}", enc(topic))
}

/// Every subject of a topic's queues, as the streams of earlier versions
/// took them (any queue number, any depth): kept to find a stream that
/// still takes them (see [`queue_subjects`]).
pub(crate) fn topic_subjects(topic: &str) -> String {
    format!("wq.{}.>", enc(topic))
}

/// The subjects a topic's stream takes: one per queue, one target token
/// each (`wq.<T>.<q>.*`), so a publish to a queue the topic does not have
/// (or with extra tokens) matches no stream and is refused, instead of
/// being stored where no consumer looks.
pub(crate) fn queue_subjects(topic: &str, queues: u32) -> Vec<String> {
    (0..queues)
        .map(|q| format!("wq.{}.{q}.*", enc(topic)))
        .collect()
}

/// The subject a message of `topic` in `queue` is published to; `target`
/// is [`ALL_GROUPS`] or [`group_target`].
pub(crate) fn queue_subject(topic: &str, queue: u32, target: &str) -> String {
    format!("wq.{}.{queue}.{target}", enc(topic))
}

/// Every message of one queue.
pub(crate) fn queue_filter(topic: &str, queue: u32) -> String {
    format!("wq.{}.{queue}.>", enc(topic))
}

/// The target token of a message meant for `group` only.
pub(crate) fn group_target(group: &str) -> String {
    format!("g{}", enc(group))
}

/// Who a message's target token addresses.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `_`: every group.
    All,
    /// `g<enc(group)>`: one group (a dead letter resent to it).
    Group(String),
    /// Anything else: no group weirmq knows how to address.
    Unknown,
}

/// Reads a target token ([`ALL_GROUPS`] or [`group_target`]).
pub(crate) fn parse_target(token: &str) -> Target {
    if token == ALL_GROUPS {
        return Target::All;
    }
    match token.strip_prefix('g').and_then(dec) {
        Some(g) if !g.is_empty() => Target::Group(g),
        _ => Target::Unknown,
    }
}

/// The queue and target of a subject made by [`queue_subject`].
pub(crate) fn parse_queue_subject(subject: &str) -> Option<(u32, &str)> {
    let mut parts = subject.splitn(4, '.');
    let (_, _, q, target) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some((q.parse().ok()?, target))
}

pub(crate) fn consumer_name(group: &str, queue: u32) -> String {
    format!("{}_Q{queue}", enc(group))
}

pub(crate) fn dlq_subject(group: &str) -> String {
    format!("wqdlq.{}.m", enc(group))
}

pub(crate) fn dlq_resent_subject(group: &str) -> String {
    format!("wqdlq.{}.r", enc(group))
}

pub(crate) fn dlq_group_filter(group: &str) -> String {
    format!("wqdlq.{}.>", enc(group))
}

/// Schedule definitions of a topic's delayed messages (2.12+), in the
/// topic's own stream.
pub(crate) fn schedule_definitions(topic: &str) -> String {
    format!("wqs.{}.>", enc(topic))
}

/// The subject of one delayed message's schedule definition (its identity:
/// one schedule per subject).
pub(crate) fn schedule_definition_subject(topic: &str, id: weirmq_bus::MessageId) -> String {
    format!("wqs.{}.{id}", enc(topic))
}

pub(crate) fn schedule_subject(topic: &str) -> String {
    format!("wqsched.{}", enc(topic))
}

pub(crate) fn half_subject(topic: &str) -> String {
    format!("wqhalf.{}", enc(topic))
}

pub(crate) fn half_checks_subject(seq: u64) -> String {
    format!("wqhalfc.{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_is_subject_safe() {
        for name in ["orders", "a_b", "%DLQ%g", "x|y", "A-z_09", "g%member-1"] {
            let e = enc(name);
            assert!(
                e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{e}"
            );
            assert_eq!(dec(&e).as_deref(), Some(name));
        }
        assert_ne!(enc("a_b"), enc("a%b"));
        assert_eq!(dec("_Z1"), None);
    }

    #[test]
    fn targets_parse_back_and_junk_is_unknown() {
        assert_eq!(parse_target(ALL_GROUPS), Target::All);
        assert_eq!(
            parse_target(&group_target("g%m-1")),
            Target::Group("g%m-1".into())
        );
        for junk in ["", "x", "g", "g_Z1", "__"] {
            assert_eq!(parse_target(junk), Target::Unknown, "{junk:?}");
        }
        assert_eq!(
            queue_subjects("a.b", 2),
            vec!["wq.a_2Eb.0.*".to_string(), "wq.a_2Eb.1.*".to_string()]
        );
    }

    #[test]
    fn queue_subjects_parse_back() {
        let s = queue_subject("or_ders", 3, &group_target("g"));
        assert_eq!(parse_queue_subject(&s), Some((3, "gg")));
        assert!(s.starts_with("wq.or_5Fders.3."));
        assert_eq!(
            parse_queue_subject(&queue_subject("t", 0, ALL_GROUPS)),
            Some((0, ALL_GROUPS))
        );
    }
}
