//! The order service example, driven over HTTP: 100 orders, half paid, the
//! rest cancelled by their payment deadline (a delayed message); coupons
//! granted exactly for the qualifying orders despite injected failures;
//! inventory reserved and released in order per order; no dead letters.

#[path = "../examples/order_service/app.rs"]
mod app;
mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const THRESHOLD: u64 = 10_000;

async fn get(client: &awc::Client, url: &str) -> Value {
    let mut r = client.get(url).send().await.expect("GET");
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.json::<Value>().limit(1 << 20).await.expect("json")
}

#[actix_web::test]
async fn orders_are_paid_or_cancelled_with_their_coupons_and_inventory_in_order() {
    let dir = temp_dir();
    let running = app::start(app::Config {
        port: 0,
        data_dir: dir.path().to_path_buf(),
        payment_timeout: Duration::from_millis(1500),
        coupon_threshold: THRESHOLD,
        coupon_failure_rate: 0.3,
        admin_token: Some("test-admin-token".into()),
    })
    .await
    .expect("start");
    let base = format!("http://127.0.0.1:{}", running.port);
    let client = awc::Client::default();

    // A bad order is refused with a clear error.
    let r = client
        .post(format!("{base}/orders"))
        .send_json(&json!({"user_id": 1, "items": [], "amount": 5}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let mut orders = Vec::new();
    for i in 0..100u64 {
        let amount = i * 300;
        let mut r = client
            .post(format!("{base}/orders"))
            .send_json(&json!({
                "user_id": i % 7,
                "items": [{"sku": format!("sku-{}", i % 5), "qty": 1 + i % 3}],
                "amount": amount,
            }))
            .await
            .expect("POST /orders");
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["state"], "created");
        let id = body["id"].as_str().unwrap().to_string();
        // Every other order is paid at once, well before its deadline.
        let pay = i % 2 == 0;
        if pay {
            let mut r = client
                .post(format!("{base}/orders/{id}/pay"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.json::<Value>().await.unwrap()["state"], "paid");
        }
        orders.push((id, amount, pay));
    }

    // Every unpaid order is cancelled by its deadline, and every group
    // settles everything.
    wait_until("every order is settled", Duration::from_secs(60), || {
        let (client, base, orders) = (client.clone(), base.clone(), orders.clone());
        async move {
            for (id, _, pay) in &orders {
                let o = get(&client, &format!("{base}/orders/{id}")).await;
                let want = if *pay { "paid" } else { "cancelled" };
                let inventory = if *pay { 1 } else { 2 };
                if o["state"] != want || o["inventory"].as_array().unwrap().len() != inventory {
                    return false;
                }
            }
            let groups = get(&client, &format!("{base}/admin/api/groups")).await;
            groups.as_array().unwrap().iter().all(|g| {
                g["lag"] == 0
                    && g["stats"]["in_flight"] == 0
                    && g["stats"]["scheduled_retries"] == 0
            })
        }
    })
    .await;

    let groups = get(&client, &format!("{base}/admin/api/groups")).await;
    assert_eq!(groups.as_array().unwrap().len(), 5, "{groups}");
    for g in groups.as_array().unwrap() {
        assert_eq!(g["dead_letters"], 0, "{g}");
    }
    let coupon = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "coupon")
        .unwrap();
    assert!(
        coupon["stats"]["retried"].as_u64().unwrap() > 0,
        "the coupon service failed now and then: {coupon}"
    );
    for (id, amount, pay) in &orders {
        let o = get(&client, &format!("{base}/orders/{id}")).await;
        let inventory: Vec<&str> = o["inventory"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if *pay {
            assert_eq!(inventory, ["reserve"], "{o}");
        } else {
            assert_eq!(inventory, ["reserve", "release"], "{o}");
        }
        // A coupon exactly for the qualifying orders, issued once.
        assert_eq!(o["coupon"].is_string(), *amount >= THRESHOLD, "{o}");
        assert_eq!(o["coupons_issued"], u64::from(*amount >= THRESHOLD), "{o}");
        let seen: Vec<&str> = o["events_seen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for must in [
            "coupon/created",
            "payments/created",
            "inventory/created",
            "notification/created",
        ] {
            assert!(seen.contains(&must), "{id} missing {must}: {seen:?}");
        }
        let last = if *pay {
            "inventory/paid"
        } else {
            "inventory/cancelled"
        };
        assert!(seen.contains(&last), "{id} missing {last}: {seen:?}");
    }
    // A paid order cannot be cancelled, a cancelled one cannot be paid.
    let cancelled = orders.iter().find(|o| !o.2).unwrap();
    let r = client
        .post(format!("{base}/orders/{}/pay", cancelled.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = client
        .get(format!("{base}/orders/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    running.stop().await.expect("graceful stop");
}

/// The payment deadline with the real 30 minutes, on the test kit's
/// virtual clock: the order service's own consumers on a `TestBus`.
#[actix_web::test]
async fn the_payment_deadline_cancels_only_unpaid_orders() {
    use weirmq::testing::TestBus;
    let bus = TestBus::start().await.unwrap();
    let services = app::start_services(
        &bus,
        app::Services {
            payment_timeout: Duration::from_secs(30 * 60),
            ..app::Services::default()
        },
    )
    .await
    .unwrap();
    let order = |user_id| app::NewOrder {
        user_id,
        items: vec![app::Item {
            sku: "sku-1".into(),
            qty: 1,
        }],
        amount: 500,
    };
    let unpaid = services
        .book
        .send(app::Create(order(1)))
        .await
        .unwrap()
        .unwrap();
    let paid = services
        .book
        .send(app::Create(order(2)))
        .await
        .unwrap()
        .unwrap();
    services
        .book
        .send(app::Pay(paid.id.clone()))
        .await
        .unwrap()
        .unwrap();
    let state = |id: String| {
        let bus = bus.bus().clone();
        async move { app::load_order(&bus, &id).await.unwrap().unwrap().state }
    };

    bus.advance(Duration::from_secs(30 * 60 - 1)).await.unwrap();
    assert_eq!(state(unpaid.id.clone()).await, app::OrderState::Created);

    bus.advance(Duration::from_secs(1)).await.unwrap();
    assert_eq!(state(unpaid.id.clone()).await, app::OrderState::Cancelled);
    assert_eq!(state(paid.id.clone()).await, app::OrderState::Paid);
    let deadlines = bus.handled("payment-timeout").await.unwrap();
    assert_eq!(deadlines.len(), 2, "one deadline per order, both acked");
    assert!(deadlines
        .iter()
        .all(|h| h.at == Duration::from_secs(30 * 60)));
}
