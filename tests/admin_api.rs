//! The admin API (`weirmq::web::admin`) through HTTP on both backends:
//! every endpoint, what a backend lacks (501), and who may do what (401
//! without or with a wrong token, 403 on a read-only scope).

#[macro_use]
mod support;

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use actix_web::App;
use serde_json::{json, Value};
use support::backend::Backend;
use support::*;
use weirmq::prelude::*;
use weirmq::TopicConfig;

on_every_backend!(
    every_endpoint_answers_on_a_bus_with_a_dead_letter,
    mutations_need_the_token_and_reads_can_too,
);

const TOKEN: &str = "s3cret-admin-token";

/// Sends a request to the app: (status, JSON body, headers).
macro_rules! call {
    ($app:expr, $req:expr $(,)?) => {
        async {
            let resp = test::call_service($app, $req.to_request()).await;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = test::read_body(resp).await;
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!("not JSON ({status}): {}", String::from_utf8_lossy(&body))
            });
            (status, v, headers)
        }
    };
}

fn get(path: &str) -> TestRequest {
    TestRequest::get().uri(path)
}

fn post(path: &str, body: Value, token: Option<&str>) -> TestRequest {
    let r = TestRequest::post().uri(path).set_json(body);
    match token {
        Some(t) => r.insert_header(("Authorization", format!("Bearer {t}"))),
        None => r,
    }
}

