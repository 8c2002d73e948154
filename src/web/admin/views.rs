//! The admin API's JSON shapes, and the parsing of what requests send
//! (times, bodies).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    Capabilities, DeadLetter, GroupStats, Message, MessageTrace, QueuePosition, ResendOutcome,
    ResendReport, TopicConfig, TopicStats, DLQ_PROPERTIES,
};
use weirmq_bus::{unix_ms, utc_time};

/// A point in time: Unix milliseconds and RFC 3339 UTC.
#[derive(Serialize)]
pub(super) struct When {
    ms: u64,
    utc: String,
}

impl From<SystemTime> for When {
    fn from(t: SystemTime) -> Self {
        When {
            ms: unix_ms(t),
            utc: utc_time(t),
        }
    }
}

#[derive(Serialize)]
pub(super) struct CapabilitiesView {
    backend: &'static str,
    durable: bool,
    fsync: bool,
    dense_offsets: bool,
    outbox: bool,
    history: bool,
}

impl From<Capabilities> for CapabilitiesView {
    fn from(c: Capabilities) -> Self {
        CapabilitiesView {
            backend: c.backend,
            durable: c.durable,
            fsync: c.fsync,
            dense_offsets: c.dense_offsets,
            outbox: c.outbox,
            history: c.history,
        }
    }
}

#[derive(Serialize)]
pub(super) struct QueueView {
    queue: u32,
    first: u64,
    end: u64,
    messages: u64,
}

#[derive(Serialize)]
pub(super) struct TopicView {
    name: String,
    /// `%DLQ%<group>`, `%SCHEDULE%`, ... are system topics.
    system: bool,
    queue_count: u32,
    messages: u64,
    bytes: u64,
    retention_max_age_secs: Option<u64>,
    retention_max_bytes: Option<u64>,
    trace: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    queues: Option<Vec<QueueView>>,
}

impl TopicView {
    pub(super) fn new(config: &TopicConfig, stats: &TopicStats, per_queue: bool) -> Self {
        let r = config.retention_limits();
        TopicView {
            name: config.name().to_string(),
            system: config.name().starts_with('%'),
            queue_count: config.queue_count(),
            messages: stats.messages(),
            bytes: stats.bytes,
            retention_max_age_secs: r.age().map(|a| a.as_secs()),
            retention_max_bytes: r.bytes(),
            trace: config.traced(),
            queues: per_queue.then(|| {
                stats
                    .queues
                    .iter()
                    .map(|q| QueueView {
                        queue: q.queue,
                        first: q.first,
                        end: q.end,
                        messages: q.messages,
                    })
                    .collect()
            }),
        }
    }
}

#[derive(Serialize)]
pub(super) struct PositionView {
    queue: u32,
    committed: u64,
    end: u64,
    lag: u64,
}

pub(super) fn positions(p: &[QueuePosition]) -> Vec<PositionView> {
    p.iter()
        .map(|p| PositionView {
            queue: p.queue,
            committed: p.committed,
            end: p.max,
            lag: p.lag,
        })
        .collect()
}

/// The counters of a subscription running in this process (zeros if it
/// runs elsewhere or not at all).
#[derive(Serialize)]
pub(super) struct StatsView {
    delivered: u64,
    acked: u64,
    retried: u64,
    dead_lettered: u64,
    in_flight: u64,
    scheduled_retries: u64,
    filtered: u64,
    expired: u64,
}

impl From<GroupStats> for StatsView {
    fn from(s: GroupStats) -> Self {
        StatsView {
            delivered: s.delivered,
            acked: s.acked,
            retried: s.retried,
            dead_lettered: s.dead_lettered,
            in_flight: s.in_flight,
            scheduled_retries: s.scheduled_retries,
            filtered: s.filtered,
            expired: s.expired,
        }
    }
}

#[derive(Serialize)]
pub(super) struct GroupView {
    pub(super) group: String,
    pub(super) topic: String,
    /// Messages not acked yet, every queue.
    pub(super) lag: u64,
    /// Subscribed through this process (its counters are live while it runs).
    pub(super) subscribed_here: bool,
    pub(super) stats: StatsView,
    /// Dead letters of the group (every topic), not resent yet or resent.
    pub(super) dead_letters: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) queues: Option<Vec<PositionView>>,
}

