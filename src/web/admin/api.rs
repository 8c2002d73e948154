//! The admin API's JSON endpoints, under `<scope>/api`. Each handler checks
//! access (reads, or mutations that need the token), calls the [`Bus`] and
//! answers a view of `views.rs`. A backend that lacks an operation answers
//! 501 with the reason (the bus's `Unsupported`).

use std::collections::BTreeSet;

use actix_web::{web, HttpRequest, HttpResponse, Scope};
use serde::Deserialize;
use serde_json::json;

use super::views::{self, *};
use super::{Access, AdminError, Need};
use crate::{Bus, Durability, MessageId, OutgoingMessage, Resend, ResetTo};

/// Most messages one page of a browse, query or DLQ list returns.
const MAX_PAGE: usize = 1000;
/// A page's size when the request does not say.
const DEFAULT_PAGE: usize = 50;

type Answer = Result<HttpResponse, AdminError>;

pub(super) fn routes(scope: Scope) -> Scope {
    scope.service(
        web::scope("/api")
            .route("/overview", web::get().to(overview))
            .route("/topics", web::get().to(topics))
            .route("/topics/{topic}", web::get().to(topic))
            .route(
                "/topics/{topic}/queues/{queue}/messages",
                web::get().to(browse),
            )
            .route("/topics/{topic}/messages", web::post().to(send))
            .route("/groups", web::get().to(groups))
            .route("/groups/{group}/{topic}", web::get().to(group))
            .route("/groups/{group}/{topic}/reset", web::post().to(reset))
            .route("/messages", web::get().to(find))
            .route("/messages/{id}", web::get().to(message))
            .route("/messages/{id}/trace", web::get().to(trace))
            .route("/retention", web::post().to(retention))
            .route("/dlq", web::get().to(dlq_groups))
            .route("/dlq/{group}", web::get().to(dlq_list))
            .route("/dlq/{group}/resend", web::post().to(dlq_resend))
            .route("/dlq/{group}/purge", web::post().to(dlq_purge))
            .route("/dlq/{group}/{dlq_offset}", web::get().to(dlq_show))
            .default_service(web::to(|req: HttpRequest| async move {
                Err::<HttpResponse, _>(AdminError::not_found(format!(
                    "no admin endpoint {} {}",
                    req.method(),
                    req.path()
                )))
            })),
    )
}

fn ok<T: serde::Serialize>(v: T) -> Answer {
    Ok(HttpResponse::Ok().json(v))
}

/// `?from=&max=` of a page.
#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    from: u64,
    max: Option<usize>,
}

impl Page {
    fn max(&self) -> Result<usize, AdminError> {
        match self.max {
            None => Ok(DEFAULT_PAGE),
            Some(0) => Err(AdminError::bad_request("max must be at least 1")),
            Some(n) => Ok(n.min(MAX_PAGE)),
        }
    }
}

/// A group's view: positions (lag), this process's counters, dead letters.
async fn group_view(
    bus: &Bus,
    group: &str,
    topic: &str,
    per_queue: bool,
) -> Result<GroupView, AdminError> {
    let p = bus.positions(group, topic).await?;
    let stats = bus.group_stats(group, topic).await;
    let running = bus.is_watched(group, topic);
    Ok(GroupView {
        group: group.to_string(),
        topic: topic.to_string(),
        lag: p.iter().map(|q| q.lag).sum(),
        subscribed_here: running,
        stats: stats.into(),
        dead_letters: bus.dead_letter_count(group).await?,
        queues: per_queue.then(|| views::positions(&p)),
    })
}

async fn topic_views(bus: &Bus) -> Result<Vec<TopicView>, AdminError> {
    let mut out = Vec::new();
    for t in bus.topics().await {
        let stats = bus.topic_stats(t.name()).await?;
        out.push(TopicView::new(&t, &stats, false));
    }
    Ok(out)
}

async fn group_views(bus: &Bus) -> Result<Vec<GroupView>, AdminError> {
    let mut out = Vec::new();
    for g in bus.groups().await? {
        out.push(group_view(bus, &g.group, &g.topic, false).await?);
    }
    Ok(out)
}

/// `GET /api/overview`: the backend, every topic and group — what the
/// dashboard's first page shows, in one request.
async fn overview(req: HttpRequest, access: web::Data<Access>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let caps = CapabilitiesView::from(bus.capabilities());
    ok(json!({
        "capabilities": caps,
        "read_only": access.token.is_none(),
        "topics": topic_views(bus).await?,
        "groups": group_views(bus).await?,
    }))
}

