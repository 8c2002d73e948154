//! The dashboard in a real browser: the order service runs here, with a
//! stopped group (lag) and a group whose handler is broken (dead letters);
//! `tests/browser/dashboard.mjs` drives headless Chromium through
//! Playwright — the overview shows the lag, a dead letter is resent from the
//! DLQ page — and the test then sees the resent message delivered.
//! Screenshots land in `target/dashboard-screenshots/`.
//!
//! Needs node, `/usr/bin/chromium` (or `CHROMIUM`) and
//! `tests/browser/node_modules` (`npm ci` there); `.ci/run` installs them.
//! Without them the test is skipped, unless `WEIRMQ_REQUIRE_BROWSER` is set
//! (CI): then it fails.

#[path = "../examples/order_service/app.rs"]
mod app;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};
use support::*;
use weirmq::prelude::*;
use weirmq::MessageId;

const TOKEN: &str = "browser-test-token";
const ORDERS: u64 = 4;

/// Acks every order event.
struct Audit;
impl Actor for Audit {
    type Context = Context<Self>;
}
impl Handler<Delivery<app::OrderEvent>> for Audit {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, _: Delivery<app::OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        Ok(())
    }
}

/// Dead-letters every order event while `broken`; records what it handles.
struct Ledger {
    broken: Arc<AtomicBool>,
    handled: Arc<Mutex<Vec<MessageId>>>,
}
impl Actor for Ledger {
    type Context = Context<Self>;
}
impl Handler<Delivery<app::OrderEvent>> for Ledger {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<app::OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        if self.broken.load(Ordering::SeqCst) {
            return Err(HandlerError::dead_letter("the ledger is broken"));
        }
        self.handled.lock().unwrap().push(d.message_id());
        Ok(())
    }
}

/// What the browser test needs, or why it cannot run.
fn browser_kit() -> Result<(PathBuf, PathBuf), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not installed".into());
    }
    if !chromium.exists() {
        return Err(format!("{} does not exist", chromium.display()));
    }
    if !dir.join("node_modules/playwright-core").exists() {
        return Err(format!(
            "playwright-core is missing: run `npm ci` in {}",
            dir.display()
        ));
    }
    Ok((dir, chromium))
}

#[actix_web::test]
async fn the_dashboard_shows_lag_and_resends_a_dead_letter() {
    let (dir, chromium) = match browser_kit() {
        Ok(kit) => kit,
        Err(why) if std::env::var_os("WEIRMQ_REQUIRE_BROWSER").is_some() => {
            panic!("{why}; WEIRMQ_REQUIRE_BROWSER is set, so this is a failure")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why} (set WEIRMQ_REQUIRE_BROWSER to make this a failure)");
            return;
        }
    };
    let data = temp_dir();
    let running = app::start(app::Config {
        port: 0,
        data_dir: data.path().to_path_buf(),
        payment_timeout: Duration::from_secs(60),
        coupon_threshold: 10_000,
        coupon_failure_rate: 0.0,
        admin_token: Some(TOKEN.into()),
    })
    .await
    .expect("start the order service");
    let base = format!("http://127.0.0.1:{}", running.port);
    let bus = running.bus.clone();

    // `audit`: started once, then stopped — its lag grows with every order.
    let audit = bus
        .subscribe::<app::OrderEvent>("audit")
        .start_from(StartFrom::Earliest)
        .members(1, || Audit)
        .start()
        .await
        .unwrap();
    audit.drain().await.unwrap();
    // `ledger`: broken, so every order event is dead-lettered.
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (b, h) = (broken.clone(), handled.clone());
    let ledger = bus
        .subscribe::<app::OrderEvent>("ledger")
        .start_from(StartFrom::Earliest)
        .members(1, move || Ledger {
            broken: b.clone(),
            handled: h.clone(),
        })
        .start()
        .await
        .unwrap();

    let client = awc::Client::default();
    for i in 0..ORDERS {
        let r = client
            .post(format!("{base}/orders"))
            .send_json(&json!({ "user_id": i, "items": [{"sku": "pen", "qty": 1}], "amount": 500 }))
            .await
            .expect("POST /orders");
        assert_eq!(r.status(), 201);
    }
    wait_until(
        "every order event of the ledger is dead-lettered",
        Duration::from_secs(30),
        || async { bus.dead_letter_count("ledger").await.unwrap() >= ORDERS },
    )
    .await;
    let lag = lag(&bus, "audit", app::OrderEvent::TOPIC).await;
    assert!(lag >= ORDERS, "audit's lag: {lag}");
    // Fixed: what the page resends is handled.
    broken.store(false, Ordering::SeqCst);

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    let script = dir.join("dashboard.mjs");
    let out = actix_web::rt::task::spawn_blocking({
        let (base, shots) = (base.clone(), shots.clone());
        move || {
            Command::new("node")
                .arg(script)
                .current_dir(&dir)
                .env("BASE", base)
                .env("TOKEN", TOKEN)
                .env("LAG_GROUP", "audit")
                .env("LAG", lag.to_string())
                .env("DLQ_GROUP", "ledger")
                .env("SHOTS", shots)
                .env("CHROMIUM", chromium)
                .output()
                .expect("run node")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("no result line: {stdout}"));
    let resent: MessageId = result["resent"].as_str().unwrap().parse().unwrap();
    wait_until(
        "the dead letter resent from the page is delivered",
        Duration::from_secs(30),
        || {
            let seen = handled.lock().unwrap().contains(&resent);
            async move { seen }
        },
    )
    .await;
    for shot in ["overview", "group", "dlq", "message", "messages"] {
        let p = shots.join(format!("{shot}.png"));
        assert!(
            std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000),
            "{} was not saved",
            p.display()
        );
    }
    ledger.drain().await.unwrap();
    running.stop().await.unwrap();
}
