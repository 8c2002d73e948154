//! The NATS wire format (docs/wire-format.md): a stored message's body is
//! the event's encoded bytes, exactly as the codec wrote them, and its
//! metadata travels in NATS headers, so any NATS client can publish events
//! weirmq handlers consume and read the events weirmq publishes without a
//! decoder.
//!
//! | header | holds |
//! |---|---|
//! | `Nats-Msg-Id` | the id the stream deduplicates by (the message id; a resend's is unique) |
//! | `Wq-Id` | the message id, 32 hex digits |
//! | `Wq-Born` | publish time, ms since the Unix epoch |
//! | `Wq-Tag` | the tag |
//! | `Wq-Keys` | the keys, comma-separated |
//! | `Wq-Prop-<name>` | a user property |
//! | `Wq-Group` | the message group (FIFO) |
//! | `Wq-Deliver-At` | a delayed message's time, ms since the Unix epoch |
//! | `Wq-Destination`, `Wq-Half` | a staged message's topic; a half message |
//! | `traceparent`, `tracestate` | the W3C trace context |
//!
//! Values (and property names) are percent-encoded: bytes outside printable
//! ASCII, `%`, space and (in `Wq-Keys`) `,` become `%XX`; a plain value is
//! unchanged.
//!
//! Read back, a message with `Wq-Id` is this format; one without whose body
//! is a complete envelope of an earlier version is read as that (streams
//! written before this format); anything else is a *foreign* message, a
//! plain NATS client's: its body is the event, `Wq-*` headers it set are
//! honoured, every other header but `Nats-*` becomes a property, its id is
//! its `Nats-Msg-Id` (when that is a weirmq id) or one derived from it (or
//! from the stream and sequence), and its publish time is the stream's.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;

use weirmq_bus::{unix_ms, Message, MessageId, MessageParts, TRACEPARENT, TRACESTATE};

use crate::names::{escape, unescape};

pub(crate) const H_ID: &str = "Wq-Id";
const H_BORN: &str = "Wq-Born";
const H_TAG: &str = "Wq-Tag";
const H_KEYS: &str = "Wq-Keys";
const H_PROP: &str = "Wq-Prop-";
const H_GROUP: &str = "Wq-Group";
const H_DELIVER_AT: &str = "Wq-Deliver-At";
const H_DESTINATION: &str = "Wq-Destination";
const H_HALF: &str = "Wq-Half";
const H_NATS_MSG_ID: &str = "Nats-Msg-Id";

/// The body and headers `m` is stored as.
pub(crate) fn encode(m: &Message) -> (Bytes, HeaderMap) {
    let mut h = HeaderMap::new();
    h.insert(H_ID, m.id().to_string());
    h.insert(H_BORN, unix_ms(m.born_at()).to_string());
    if let Some(t) = m.tag() {
        h.insert(H_TAG, value(t, b""));
    }
    if !m.keys().is_empty() {
        let keys: Vec<String> = m.keys().iter().map(|k| value(k, b",")).collect();
        h.insert(H_KEYS, keys.join(","));
    }
    for (k, v) in m.properties() {
        if k == TRACEPARENT || k == TRACESTATE {
            h.insert(k.as_str(), value(v, b""));
        } else {
            h.insert(format!("{H_PROP}{}", name(k)), value(v, b""));
        }
    }
    if let Some(g) = m.message_group() {
        h.insert(H_GROUP, value(g, b""));
    }
    if let Some(at) = m.deliver_at() {
        h.insert(H_DELIVER_AT, unix_ms(at).to_string());
    }
    if let Some(d) = m.destination() {
        h.insert(H_DESTINATION, value(d, b""));
    }
    if m.is_half() {
        h.insert(H_HALF, "1");
    }
    (Bytes::copy_from_slice(m.body()), h)
}