/// `GET /api/topics`: every topic (system topics flagged), with message
/// counts and size.
async fn topics(req: HttpRequest, access: web::Data<Access>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    ok(topic_views(bus).await?)
}

/// `GET /api/topics/{topic}`: one topic, per queue.
async fn topic(req: HttpRequest, access: web::Data<Access>, path: web::Path<String>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let name = path.into_inner();
    let Some(config) = bus.topics().await.into_iter().find(|t| t.name() == name) else {
        return Err(AdminError::not_found(format!(
            "topic `{name}` does not exist"
        )));
    };
    let stats = bus.topic_stats(&name).await?;
    ok(TopicView::new(&config, &stats, true))
}

/// `GET /api/topics/{topic}/queues/{queue}/messages?from=&max=`: stored
/// messages of one queue from an offset (bodies decoded for reading).
async fn browse(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<(String, u32)>,
    page: web::Query<Page>,
) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let (topic, queue) = path.into_inner();
    let msgs = bus
        .read_queue(&topic, queue, page.from, page.max()?)
        .await?;
    let next = msgs.last().map(|m| m.offset() + 1);
    ok(json!({
        "messages": msgs.iter().map(|m| MessageView::of(m)).collect::<Vec<_>>(),
        "next": next,
    }))
}

/// `POST /api/topics/{topic}/messages`: sends a test message (token).
async fn send(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<String>,
    body: web::Json<SendBody>,
) -> Answer {
    let bus = access.check(&req, Need::Write)?;
    let body = body.into_inner();
    let bytes = match &body.body {
        serde_json::Value::String(s) => s.clone().into_bytes(),
        v => v.to_string().into_bytes(),
    };
    let mut m = OutgoingMessage::new(path.into_inner(), bytes);
    if let Some(t) = body.tag {
        m = m.tag(t);
    }
    for k in body.keys {
        m = m.key(k);
    }
    for (k, v) in body.properties {
        m = m.property(k, v);
    }
    let r = bus
        .publish_raw(m, Durability::Flushed)
        .await
        .map_err(|e| AdminError::from(e.error))?;
    Ok(HttpResponse::Created().json(json!({
        "id": r.message_id.to_string(),
        "queue": r.queue,
        "offset": r.offset,
    })))
}

/// `GET /api/groups`: every group with its lag, counters and dead letters.
async fn groups(req: HttpRequest, access: web::Data<Access>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    ok(group_views(bus).await?)
}

/// `GET /api/groups/{group}/{topic}`: one group in one topic, per queue.
async fn group(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<(String, String)>,
) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let (g, t) = path.into_inner();
    ok(group_view(bus, &g, &t, true).await?)
}

/// `POST /api/groups/{group}/{topic}/reset` with `{"to": ...}` (token):
/// earliest, latest, or a time; answers the new positions.
async fn reset(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<(String, String)>,
    body: web::Json<ResetBody>,
) -> Answer {
    let bus = access.check(&req, Need::Write)?;
    let (g, t) = path.into_inner();
    let to = match body.to.as_str() {
        "earliest" => ResetTo::Earliest,
        "latest" => ResetTo::Latest,
        s => ResetTo::Time(parse_time(s).map_err(AdminError::bad_request)?),
    };
    let p = bus.reset_offsets(&g, &t, to).await?;
    ok(json!({ "group": g, "topic": t, "queues": views::positions(&p) }))
}

#[derive(Deserialize)]
struct FindQuery {
    topic: Option<String>,
    key: Option<String>,
    since: Option<String>,
    max: Option<usize>,
}

/// `GET /api/messages?topic=T&key=K[&since=TIME][&max=N]`: messages by
/// key, newest first as the store finds them, at or after `since`.
async fn find(req: HttpRequest, access: web::Data<Access>, q: web::Query<FindQuery>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let (Some(topic), Some(key)) = (&q.topic, &q.key) else {
        return Err(AdminError::bad_request(
            "give `topic` and `key` (find one message by id at /api/messages/<id>)",
        ));
    };
    let since = q
        .since
        .as_deref()
        .map(parse_time)
        .transpose()
        .map_err(AdminError::bad_request)?;
    let max = q.max.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let found = bus.query_key(topic, key, max).await?;
    ok(found
        .iter()
        .filter(|m| since.is_none_or(|s| m.born_at() >= s))
        .map(|m| MessageView::of(m))
        .collect::<Vec<_>>())
}

