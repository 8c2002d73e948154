//! Where commands go: an admin API over HTTP (online), or a data directory
//! opened in this process (offline, the service stopped) and answered by
//! the same admin scope, mounted in process without a port — so both modes
//! give the same answers.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use actix_web::test::{self, TestRequest};
use actix_web::App;
use serde_json::Value;

use crate::Failure;

/// The token the offline scope is mounted with: whoever can open the data
/// directory may change it anyway.
const OFFLINE_TOKEN: &str = "weirmq-cli-offline";

type Call = Rc<
    dyn Fn(
        &'static str,
        String,
        Option<Value>,
    ) -> Pin<Box<dyn Future<Output = Result<(u16, Value), Failure>>>>,
>;

/// An admin API to send requests to.
pub struct Target {
    call: Call,
    /// Offline: the bus, shut down at the end.
    bus: Option<weirmq::Bus>,
}

impl Target {
    /// An admin API at `url` (its scope, e.g. `http://127.0.0.1:8080/admin`).
    pub fn online(url: &str, token: Option<String>) -> Target {
        let base = url.trim_end_matches('/').to_string();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        let call: Call = Rc::new(move |method, path, body| {
            let url = format!("{base}/api{path}");
            let (agent, token) = (agent.clone(), token.clone());
            Box::pin(async move {
                let unreachable = |e: ureq::Error| Failure::Unreachable(format!("{url}: {e}"));
                let mut resp = match method {
                    "GET" => {
                        let mut r = agent.get(&url);
                        if let Some(t) = &token {
                            r = r.header("Authorization", &format!("Bearer {t}"));
                        }
                        r.call().map_err(unreachable)?
                    }
                    _ => {
                        let mut r = agent.post(&url).content_type("application/json");
                        if let Some(t) = &token {
                            r = r.header("Authorization", &format!("Bearer {t}"));
                        }
                        r.send(body.unwrap_or(Value::Null).to_string())
                            .map_err(unreachable)?
                    }
                };
                let status = resp.status().as_u16();
                let text = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| Failure::Unreachable(format!("{url}: reading the answer: {e}")))?;
                let v = serde_json::from_str(&text).map_err(|_| {
                    Failure::Unreachable(format!(
                        "{url} did not answer JSON (status {status}): is it a weirmq admin API \
                         (the scope's path, e.g. http://host:port/admin)?"
                    ))
                })?;
                Ok((status, v))
            })
        });
        Target { call, bus: None }
    }

    /// The store in `dir`, opened here (the service using it must be
    /// stopped).
    pub async fn offline(dir: &Path) -> Result<Target, Failure> {
        if !dir.join("weirmq.store").exists() {
            return Err(Failure::NotFound(format!(
                "{} is not a weirmq data directory (no store in it)",
                dir.display()
            )));
        }
        let bus = weirmq::Bus::builder()
            .data_dir(dir)
            .open()
            .await
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("locked") {
                    Failure::Unreachable(format!("{text}{}", holder(dir)))
                } else {
                    Failure::Failed(text)
                }
            })?;
        let app = Rc::new(
            test::init_service(
                App::new().service(weirmq::web::admin(bus.clone()).at("").token(OFFLINE_TOKEN)),
            )
            .await,
        );
        let call: Call = Rc::new(move |method, path, body| {
            let app = app.clone();
            Box::pin(async move {
                let req = match method {
                    "GET" => TestRequest::get(),
                    _ => TestRequest::post().set_json(body.unwrap_or(Value::Null)),
                }
                .uri(&format!("/api{path}"))
                .insert_header(("Authorization", format!("Bearer {OFFLINE_TOKEN}")));
                let resp = test::call_service(&*app, req.to_request()).await;
                let status = resp.status().as_u16();
                let body = test::read_body(resp).await;
                let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
                Ok((status, v))
            })
        });
        Ok(Target {
            call,
            bus: Some(bus),
        })
    }

    /// `GET <scope>/api<path>`: the answer, or the failure it reports.
    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        let (status, v) = (self.call)("GET", path.to_string(), None).await?;
        Failure::check(status, v)
    }

    /// `POST <scope>/api<path>` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        let (status, v) = (self.call)("POST", path.to_string(), Some(body)).await?;
        Failure::check(status, v)
    }

    /// Closes an offline store cleanly.
    pub async fn close(self) {
        if let Some(bus) = self.bus {
            let _ = bus.shutdown().await;
        }
    }
}

/// Which process holds `dir` open, from /proc (Linux): `"; held by ..."`,
/// or nothing if it cannot be told.
fn holder(dir: &Path) -> String {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return String::new();
    };
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return String::new();
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t: PathBuf| t.starts_with(&dir)));
        if holds {
            let cmd = std::fs::read(p.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .split('\0')
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            return format!(
                "; held by process {pid} ({cmd}): stop it, or use --url against its admin API"
            );
        }
    }
    String::new()
}