/// Reads a stored message back (see the module docs for the three kinds).
/// `stored_ms` is when the stream stored it (a foreign message's publish
/// time). The error says why the message cannot be read.
pub(crate) fn decode(
    topic: Arc<str>,
    queue: u32,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    stored_ms: u64,
) -> Result<Message, String> {
    let get = |n: &str| headers.and_then(|h| h.get(n)).map(|v| v.as_str());
    if get(H_ID).is_none() {
        if let Ok((m, used)) = Message::decode_envelope(topic.clone(), queue, seq, payload) {
            if used == payload.len() {
                return Ok(m);
            }
        }
    }
    let text = |n: &str| -> Result<Option<String>, String> {
        get(n)
            .map(|v| {
                unvalue(v).ok_or_else(|| format!("header {n} is not valid percent-encoded UTF-8"))
            })
            .transpose()
    };
    let number = |n: &str| -> Result<Option<u64>, String> {
        get(n)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("header {n} is not a number of ms: {v:?}"))
            })
            .transpose()
    };
    let id = match get(H_ID) {
        Some(v) => v
            .trim()
            .parse::<MessageId>()
            .map_err(|_| format!("header {H_ID} is not a message id (32 hex digits): {v:?}"))?,
        None => foreign_id(get(H_NATS_MSG_ID), &topic, queue, seq, stored_ms),
    };
    let mut keys = Vec::new();
    if let Some(v) = get(H_KEYS) {
        for k in v.split(',').filter(|k| !k.is_empty()) {
            keys.push(
                unvalue(k)
                    .ok_or_else(|| format!("header {H_KEYS} is not valid percent-encoded UTF-8"))?,
            );
        }
    }
    let mut properties = BTreeMap::new();
    if let Some(h) = headers {
        for (n, vs) in h.iter() {
            let n: &str = n.as_ref();
            let Some(v) = vs.first().map(|v| v.as_str()) else {
                continue;
            };
            if let Some(p) = n.strip_prefix(H_PROP) {
                let (Some(p), Some(v)) = (unvalue(p), unvalue(v)) else {
                    return Err(format!("header {n} is not valid percent-encoded UTF-8"));
                };
                properties.insert(p, v);
            } else if n == TRACEPARENT || n == TRACESTATE {
                properties.insert(n.to_string(), unvalue(v).unwrap_or_else(|| v.to_string()));
            } else if !is_reserved(n) {
                // A foreign publisher's own header, as it was sent.
                properties.insert(n.to_string(), v.to_string());
            }
        }
    }
    Ok(Message::from_parts(
        topic,
        queue,
        seq,
        MessageParts {
            id,
            born_at_ms: number(H_BORN)?.unwrap_or(stored_ms),
            tag: text(H_TAG)?,
            keys,
            properties,
            message_group: text(H_GROUP)?,
            deliver_at_ms: number(H_DELIVER_AT)?.filter(|ms| *ms > 0),
            destination: text(H_DESTINATION)?,
            half: get(H_HALF) == Some("1"),
            // Refused at publish on this backend (`Publish::priority`).
            priority: 0,
            body: payload.to_vec(),
        },
    ))
}

/// Reads a message fetched from a consumer.
pub(crate) fn decode_fetched(
    topic: Arc<str>,
    queue: u32,
    seq: u64,
    m: &async_nats::jetstream::Message,
) -> Result<Message, String> {
    let stored_ms = m.info().map_or(0, |i| ms(i.published));
    decode(topic, queue, seq, m.headers.as_ref(), &m.payload, stored_ms)
}

/// Reads a message got directly from a stream.
pub(crate) fn decode_stored(
    topic: Arc<str>,
    queue: u32,
    raw: &async_nats::jetstream::message::StreamMessage,
) -> Result<Message, weirmq_bus::StorageError> {
    decode(
        topic,
        queue,
        raw.sequence,
        Some(&raw.headers),
        &raw.payload,
        ms(raw.time),
    )
    .map_err(|reason| {
        weirmq_bus::StorageError::msg(format!(
            "stream message {} cannot be read as a weirmq message: {reason}",
            raw.sequence
        ))
    })
}

fn ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

/// `Nats-*` (the server's and clients' own) and `Wq-*` (weirmq's) headers
/// are not properties.
fn is_reserved(name: &str) -> bool {
    let starts = |p: &str| {
        name.get(..p.len())
            .is_some_and(|n| n.eq_ignore_ascii_case(p))
    };
    starts("nats-") || starts("wq-")
}

/// The id of a foreign message: its `Nats-Msg-Id` if that is a weirmq id,
/// else one derived from it (or from where it is stored), the same on
/// every delivery; its time part is the stream's store time.
fn foreign_id(
    nats_id: Option<&str>,
    topic: &str,
    queue: u32,
    seq: u64,
    stored_ms: u64,
) -> MessageId {
    if let Some(id) = nats_id.and_then(|v| {
        let v = v.trim();
        (v.len() == 32)
            .then(|| v.parse::<MessageId>().ok())
            .flatten()
    }) {
        return id;
    }
    let source = match nats_id {
        Some(v) => format!("id:{v}"),
        None => format!("at:{topic}/{queue}/{seq}"),
    };
    // FNV-1a, 64 bits: stable across builds and processes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.bytes() {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    MessageId::from_u128(((stored_ms as u128) << 80) | hash as u128)
}

/// A header value: printable ASCII but `%`, space and `also` kept.
fn value(s: &str, also: &[u8]) -> String {
    escape(s, b'%', |b| {
        (0x21..0x7f).contains(&b) && b != b'%' && !also.contains(&b)
    })
}

