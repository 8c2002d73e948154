//! actix-web integration (cargo feature `web`, on by default).
//!
//! A [`Bus`](crate::Bus) is an `Arc` inside: share it as `web::Data<Bus>` and
//! publish from a handler with one `.await`. Return [`HttpError`] from
//! handlers and `?` turns every [`Error`] into the right HTTP response:
//!
//! | error | status |
//! |---|---|
//! | invalid names, limits, filters, configuration, delays; an event that does not encode | 400 Bad Request |
//! | a body over the size limit | 413 Payload Too Large |
//! | a topic or subscription conflict | 409 Conflict |
//! | `Busy` (the store is not keeping up) | 503 Service Unavailable, `Retry-After: 1` |
//! | `Unavailable` (the backend did not confirm: outcome unknown, retry with the same ids) | 503 Service Unavailable, `Retry-After: 1` |
//! | `Closed` (shutting down) | 503 Service Unavailable |
//! | `StoreFull` (the disk is nearly full; nothing stored) | 507 Insufficient Storage, `Retry-After: 1` |
//! | `MemoryFull` (an in-memory bus is at its memory budget; nothing stored) | 507 Insufficient Storage, `Retry-After: 1` |
//! | `Unsupported` | 501 Not Implemented |
//! | storage and data-directory errors, `StoreFailed` | 500 Internal Server Error |
//!
//! The body is JSON: `{"error": "<kind>", "message": "<what to do>"}`.
//!
//! **Metrics**: [`metrics()`] is a `GET /metrics` resource in the
//! Prometheus text format, mounted in one line
//! (`App::new().service(weirmq::web::metrics())`). Call [`install_metrics`]
//! before opening the bus, so subscriptions bind their counters to the
//! Prometheus recorder (docs/observability.md lists what is recorded).
//!
//! ```no_run
//! use actix_web::{post, web, HttpResponse};
//! use weirmq::prelude::*;
//! use weirmq::web::HttpError;
//!
//! #[derive(Serialize, Deserialize, Debug)]
//! struct UserRegistered { user_id: u64 }
//! impl Event for UserRegistered { const TOPIC: &'static str = "user-registered"; }
//!
//! #[post("/users/{id}")]
//! async fn register(bus: web::Data<Bus>, id: web::Path<u64>) -> Result<HttpResponse, HttpError> {
//!     let receipt = bus.publish(&UserRegistered { user_id: *id }).await?;
//!     Ok(HttpResponse::Created().body(receipt.message_id.to_string()))
//! }
//! ```

mod admin;

pub use admin::{admin, AdminScope};

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::Error;

