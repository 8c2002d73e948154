//! The web dashboard: three static files (plain HTML, CSS and JavaScript,
//! no build step, no CDN) compiled into the binary and served at
//! `<scope>/`. The page reads the JSON API of `api.rs` with the token the
//! operator types in (kept in the tab's `sessionStorage`, sent as a bearer
//! token); it holds no state of its own.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, Scope};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

pub(super) fn routes(scope: Scope) -> Scope {
    scope
        .route("", web::get().to(index))
        .route("/", web::get().to(index))
        .route("/app.js", web::get().to(|| file(SCRIPT, "text/javascript")))
        .route("/style.css", web::get().to(|| file(STYLE, "text/css")))
}

/// The page; a request for the scope without its trailing slash is sent
/// to it, so the page's relative links resolve inside the scope.
async fn index(req: HttpRequest) -> HttpResponse {
    let path = req.path();
    if !path.ends_with('/') {
        return HttpResponse::PermanentRedirect()
            .insert_header((header::LOCATION, format!("{path}/")))
            .finish();
    }
    file(INDEX, "text/html").await
}

async fn file(body: &'static str, kind: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(format!("{kind}; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
        ))
        .body(body)
}