async fn every_endpoint_answers_on_a_bus_with_a_dead_letter(b: Backend) {
    let bus = b.open().await;
    // Message trace where the backend records it (NATS: Unsupported).
    let traced = bus.capabilities().history;
    bus.create_topic(TopicConfig::new(Num::TOPIC).queues(4).trace(traced))
        .await
        .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let log = Log::default();
    let bk = broken.clone();
    let _sub = bus
        .subscribe::<Num>("billing")
        .start_from(StartFrom::Earliest)
        .retry(RetryPolicy::fixed(Duration::from_millis(20), 2))
        .members(
            1,
            recorders(
                &log,
                Arc::new(move |d: &Delivery<Num>| {
                    if d.event().n == 3 && bk.load(AtomicOrdering::SeqCst) {
                        Err(HandlerError::retry("order 3 is broken"))
                    } else {
                        Ok(())
                    }
                }),
            ),
        )
        .start()
        .await
        .unwrap();
    for n in 0..10u64 {
        bus.publish_with(&Num { n }, Publish::new().key(format!("order-{n}")))
            .await
            .unwrap();
    }
    wait_until(
        "order 3 is dead-lettered",
        Duration::from_secs(30),
        || async { bus.dead_letter_count("billing").await.unwrap() == 1 },
    )
    .await;
    caught_up(&bus, "billing", Num::TOPIC).await;

    let app =
        test::init_service(App::new().service(weirmq::web::admin(bus.clone()).token(TOKEN))).await;

    // Overview: the topic with its ten messages, the group caught up with
    // one dead letter.
    let (s, v, _) = call!(&app, get("/admin/api/overview")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["read_only"], false);
    assert_eq!(
        v["capabilities"]["backend"],
        bus.capabilities().backend,
        "{v}"
    );
    let topic = v["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == Num::TOPIC)
        .unwrap_or_else(|| panic!("no topic {} in {v}", Num::TOPIC))
        .clone();
    assert_eq!(topic["messages"], 10, "{topic}");
    assert_eq!(topic["queue_count"], 4);
    assert!(topic["bytes"].as_u64().unwrap() > 0, "{topic}");
    let group = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "billing" && g["topic"] == Num::TOPIC)
        .unwrap_or_else(|| panic!("no group billing in {v}"))
        .clone();
    assert_eq!(group["lag"], 0, "{group}");
    assert_eq!(group["dead_letters"], 1, "{group}");
    assert_eq!(group["subscribed_here"], true);
    assert_eq!(group["stats"]["dead_lettered"], 1, "{group}");

    // Topics: one per queue, the counts add up; an unknown one is a 404.
    let (s, v, _) = call!(&app, get("/admin/api/topics")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == Num::TOPIC));
    let (s, v, _) = call!(&app, get(&format!("/admin/api/topics/{}", Num::TOPIC))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let queues = v["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 4);
    let total: u64 = queues.iter().map(|q| q["messages"].as_u64().unwrap()).sum();
    assert_eq!(total, 10, "{v}");
    let (s, v, _) = call!(&app, get("/admin/api/topics/no-such-topic")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    // Browse every queue from its first offset: the ten events, decoded.
    let mut seen = Vec::new();
    for q in queues {
        let (s, v, _) = call!(
            &app,
            get(&format!(
                "/admin/api/topics/{}/queues/{}/messages?from={}&max=100",
                Num::TOPIC,
                q["queue"],
                q["first"]
            )),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for m in v["messages"].as_array().unwrap() {
            assert_eq!(m["body"]["encoding"], "json", "{m}");
            seen.push(m["body"]["value"]["n"].as_u64().unwrap());
        }
    }
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    let (s, _, _) = call!(
        &app,
        get(&format!(
            // 4 queues and 9 priority lanes: queues 0 to 12.
            "/admin/api/topics/{}/queues/13/messages",
            Num::TOPIC
        )),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v, _) = call!(
        &app,
        get(&format!(
            "/admin/api/topics/{}/queues/0/messages?max=0",
            Num::TOPIC
        )),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Groups.
    let (s, v, _) = call!(&app, get("/admin/api/groups")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["group"] == "billing"));
    let (s, v, _) = call!(
        &app,
        get(&format!("/admin/api/groups/billing/{}", Num::TOPIC))
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["queues"].as_array().unwrap().len(), 4);
    assert!(v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .all(|q| q["lag"] == 0));

    // The dead letter: listed, shown, with where it came from and why.
    let (s, v, _) = call!(&app, get("/admin/api/dlq")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["group"] == "billing" && g["dead_letters"] == 1));
    let (s, v, _) = call!(&app, get("/admin/api/dlq/billing")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let letters = v["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{v}");
    let dl = &letters[0];
    assert!(
        dl["reason"]
            .as_str()
            .unwrap()
            .ends_with("order 3 is broken"),
        "{dl}"
    );
    assert_eq!(dl["attempts"], "2");
    assert_eq!(dl["origin_topic"], Num::TOPIC);
    assert_eq!(dl["message"]["body"]["value"]["n"], 3);
    assert!(dl["message"]["properties"].get("DLQ_REASON").is_none());
    let origin = dl["origin_id"].as_str().unwrap().to_string();
    let (s, v, _) = call!(
        &app,
        get(&format!("/admin/api/dlq/billing/{}", dl["dlq_offset"])),
    )
    .await;
    assert_eq!(
        (s, v["origin_id"].as_str()),
        (StatusCode::OK, Some(origin.as_str()))
    );
    let (s, _, _) = call!(&app, get("/admin/api/dlq/billing/999999")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // By id, key and trace: the embedded store answers, NATS says why not.
    let (s, v, _) = call!(&app, get(&format!("/admin/api/messages/{origin}"))).await;
    let (ts, tv, _) = call!(&app, get(&format!("/admin/api/messages/{origin}/trace"))).await;
    let (ks, kv, _) = call!(
        &app,
        get(&format!(
            "/admin/api/messages?topic={}&key=order-3&since=1h",
            Num::TOPIC
        )),
    )
    .await;
    if bus.capabilities().history {
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["keys"], json!(["order-3"]));
        assert_eq!(ts, StatusCode::OK, "{tv}");
        assert_eq!(tv["id"], origin.as_str());
        assert_eq!(tv["events"][0]["kind"], "published", "{tv}");
        assert_eq!(ks, StatusCode::OK, "{kv}");
        assert_eq!(kv.as_array().unwrap().len(), 1, "{kv}");
        assert_eq!(kv[0]["id"], origin.as_str());
    } else {
        for (s, v) in [(s, v), (ts, tv), (ks, kv)] {
            assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{v}");
            assert_eq!(v["error"], "unsupported");
            assert!(!v["message"].as_str().unwrap().is_empty());
        }
    }
    let (s, _, _) = call!(&app, get("/admin/api/messages/not-an-id")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v, _) = call!(&app, get("/admin/api/messages?key=order-3")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Fixed: resend it from the API; it is delivered again, once.
    broken.store(false, AtomicOrdering::SeqCst);
    let before = log.len();
    let (s, v, _) = call!(
        &app,
        post(
            "/admin/api/dlq/billing/resend",
            json!({ "ids": [origin] }),
            Some(TOKEN)
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["results"],
        json!([{ "id": origin, "outcome": "resent", "reason": null }])
    );
    delivered(&log, before + 1).await;
    assert!(log.entries()[before..].iter().any(|(_, n, _)| *n == 3));
    let (s, v, _) = call!(
        &app,
        post(
            "/admin/api/dlq/billing/resend",
            json!({ "all": true }),
            Some(TOKEN)
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 0, "{v}");
    let (s, v, _) = call!(
        &app,
        post(
            "/admin/api/dlq/billing/resend",
            json!({ "ids": [origin] }),
            Some(TOKEN)
        ),
    )
    .await;
    assert_eq!(v["results"][0]["outcome"], "already_resent", "{s} {v}");
    let (s, _, _) = call!(
        &app,
        post("/admin/api/dlq/billing/resend", json!({}), Some(TOKEN)),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // A test message, sent from the API, reaches the handler.
    let (s, v, _) = call!(
        &app,
        post(
            &format!("/admin/api/topics/{}/messages", Num::TOPIC),
            json!({ "body": { "n": 100 }, "tag": "test", "keys": ["probe"] }),
            Some(TOKEN),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["id"].as_str().is_some());
    wait_until(
        "the test message is handled",
        Duration::from_secs(30),
        || {
            let seen = log.entries().iter().any(|(_, n, _)| *n == 100);
            async move { seen }
        },
    )
    .await;

    // Reset: to the end, to a time, and a time that is not one.
    let reset_audit = |to: &str| {
        post(
            &format!("/admin/api/groups/audit/{}/reset", Num::TOPIC),
            json!({ "to": to }),
            Some(TOKEN),
        )
    };
    let (s, v, _) = call!(&app, reset_audit("latest")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["lag"] == 0),
        "{v}"
    );
    let (s, v, _) = call!(&app, reset_audit("2000-01-01T00:00:00Z")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lag: u64 = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["lag"].as_u64().unwrap())
        .sum();
    // Every message is after 2000: the ten, the test message, and on NATS
    // the resent copy (it is stored in the topic's stream, addressed to
    // `billing`; other groups count it until they pass it).
    let resent_copy = u64::from(b.is_nats());
    assert_eq!(lag, 11 + resent_copy, "{v}");
    let (s, v, _) = call!(&app, reset_audit("yesterday")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("RFC 3339"), "{v}");
    let (s, _, _) = call!(
        &app,
        post(
            &format!("/admin/api/groups/bad%20group/{}/reset", Num::TOPIC),
            json!({ "to": "latest" }),
            Some(TOKEN),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Retention now: nothing is 72 hours old (NATS applies its own limits).
    let (s, v, _) = call!(&app, post("/admin/api/retention", json!({}), Some(TOKEN))).await;
    if bus.capabilities().history {
        assert_eq!((s, &v["messages"]), (StatusCode::OK, &json!(0)), "{v}");
    } else {
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{v}");
    }

    // Purge: the group's DLQ is empty afterwards.
    let (s, v, _) = call!(
        &app,
        post("/admin/api/dlq/billing/purge", json!({}), Some(TOKEN))
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["purged"], 1, "{v}");
    assert_eq!(bus.dead_letter_count("billing").await.unwrap(), 0);

    // Anything else is a JSON 404.
    let (s, v, _) = call!(&app, get("/admin/api/nothing-here")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    bus.shutdown().await.unwrap();
}

async fn mutations_need_the_token_and_reads_can_too(b: Backend) {
    let bus = b.open().await;
    bus.publish(&Num { n: 1 }).await.unwrap();
    let purge = || post("/admin/api/dlq/g/purge", json!({}), None);
    let reset = |t: Option<&str>| {
        post(
            &format!("/admin/api/groups/g/{}/reset", Num::TOPIC),
            json!({ "to": "earliest" }),
            t,
        )
    };

    // With a token: reads are open, mutations need it.
    let app =
        test::init_service(App::new().service(weirmq::web::admin(bus.clone()).token(TOKEN))).await;
    let (s, _, _) = call!(&app, get("/admin/api/topics")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, r) = call!(&app, purge()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    assert!(r
        .get("WWW-Authenticate")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let (s, v, _) = call!(&app, reset(Some("wrong-token"))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["message"].as_str().unwrap().contains("wrong"), "{v}");
    let (s, _, _) = call!(
        &app,
        reset(None).insert_header(("Authorization", format!("Basic {TOKEN}"))),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v, _) = call!(&app, reset(Some(TOKEN))).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Without a token: read-only, never open.
    let app =
        test::init_service(App::new().service(weirmq::web::admin(bus.clone()).token(""))).await;
    let (s, v, _) = call!(&app, get("/admin/api/overview")).await;
    assert_eq!((s, v["read_only"].as_bool()), (StatusCode::OK, Some(true)));
    for req in [purge(), reset(Some(TOKEN)), reset(None)] {
        let (s, v, _) = call!(&app, req).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::FORBIDDEN, Some("read_only"))
        );
    }

    // Names with `%` (a broadcast member's position group is
    // `<group>%<member>`) come through percent-encoded paths whole.
    let (s, v, _) = call!(&app, get("/admin/api/dlq/mail%25node-1")).await;
    assert_eq!(
        (s, v["group"].as_str()),
        (StatusCode::OK, Some("mail%node-1")),
        "{v}"
    );

    // Reads protected too, on another path.
    let app = test::init_service(
        App::new().service(
            weirmq::web::admin(bus.clone())
                .at("/ops/bus")
                .token(TOKEN)
                .protect_reads(),
        ),
    )
    .await;
    let (s, _, _) = call!(&app, get("/ops/bus/api/groups")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = call!(
        &app,
        get("/ops/bus/api/groups").insert_header(("Authorization", "Bearer nope")),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v, _) = call!(
        &app,
        get("/ops/bus/api/groups").insert_header(("Authorization", format!("Bearer {TOKEN}"))),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v.as_array().unwrap().iter().any(|g| g["group"] == "g"),
        "{v}"
    );
    bus.shutdown().await.unwrap();
}