/// A message's body: JSON where it parses as JSON, else text where it is
/// UTF-8, else hex.
#[derive(Serialize)]
pub(super) struct BodyView {
    encoding: &'static str,
    size: usize,
    value: Value,
}

impl BodyView {
    pub(super) fn of(body: &[u8]) -> Self {
        let (encoding, value) = match serde_json::from_slice::<Value>(body) {
            Ok(v) if !body.is_empty() => ("json", v),
            _ => match std::str::from_utf8(body) {
                Ok(s) => ("text", Value::String(s.to_string())),
                Err(_) => ("hex", Value::String(hex(body))),
            },
        };
        BodyView {
            encoding,
            size: body.len(),
            value,
        }
    }
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

#[derive(Serialize)]
pub(super) struct MessageView {
    id: String,
    topic: String,
    queue: u32,
    offset: u64,
    born_at: When,
    tag: Option<String>,
    keys: Vec<String>,
    message_group: Option<String>,
    deliver_at: Option<When>,
    trace_id: Option<String>,
    properties: BTreeMap<String, String>,
    body: BodyView,
}

impl MessageView {
    pub(super) fn of(m: &Message) -> Self {
        MessageView {
            id: m.id().to_string(),
            topic: m.topic().to_string(),
            queue: m.queue(),
            offset: m.offset(),
            born_at: m.born_at().into(),
            tag: m.tag().map(str::to_string),
            keys: m.keys().to_vec(),
            message_group: m.message_group().map(str::to_string),
            deliver_at: m.deliver_at().map(When::from),
            trace_id: m.trace_context().map(|c| c.trace_id().to_string()),
            properties: m.properties().clone(),
            body: BodyView::of(m.body()),
        }
    }
}

#[derive(Serialize)]
pub(super) struct TraceEventView {
    at: When,
    kind: String,
    group: Option<String>,
    attempt: u32,
    detail: Option<String>,
}

#[derive(Serialize)]
pub(super) struct TraceView {
    id: String,
    topic: String,
    queue: u32,
    offset: u64,
    /// The topic records its messages' lives (`TopicConfig::trace`);
    /// without it only the publish is known.
    traced: bool,
    events: Vec<TraceEventView>,
}

impl From<MessageTrace> for TraceView {
    fn from(t: MessageTrace) -> Self {
        TraceView {
            id: t.id.to_string(),
            topic: t.topic,
            queue: t.queue,
            offset: t.offset,
            traced: t.traced,
            events: t
                .events
                .into_iter()
                .map(|e| TraceEventView {
                    at: e.at.into(),
                    kind: format!("{:?}", e.kind).to_lowercase(),
                    group: e.group,
                    attempt: e.attempt,
                    detail: e.detail,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub(super) struct DeadLetterView {
    /// Its offset in the group's dead-letter queue (page with `from`).
    dlq_offset: u64,
    resent: bool,
    /// The original message's id (what resend takes).
    origin_id: Option<String>,
    origin_topic: Option<String>,
    origin_queue: Option<String>,
    origin_offset: Option<String>,
    reason: Option<String>,
    attempts: Option<String>,
    first_failed_at: Option<When>,
    dead_lettered_at: Option<When>,
    message: MessageView,
}

impl DeadLetterView {
    pub(super) fn of(d: &DeadLetter) -> Self {
        let p = d.message.properties();
        let get = |k: &str| p.get(k).cloned();
        let at = |k: &str| {
            p.get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|ms| When::from(UNIX_EPOCH + Duration::from_millis(ms)))
        };
        let mut message = MessageView::of(&d.message);
        message
            .properties
            .retain(|k, _| !DLQ_PROPERTIES.contains(&k.as_str()));
        DeadLetterView {
            dlq_offset: d.dlq_offset,
            resent: d.resent,
            origin_id: get(weirmq_bus::DLQ_ORIGIN_MSG_ID),
            origin_topic: get(weirmq_bus::DLQ_ORIGIN_TOPIC),
            origin_queue: get(weirmq_bus::DLQ_ORIGIN_QUEUE),
            origin_offset: get(weirmq_bus::DLQ_ORIGIN_OFFSET),
            reason: get(weirmq_bus::DLQ_REASON),
            attempts: get(weirmq_bus::DLQ_ATTEMPTS),
            first_failed_at: at(weirmq_bus::DLQ_FIRST_FAILED_AT_MS),
            dead_lettered_at: at(weirmq_bus::DLQ_DEAD_LETTERED_AT_MS),
            message,
        }
    }
}

#[derive(Serialize)]
pub(super) struct ResendView {
    id: String,
    /// `resent`, `not_found`, `already_resent` or `failed`.
    outcome: &'static str,
    reason: Option<String>,
}

pub(super) fn resend_reports(r: Vec<ResendReport>) -> Vec<ResendView> {
    r.into_iter()
        .map(|r| {
            let (outcome, reason) = match r.outcome {
                ResendOutcome::Resent => ("resent", None),
                ResendOutcome::NotFound => ("not_found", None),
                ResendOutcome::AlreadyResent => ("already_resent", None),
                ResendOutcome::Failed(why) => ("failed", Some(why)),
            };
            ResendView {
                id: r.message_id.to_string(),
                outcome,
                reason,
            }
        })
        .collect()
}

/// `POST .../reset`: `{"to": "earliest" | "latest" | <time>}`.
#[derive(Deserialize)]
pub(super) struct ResetBody {
    pub(super) to: String,
}

/// `POST .../resend`: `{"ids": [...]}` or `{"all": true}`.
#[derive(Deserialize)]
pub(super) struct ResendBody {
    #[serde(default)]
    pub(super) ids: Vec<String>,
    #[serde(default)]
    pub(super) all: bool,
}

/// `POST <scope>/api/topics/{topic}/messages`: a test message. A JSON
/// `body` is sent as its JSON text, a string as its UTF-8 bytes.
#[derive(Deserialize)]
pub(super) struct SendBody {
    pub(super) body: Value,
    pub(super) tag: Option<String>,
    #[serde(default)]
    pub(super) keys: Vec<String>,
    #[serde(default)]
    pub(super) properties: BTreeMap<String, String>,
}

/// A time as requests give it: Unix milliseconds, or RFC 3339 UTC
/// (`2026-12-04T10:00:00Z`, fractions of a second allowed), or an age
/// before now (`90s`, `15m`, `2h`, `3d`).
pub(super) fn parse_time(s: &str) -> Result<SystemTime, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "`{s}` is not a time: give Unix milliseconds, an RFC 3339 UTC time \
             (2026-12-04T10:00:00Z) or an age (90s, 15m, 2h, 3d)"
        )
    };
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(UNIX_EPOCH + Duration::from_millis(ms));
    }
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s[..s.len() - 1].parse::<u64>() {
            let secs = n.saturating_mul(match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86_400,
            });
            return SystemTime::now()
                .checked_sub(Duration::from_secs(secs))
                .ok_or_else(bad);
        }
    }
    parse_rfc3339(s).ok_or_else(bad)
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next().flatten().unwrap_or(0));
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let ms = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(3).collect();
        if !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        digits.parse::<u64>().ok()? * 10u64.pow(3 - digits.len() as u32)
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    if days < 0 {
        return None;
    }
    let secs = days as u64 * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_every_accepted_form() {
        let t = parse_time("2026-12-04T10:00:00Z").unwrap();
        assert_eq!(utc_time(t), "2026-12-04T10:00:00Z");
        assert_eq!(
            unix_ms(parse_time("2024-02-29T23:59:59.5Z").unwrap()) % 1000,
            500
        );
        assert_eq!(
            unix_ms(parse_time("1700000000123").unwrap()),
            1_700_000_000_123
        );
        let then = parse_time("15m").unwrap();
        let age = SystemTime::now().duration_since(then).unwrap();
        assert!(
            age >= Duration::from_secs(900) && age < Duration::from_secs(960),
            "{age:?}"
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-04T10:00:00",
            "5w",
            "",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bodies_show_as_json_text_or_hex() {
        assert_eq!(BodyView::of(br#"{"a":1}"#).encoding, "json");
        assert_eq!(BodyView::of(b"hello").encoding, "text");
        let b = BodyView::of(&[0xff, 0x00]);
        assert_eq!((b.encoding, b.value.as_str()), ("hex", Some("ff00")));
        assert_eq!(BodyView::of(b"").encoding, "text");
    }
}
