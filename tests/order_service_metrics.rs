//! The order service's `GET /metrics` (Prometheus): a group's lag rises
//! while it is stopped and falls to 0 once it catches up; a dead letter
//! shows in the consumed counter and the dead-letter gauge.

#[path = "../examples/order_service/app.rs"]
mod app;
mod support;

use std::time::Duration;

use actix::prelude::*;
use serde_json::json;
use support::*;
use weirmq::prelude::*;

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

/// Refuses every order event for good.
struct Refuse;
impl Actor for Refuse {
    type Context = Context<Self>;
}
impl Handler<Delivery<app::OrderEvent>> for Refuse {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, _: Delivery<app::OrderEvent>, _: &mut Context<Self>) -> Self::Result {
        Err(HandlerError::dead_letter("refused by the test"))
    }
}

/// The sum of the samples of `name` (with or without `_total`) whose labels
/// contain every one of `labels`; `None` if there is none.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or("");
        if metric != name && metric != format!("{name}_total") {
            continue;
        }
        if labels.iter().all(|l| series.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

async fn scrape(client: &awc::Client, base: &str) -> String {
    let mut r = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert!(r.status().is_success(), "GET /metrics: {}", r.status());
    let body = r.body().limit(16 << 20).await.expect("metrics body");
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[actix_web::test]
async fn lag_rises_while_a_group_is_stopped_and_dead_letters_are_counted() {
    let dir = temp_dir();
    let running = app::start(app::Config {
        port: 0,
        data_dir: dir.path().to_path_buf(),
        payment_timeout: Duration::from_secs(30),
        coupon_threshold: 10_000,
        coupon_failure_rate: 0.0,
        admin_token: Some("test-admin-token".into()),
    })
    .await
    .expect("start");
    let base = format!("http://127.0.0.1:{}", running.port);
    let client = awc::Client::default();
    let bus = running.bus.clone();

    // A group of the test's, started once (so the bus watches it), then
    // stopped.
    let audit = bus
        .subscribe::<app::OrderEvent>("audit")
        .start_from(StartFrom::Earliest)
        .members(1, || Audit)
        .start()
        .await
        .unwrap();
    audit.drain().await.unwrap();

    for i in 0..20u64 {
        let r = client
            .post(format!("{base}/orders"))
            .send_json(&json!({
                "user_id": i,
                "items": [{"sku": "sku-1", "qty": 1}],
                "amount": 500,
            }))
            .await
            .expect("POST /orders");
        assert_eq!(r.status(), 201);
    }
    let lag = |body: &str| sample(body, "weirmq_group_lag", &[r#"group="audit""#]);
    wait_until(
        "the stopped group's lag counts the 20 orders",
        Duration::from_secs(30),
        || {
            let (client, base) = (client.clone(), base.clone());
            async move { lag(&scrape(&client, &base).await).is_some_and(|v| v >= 20.0) }
        },
    )
    .await;

    // Started again, it catches up and its lag falls to 0.
    let audit = bus
        .subscribe::<app::OrderEvent>("audit")
        .members(1, || Audit)
        .start()
        .await
        .unwrap();
    wait_until(
        "the group's lag falls to 0",
        Duration::from_secs(30),
        || {
            let (client, base) = (client.clone(), base.clone());
            async move { lag(&scrape(&client, &base).await) == Some(0.0) }
        },
    )
    .await;
    let body = scrape(&client, &base).await;
    let acked = sample(
        &body,
        "messaging_client_consumed_messages",
        &[r#"group="audit""#, r#"outcome="ack""#],
    );
    assert!(acked.is_some_and(|v| v >= 20.0), "acked: {acked:?}");
    let published = sample(
        &body,
        "messaging_client_published_messages",
        &[r#"topic="order-events""#, r#"outcome="ok""#],
    );
    assert!(
        published.is_some_and(|v| v >= 20.0),
        "published: {published:?}"
    );

    // A group that refuses everything: dead letters, counted.
    let refuse = bus
        .subscribe::<app::OrderEvent>("refuse")
        .start_from(StartFrom::Earliest)
        .members(1, || Refuse)
        .start()
        .await
        .unwrap();
    wait_until(
        "the dead letters are counted",
        Duration::from_secs(30),
        || {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let body = scrape(&client, &base).await;
                let dead = sample(
                    &body,
                    "messaging_client_consumed_messages",
                    &[r#"group="refuse""#, r#"outcome="dead_letter""#],
                );
                let queued = sample(&body, "weirmq_dead_letters", &[r#"group="refuse""#]);
                dead.is_some_and(|v| v >= 20.0) && queued.is_some_and(|v| v >= 20.0)
            }
        },
    )
    .await;

    refuse.drain().await.unwrap();
    audit.drain().await.unwrap();
    running.stop().await.unwrap();
}