fn message_id(s: &str) -> Result<MessageId, AdminError> {
    s.parse()
        .map_err(|_| AdminError::bad_request(format!("`{s}` is not a message id")))
}

/// `GET /api/messages/{id}`.
async fn message(req: HttpRequest, access: web::Data<Access>, path: web::Path<String>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let id = message_id(&path)?;
    match bus.query_id(id).await? {
        Some(m) => ok(MessageView::of(&m)),
        None => Err(AdminError::not_found(format!(
            "no stored message has id {id}"
        ))),
    }
}

/// `GET /api/messages/{id}/trace`: what happened to it, in order.
async fn trace(req: HttpRequest, access: web::Data<Access>, path: web::Path<String>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let id = message_id(&path)?;
    match bus.trace(id).await? {
        Some(t) => ok(TraceView::from(t)),
        None => Err(AdminError::not_found(format!(
            "no stored message has id {id}"
        ))),
    }
}

/// `GET /api/dlq`: every known group and how many dead letters it has.
async fn dlq_groups(req: HttpRequest, access: web::Data<Access>) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let names: BTreeSet<String> = bus.groups().await?.into_iter().map(|g| g.group).collect();
    let mut out = Vec::new();
    for g in names {
        let n = bus.dead_letter_count(&g).await?;
        out.push(json!({ "group": g, "dead_letters": n }));
    }
    ok(out)
}

/// `GET /api/dlq/{group}?from=&max=`: a page of the group's dead letters.
async fn dlq_list(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<String>,
    page: web::Query<Page>,
) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let letters = bus.dead_letters(&path, page.from, page.max()?).await?;
    let next = letters.last().map(|d| d.dlq_offset + 1);
    ok(json!({
        "group": path.as_str(),
        "dead_letters": letters.iter().map(DeadLetterView::of).collect::<Vec<_>>(),
        "next": next,
    }))
}

/// `GET /api/dlq/{group}/{dlq_offset}`: one dead letter.
async fn dlq_show(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<(String, u64)>,
) -> Answer {
    let bus = access.check(&req, Need::Read)?;
    let (g, at) = path.into_inner();
    match bus.dead_letters(&g, at, 1).await?.first() {
        Some(d) if d.dlq_offset == at => ok(DeadLetterView::of(d)),
        _ => Err(AdminError::not_found(format!(
            "group `{g}` has no dead letter at offset {at}"
        ))),
    }
}

/// `POST /api/dlq/{group}/resend` with `{"ids": [...]}` or `{"all": true}`
/// (token): a result per message.
async fn dlq_resend(
    req: HttpRequest,
    access: web::Data<Access>,
    path: web::Path<String>,
    body: web::Json<ResendBody>,
) -> Answer {
    let bus = access.check(&req, Need::Write)?;
    let which = match (body.all, body.ids.is_empty()) {
        (true, true) => Resend::All,
        (false, false) => Resend::Ids(
            body.ids
                .iter()
                .map(|s| message_id(s))
                .collect::<Result<_, _>>()?,
        ),
        (true, false) => {
            return Err(AdminError::bad_request(
                "give either `ids` or `\"all\": true`, not both",
            ))
        }
        (false, true) => {
            return Err(AdminError::bad_request(
                "give the `ids` to resend, or `\"all\": true`",
            ))
        }
    };
    let reports = bus.resend_dead_letters(&path, which).await?;
    ok(json!({ "group": path.as_str(), "results": resend_reports(reports) }))
}

/// `POST /api/dlq/{group}/purge` (token): removes every dead letter of the
/// group; answers how many.
async fn dlq_purge(req: HttpRequest, access: web::Data<Access>, path: web::Path<String>) -> Answer {
    let bus = access.check(&req, Need::Write)?;
    let n = bus.purge_dead_letters(&path).await?;
    ok(json!({ "group": path.as_str(), "purged": n }))
}

/// `POST /api/retention` (token): applies every topic's retention now;
/// answers what it removed (embedded store; NATS applies its own limits:
/// 501).
async fn retention(req: HttpRequest, access: web::Data<Access>) -> Answer {
    let bus = access.check(&req, Need::Write)?;
    let r = bus.enforce_retention().await?;
    ok(json!({ "messages": r.messages, "bytes": r.bytes, "queues": r.queues }))
}
