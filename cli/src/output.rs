//! Human output: aligned tables of the admin API's JSON (`--json` prints
//! the JSON itself).

use serde_json::Value;

/// A table: a header row and rows, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        x => x.to_string(),
    }
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut x, mut i) = (n as f64, 0);
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

pub fn topics(v: &Value) -> String {
    table(
        &["topic", "queues", "messages", "size", "retention", "trace"],
        list(v)
            .iter()
            .map(|t| {
                let age = t["retention_max_age_secs"]
                    .as_u64()
                    .map_or("no age limit".to_string(), |a| format!("{} h", a / 3600));
                vec![
                    s(&t["name"]),
                    s(&t["queue_count"]),
                    s(&t["messages"]),
                    bytes(t["bytes"].as_u64().unwrap_or(0)),
                    age,
                    if t["trace"] == true { "on" } else { "off" }.into(),
                ]
            })
            .collect(),
    )
}

pub fn groups(v: &Value) -> String {
    table(
        &[
            "group",
            "topic",
            "lag",
            "in flight",
            "retries waiting",
            "dead letters",
        ],
        list(v)
            .iter()
            .map(|g| {
                vec![
                    s(&g["group"]),
                    s(&g["topic"]),
                    s(&g["lag"]),
                    s(&g["stats"]["in_flight"]),
                    s(&g["stats"]["scheduled_retries"]),
                    s(&g["dead_letters"]),
                ]
            })
            .collect(),
    )
}

pub fn lag(v: &Value) -> String {
    let mut rows = Vec::new();
    for g in list(v) {
        for q in list(&g["queues"]) {
            rows.push(vec![
                s(&g["group"]),
                s(&g["topic"]),
                s(&q["queue"]),
                s(&q["committed"]),
                s(&q["end"]),
                s(&q["lag"]),
            ]);
        }
    }
    table(
        &["group", "topic", "queue", "committed", "end", "lag"],
        rows,
    )
}

/// `key   value` lines, keys padded.
fn fields(pairs: Vec<(&str, String)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k:<14} {v}\n"))
        .collect()
}

/// Where a dead letter came from: `topic q<queue>@<offset>`.
fn origin(d: &Value) -> String {
    format!(
        "{} q{}@{}",
        s(&d["origin_topic"]),
        s(&d["origin_queue"]),
        s(&d["origin_offset"])
    )
}

fn body(m: &Value) -> String {
    match &m["body"]["value"] {
        Value::String(x) => x.clone(),
        v => v.to_string(),
    }
}

pub fn message_line(m: &Value) -> String {
    format!(
        "{} q{}@{} {} {}{}",
        s(&m["born_at"]["utc"]),
        s(&m["queue"]),
        s(&m["offset"]),
        s(&m["id"]),
        m["tag"]
            .as_str()
            .map(|t| format!("[{t}] "))
            .unwrap_or_default(),
        body(m)
    )
}

pub fn message(m: &Value) -> String {
    fields(vec![
        ("id", s(&m["id"])),
        ("topic", s(&m["topic"])),
        ("queue", s(&m["queue"])),
        ("offset", s(&m["offset"])),
        ("published", s(&m["born_at"]["utc"])),
        ("tag", s(&m["tag"])),
        (
            "keys",
            list(&m["keys"])
                .iter()
                .map(s)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("message group", s(&m["message_group"])),
        ("trace id", s(&m["trace_id"])),
        ("properties", m["properties"].to_string()),
        (
            "body",
            format!("({}) {}", s(&m["body"]["encoding"]), body(m)),
        ),
    ])
}

pub fn messages(v: &Value) -> String {
    list(v).iter().map(|m| message_line(m) + "\n").collect()
}

pub fn trace(v: &Value) -> String {
    let mut out = format!(
        "message {} in {} q{}@{}\n",
        s(&v["id"]),
        s(&v["topic"]),
        s(&v["queue"]),
        s(&v["offset"])
    );
    if v["traced"] != true {
        out.push_str("(the topic does not record traces: TopicConfig::trace)\n");
    }
    out + &table(
        &["at", "event", "group", "attempt", "detail"],
        list(&v["events"])
            .iter()
            .map(|e| {
                vec![
                    s(&e["at"]["utc"]),
                    s(&e["kind"]),
                    s(&e["group"]),
                    s(&e["attempt"]),
                    s(&e["detail"]),
                ]
            })
            .collect(),
    )
}

pub fn dlq_groups(v: &Value) -> String {
    table(
        &["group", "dead letters"],
        list(v)
            .iter()
            .map(|g| vec![s(&g["group"]), s(&g["dead_letters"])])
            .collect(),
    )
}

pub fn dead_letters(v: &Value) -> String {
    table(
        &[
            "dlq offset",
            "original id",
            "from",
            "attempts",
            "state",
            "reason",
        ],
        list(v)
            .iter()
            .map(|d| {
                vec![
                    s(&d["dlq_offset"]),
                    s(&d["origin_id"]),
                    origin(d),
                    s(&d["attempts"]),
                    if d["resent"] == true {
                        "resent"
                    } else {
                        "dead"
                    }
                    .into(),
                    s(&d["reason"]),
                ]
            })
            .collect(),
    )
}

pub fn dead_letter(d: &Value) -> String {
    fields(vec![
        ("dlq offset", s(&d["dlq_offset"])),
        ("original id", s(&d["origin_id"])),
        ("from", origin(d)),
        ("reason", s(&d["reason"])),
        ("attempts", s(&d["attempts"])),
        ("dead-lettered", s(&d["dead_lettered_at"]["utc"])),
        ("resent", s(&d["resent"])),
    ]) + &message(&d["message"])
}

pub fn resend(v: &Value) -> String {
    let rows: Vec<Vec<String>> = list(&v["results"])
        .iter()
        .map(|r| vec![s(&r["id"]), s(&r["outcome"]), s(&r["reason"])])
        .collect();
    if rows.is_empty() {
        return "nothing to resend\n".into();
    }
    table(&["id", "outcome", "reason"], rows)
}

pub fn positions(v: &Value) -> String {
    table(
        &["queue", "committed", "end", "lag"],
        list(&v["queues"])
            .iter()
            .map(|q| {
                vec![
                    s(&q["queue"]),
                    s(&q["committed"]),
                    s(&q["end"]),
                    s(&q["lag"]),
                ]
            })
            .collect(),
    )
}
