//! The admin API and dashboard: an actix-web scope a service mounts in its
//! own app ([`admin`]).
//!
//! * `api.rs` — the JSON endpoints (one handler per operation, each a thin
//!   call into the [`Bus`]'s admin methods);
//! * `views.rs` — the JSON shapes of topics, groups, messages, traces and
//!   dead letters, and the parsing of times and message bodies;
//! * `dashboard.rs` — the web dashboard's files, embedded in the binary;
//! * this file — the scope, its settings and who may do what.
//!
//! # Security model
//!
//! Every mutation (reset, resend, purge, send a test message) needs
//! `Authorization: Bearer <token>`, compared in constant time. With no
//! token configured the scope is read-only: mutations answer 403. Reads are
//! open to whoever reaches the port unless [`AdminScope::protect_reads`] is
//! set. Missing or wrong credentials answer 401 with
//! `WWW-Authenticate: Bearer`. Keep the scope on a private interface (see
//! docs/operations.md): the token is not a substitute for TLS.

mod api;
mod dashboard;
mod views;

use std::fmt;

use actix_web::dev::{AppService, HttpServiceFactory};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use crate::web::{error_json, HttpError};
use crate::{Bus, Error};

/// The admin scope of `bus`, at `/admin` unless [`AdminScope::at`] moves
/// it: JSON endpoints under `<scope>/api/...` and the dashboard at
/// `<scope>/`. Read-only until a [`token`](AdminScope::token) is set.
///
/// # Examples
///
/// ```no_run
/// # #[actix_web::main] async fn main() -> std::io::Result<()> {
/// # let bus = weirmq::Bus::builder().open().await.unwrap();
/// let token = std::env::var("WEIRMQ_ADMIN_TOKEN").ok();
/// actix_web::HttpServer::new(move || {
///     let mut admin = weirmq::web::admin(bus.clone());
///     if let Some(t) = &token {
///         admin = admin.token(t.clone());
///     }
///     actix_web::App::new().service(admin)
/// })
/// .bind(("127.0.0.1", 8081))?
/// .run()
/// .await
/// # }
/// ```
pub fn admin(bus: Bus) -> AdminScope {
    AdminScope {
        bus,
        path: "/admin".to_string(),
        token: None,
        protect_reads: false,
    }
}

/// The admin scope's settings; mount it with `App::service` (see
/// [`admin`]).
#[derive(Clone)]
pub struct AdminScope {
    bus: Bus,
    path: String,
    token: Option<String>,
    protect_reads: bool,
}

impl fmt::Debug for AdminScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminScope")
            .field("path", &self.path)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("protect_reads", &self.protect_reads)
            .finish()
    }
}

impl AdminScope {
    /// Mounts the scope at `path` instead of `/admin` (`""` for the root).
    pub fn at(mut self, path: impl Into<String>) -> Self {
        self.path = path.into().trim_end_matches('/').to_string();
        self
    }

    /// Allows mutations to requests with `Authorization: Bearer <token>`.
    /// An empty token is ignored (the scope stays read-only): an empty
    /// environment variable must not open it.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let t = token.into();
        self.token = (!t.is_empty()).then_some(t);
        self
    }

    /// Requires the token for reads too (and the dashboard's data). With
    /// no token configured, reads are then refused (403) as well.
    pub fn protect_reads(mut self) -> Self {
        self.protect_reads = true;
        self
    }
}

impl HttpServiceFactory for AdminScope {
    fn register(self, config: &mut AppService) {
        let state = web::Data::new(Access {
            bus: self.bus,
            token: self.token,
            protect_reads: self.protect_reads,
        });
        let scope = web::scope(&self.path)
            .app_data(state)
            .app_data(web::JsonConfig::default().error_handler(|e, _| {
                AdminError::bad_request(format!("the request body is not valid: {e}")).into()
            }))
            .app_data(web::QueryConfig::default().error_handler(|e, _| {
                AdminError::bad_request(format!("the query string is not valid: {e}")).into()
            }))
            .app_data(web::PathConfig::default().error_handler(|e, _| {
                AdminError::bad_request(format!("the path is not valid: {e}")).into()
            }));
        let scope = api::routes(scope);
        let scope = dashboard::routes(scope);
        HttpServiceFactory::register(scope, config);
    }
}

/// What the scope was configured with: the bus and who may do what.
pub(crate) struct Access {
    bus: Bus,
    token: Option<String>,
    protect_reads: bool,
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Read,
    Write,
}

impl Access {
    /// `Ok` if the request may do what it asks.
    fn check(&self, req: &HttpRequest, need: Need) -> Result<&Bus, AdminError> {
        if need == Need::Read && !self.protect_reads {
            return Ok(&self.bus);
        }
        let Some(token) = &self.token else {
            return Err(AdminError::new(
                StatusCode::FORBIDDEN,
                "read_only",
                "this admin API has no token configured, so it is read-only: \
                 mount it with `.token(..)` (the order service reads WEIRMQ_ADMIN_TOKEN)",
            ));
        };
        let given = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(&self.bus),
            Some(_) => Err(AdminError::unauthorized("the bearer token is wrong")),
            None => Err(AdminError::unauthorized(
                "this needs `Authorization: Bearer <token>` (the admin token)",
            )),
        }
    }
}

/// Equality whose time depends only on the lengths, not on where the
/// first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// An admin API error: a bus [`Error`] (mapped as [`HttpError`] maps it;
/// an unknown topic is a 404)
/// or a refusal of the API itself. The body is
/// `{"error": "<kind>", "message": "<what to do>"}`.
#[derive(Debug)]
pub(crate) struct AdminError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// The bus is busy or its disk full: try again in a second.
    retry_after: bool,
}

impl AdminError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        AdminError {
            status,
            kind,
            message: message.into(),
            retry_after: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        AdminError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        AdminError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn unauthorized(message: &str) -> Self {
        AdminError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl From<Error> for AdminError {
    fn from(e: Error) -> Self {
        // An unknown topic comes from the seam as InvalidConfig naming it:
        // for a resource path that is a 404.
        let unknown = matches!(&e, Error::InvalidConfig { reason }
            if reason.contains("does not exist"));
        let h = HttpError(e);
        AdminError {
            status: if unknown {
                StatusCode::NOT_FOUND
            } else {
                h.status_code()
            },
            kind: if unknown { "not_found" } else { h.kind() },
            message: h.to_string(),
            retry_after: h.retry_after(),
        }
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            r.insert_header(("WWW-Authenticate", r#"Bearer realm="weirmq admin""#));
        }
        if self.retry_after {
            r.insert_header(("Retry-After", "1"));
        }
        r.content_type("application/json")
            .body(error_json(self.kind, &self.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3cres"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret!"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