/// A weirmq [`Error`] as an actix-web response (see the module docs for
/// the mapping).
#[derive(Debug)]
pub struct HttpError(pub Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        HttpError(e)
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl HttpError {
    /// A short name of the error's kind, for the JSON body.
    pub fn kind(&self) -> &'static str {
        match &self.0 {
            Error::InvalidName { .. } => "invalid_name",
            Error::ReservedTopic { .. } => "reserved_topic",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::TooManyProperties { .. } => "too_many_properties",
            Error::PropertiesTooLarge { .. } => "properties_too_large",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::InvalidFilter { .. } => "invalid_filter",
            Error::TopicConflict { .. } => "topic_conflict",
            Error::Codec(_) => "codec",
            Error::Storage(_) => "storage",
            Error::StoreFailed { .. } => "store_failed",
            Error::StoreFull { .. } => "store_full",
            Error::MemoryFull { .. } => "memory_full",
            Error::DataDir { .. } => "data_dir",
            Error::AlreadySubscribed { .. } => "already_subscribed",
            Error::DelayTooLong { .. } => "delay_too_long",
            Error::Unsupported { .. } => "unsupported",
            Error::Busy { .. } => "busy",
            Error::Unavailable { .. } => "unavailable",
            Error::Closed => "closed",
            _ => "other",
        }
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        match &self.0 {
            Error::InvalidName { .. }
            | Error::ReservedTopic { .. }
            | Error::TooManyProperties { .. }
            | Error::PropertiesTooLarge { .. }
            | Error::InvalidConfig { .. }
            | Error::InvalidFilter { .. }
            | Error::DelayTooLong { .. }
            | Error::Codec(_) => StatusCode::BAD_REQUEST,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TopicConflict { .. } | Error::AlreadySubscribed { .. } => StatusCode::CONFLICT,
            Error::Busy { .. } | Error::Unavailable { .. } | Error::Closed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            Error::StoreFull { .. } | Error::MemoryFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        if self.retry_after() {
            r.insert_header(("Retry-After", "1"));
        }
        r.content_type("application/json")
            .body(error_json(self.kind(), &self.0.to_string()))
    }
}

impl HttpError {
    /// Whether trying again shortly may succeed (`Busy`, `StoreFull`,
    /// `Unavailable`): the response carries `Retry-After: 1`.
    pub(crate) fn retry_after(&self) -> bool {
        matches!(
            self.0,
            Error::Busy { .. }
                | Error::StoreFull { .. }
                | Error::MemoryFull { .. }
                | Error::Unavailable { .. }
        )
    }
}

/// The JSON body of every error weirmq's web module answers:
/// `{"error": "<kind>", "message": "<what to do>"}`.
pub(crate) fn error_json(kind: &str, message: &str) -> String {
    format!(
        r#"{{"error":{},"message":{}}}"#,
        json_string(kind),
        json_string(message)
    )
}

/// A JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

static PROMETHEUS: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder as this process's `metrics` recorder
/// (the first call; later calls return the same handle), registers
/// weirmq's metric descriptions and turns its sampled gauges on
/// (`weirmq::metrics::describe`), and starts a thread that keeps the
/// recorder's histograms bounded between scrapes. Call it before opening
/// the bus.
///
/// # Errors
///
/// [`Error::InvalidConfig`] if another `metrics` recorder is installed
/// already (then record into that one: call
/// `weirmq::metrics::describe()` after installing it, and serve it
/// yourself).
pub fn install_metrics() -> Result<PrometheusHandle, Error> {
    PROMETHEUS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().map_err(|e| {
                format!(
                    "cannot install the Prometheus recorder ({e}): another metrics \
                         recorder is installed; serve that one instead"
                )
            })?;
            weirmq_bus::metrics::describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("weirmq-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
        .map_err(|reason| Error::InvalidConfig { reason })
}

/// `GET /metrics`: every metric of the process's Prometheus recorder
/// ([`install_metrics`], installed on the first request if it was not), in
/// the Prometheus text format. If another recorder is installed the
/// endpoint answers 501 with the reason.
///
/// # Examples
///
/// ```no_run
/// # #[actix_web::main] async fn main() -> std::io::Result<()> {
/// weirmq::web::install_metrics().expect("no other metrics recorder");
/// // ... open the bus, subscribe ...
/// actix_web::HttpServer::new(|| actix_web::App::new().service(weirmq::web::metrics()))
///     .bind(("127.0.0.1", 9100))?
///     .run()
///     .await
/// # }
/// ```
pub fn metrics() -> actix_web::Resource {
    web::resource("/metrics").route(web::get().to(render_metrics))
}

async fn render_metrics() -> HttpResponse {
    match install_metrics() {
        Ok(handle) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(handle.render()),
        Err(e) => HttpResponse::NotImplemented()
            .content_type("application/json")
            .body(error_json("metrics_unavailable", &e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses_and_json() {
        let busy = HttpError(Error::Busy { pending: 3 });
        assert_eq!(busy.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        let r = busy.error_response();
        assert_eq!(r.headers().get("Retry-After").unwrap(), "1");
        let id = weirmq_bus::MessageId::generate();
        let unknown = HttpError(Error::Unavailable {
            operation: "NATS publish not acknowledged".into(),
            detail: "timed out".into(),
            message_ids: vec![id],
        });
        assert_eq!(unknown.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unknown.kind(), "unavailable");
        let r = unknown.error_response();
        assert_eq!(r.headers().get("Retry-After").unwrap(), "1");
        let text = unknown.0.to_string();
        assert!(
            text.contains(&id.to_string()) && text.contains("Publish::message_id"),
            "{text}"
        );
        let too_big = HttpError(Error::BodyTooLarge { size: 5, max: 4 });
        assert_eq!(too_big.status_code(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            HttpError(Error::InvalidConfig { reason: "x".into() }).status_code(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(json_string("a\"b\\\n\u{1}"), r#""a\"b\\\n\u0001""#);
    }
}
