//! The order service killed mid-way (SIGKILL) and restarted on the same
//! data directory: the work in flight completes — every order ends paid or
//! cancelled with all its events, inventory in order, and no coupon twice.
//!
//! Runs the example binary (`cargo test` builds examples) as a child.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const THRESHOLD: u64 = 10_000;

struct Service {
    child: Child,
    base: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> Service {
    let mut child = Command::new(example_binary("order_service"))
        .args([
            "--port",
            "0",
            "--payment-timeout",
            "2s",
            "--coupon-failure-rate",
            "0.3",
        ])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the order_service example (built by cargo test)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    Service {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn get(client: &awc::Client, url: &str) -> Value {
    let mut r = client.get(url).send().await.expect("GET");
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.json::<Value>().limit(1 << 20).await.expect("json")
}

#[actix_web::test]
async fn a_killed_service_completes_its_work_after_a_restart() {
    let dir = temp_dir();
    let client = awc::Client::default();
    let mut orders = Vec::new();
    {
        let service = start(dir.path());
        for i in 0..60u64 {
            let amount = i * 500;
            let mut r = client
                .post(format!("{}/orders", service.base))
                .send_json(
                    &json!({"user_id": i, "items": [{"sku": "book", "qty": 1}], "amount": amount}),
                )
                .await
                .expect("POST /orders");
            assert_eq!(r.status(), 201);
            let id = r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            let pay = i % 2 == 0;
            if pay {
                let r = client
                    .post(format!("{}/orders/{id}/pay", service.base))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
            orders.push((id, amount, pay));
        }
        // Killed with work in flight (coupons retrying, deadlines pending).
        drop(service);
    }
    let service = start(dir.path());
    let base = service.base.clone();
    wait_until(
        "every order is settled after the restart",
        Duration::from_secs(60),
        || {
            let (client, base, orders) = (client.clone(), base.clone(), orders.clone());
            async move {
                for (id, _, pay) in &orders {
                    let o = get(&client, &format!("{base}/orders/{id}")).await;
                    let (want, inventory) = if *pay { ("paid", 1) } else { ("cancelled", 2) };
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
        },
    )
    .await;
    for (id, amount, pay) in &orders {
        let o = get(&client, &format!("{base}/orders/{id}")).await;
        let inventory: Vec<&str> = o["inventory"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want: &[&str] = if *pay {
            &["reserve"]
        } else {
            &["reserve", "release"]
        };
        assert_eq!(inventory, want, "{o}");
        assert_eq!(o["coupon"].is_string(), *amount >= THRESHOLD, "{o}");
        assert_eq!(
            o["coupons_issued"],
            u64::from(*amount >= THRESHOLD),
            "no coupon twice: {o}"
        );
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
            assert!(
                seen.contains(&must),
                "{id} lost {must} in the crash: {seen:?}"
            );
        }
    }
    let groups = get(&client, &format!("{base}/admin/api/groups")).await;
    assert_eq!(groups.as_array().unwrap().len(), 5, "{groups}");
    for g in groups.as_array().unwrap() {
        assert_eq!(g["dead_letters"], 0, "{g}");
    }
}