/// A property name as a header-name suffix: letters, digits and `-_.~` kept.
fn name(s: &str) -> String {
    escape(s, b'%', |b| {
        b.is_ascii_alphanumeric() || b"-_.~".contains(&b)
    })
}

/// Decodes [`value`] / [`name`]; `None` if an escape is malformed or the
/// result is not UTF-8.
fn unvalue(s: &str) -> Option<String> {
    unescape(s, b'%')
}

#[cfg(test)]
mod tests {
    use super::*;
    use weirmq_bus::OutgoingMessage;

    fn round_trip(m: &Message) -> Message {
        let (body, headers) = encode(m);
        decode(m.topic_arc().clone(), 2, 7, Some(&headers), &body, 1).unwrap()
    }

    #[test]
    fn every_field_survives_headers_and_the_body_is_the_event() {
        let out = OutgoingMessage::new("t", br#"{"n":1}"#.to_vec())
            .tag("vip tag")
            .key("k1")
            .key("a,b")
            .key("ü")
            .property("region", "eu west")
            .property("weird name:%", "50%\r\n")
            .property(
                TRACEPARENT,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .message_group("order-1")
            .deliver_at(std::time::SystemTime::now() + std::time::Duration::from_secs(5));
        let m = Message::prepare(out, Arc::from("t"))
            .with_destination("orders")
            .as_half();
        let (body, headers) = encode(&m);
        assert_eq!(&body[..], br#"{"n":1}"#);
        assert_eq!(headers.get("Wq-Prop-region").unwrap().as_str(), "eu%20west");
        assert!(headers.get(TRACEPARENT).is_some());
        let back = round_trip(&m);
        assert_eq!(back.id(), m.id());
        assert_eq!(back.born_at(), m.born_at());
        assert_eq!(back.tag(), m.tag());
        assert_eq!(back.keys(), m.keys());
        assert_eq!(back.properties(), m.properties());
        assert_eq!(back.message_group(), m.message_group());
        assert_eq!(back.deliver_at(), m.deliver_at());
        assert_eq!(back.destination(), m.destination());
        assert!(back.is_half());
        assert_eq!(back.body(), m.body());
        assert_eq!((back.queue(), back.offset()), (2, 7));
    }

    #[test]
    fn an_old_envelope_is_still_read() {
        let m = Message::prepare(
            OutgoingMessage::new("t", b"x".to_vec()).tag("a"),
            Arc::from("t"),
        );
        let mut buf = Vec::new();
        m.encode_envelope(&mut buf);
        let back = decode(Arc::from("t"), 0, 1, None, &buf, 1).unwrap();
        assert_eq!(
            (back.id(), back.tag(), back.body()),
            (m.id(), Some("a"), &b"x"[..])
        );
    }

    #[test]
    fn a_foreign_message_is_its_body_with_its_headers_as_properties() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "order-42");
        h.insert("Content-Type", "application/json");
        h.insert("Wq-Tag", "paid");
        // Decoded as on two deliveries of the same stored message.
        let deliver = || {
            decode(
                Arc::from("t"),
                1,
                9,
                Some(&h),
                br#"{"n":5}"#,
                1_700_000_000_000,
            )
            .unwrap()
        };
        let (a, b) = (deliver(), deliver());
        assert_eq!(a.body(), br#"{"n":5}"#);
        assert_eq!(a.tag(), Some("paid"));
        assert_eq!(
            a.properties().get("Content-Type").map(String::as_str),
            Some("application/json")
        );
        assert!(!a.properties().contains_key("Nats-Msg-Id"));
        assert_eq!(a.id(), b.id(), "the same id on every delivery");
        assert_eq!(a.id().timestamp_ms(), 1_700_000_000_000);
        assert_eq!(a.born_at(), weirmq_bus::from_unix_ms(1_700_000_000_000));
        // A JSON body starting with `{` is not mistaken for an envelope,
        // and no headers at all is fine.
        let c = decode(Arc::from("t"), 0, 3, None, br#"{}"#, 5).unwrap();
        assert_eq!(c.body(), b"{}");
        assert_ne!(c.id(), a.id());
    }

    #[test]
    fn a_bad_wq_header_is_a_reason_not_a_panic() {
        let mut h = HeaderMap::new();
        h.insert("Wq-Id", "not-an-id");
        let e = decode(Arc::from("t"), 0, 1, Some(&h), b"x", 1).unwrap_err();
        assert!(e.contains("Wq-Id"), "{e}");
        let mut h = HeaderMap::new();
        h.insert("Wq-Born", "yesterday");
        assert!(decode(Arc::from("t"), 0, 1, Some(&h), b"x", 1)
            .unwrap_err()
            .contains("Wq-Born"));
    }
}
