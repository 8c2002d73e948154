//! Services in other languages on the same NATS server (issue 17, point 6;
//! docs/wire-format.md): a real Python client (nats-py from PyPI) publishes
//! a plain JSON event that a weirmq handler actor consumes, and reads an
//! event weirmq published without any weirmq decoder.
//!
//! nats-py is installed into `target/python-nats` when it is not there
//! (CI installs it first); without Python or PyPI the test fails when
//! `WEIRMQ_REQUIRE_NATS` is set and is skipped with the reason otherwise.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::backend::NatsServer;
use support::*;
use weirmq::prelude::*;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct PaidOrder {
    order_id: u64,
    customer: String,
}

impl Event for PaidOrder {
    const TOPIC: &'static str = "py-orders";
}

/// What the handler saw: (event, tag, properties, message id).
type Seen = Arc<Mutex<Vec<(PaidOrder, Option<String>, Vec<(String, String)>, String)>>>;

struct Billing(Seen);

impl Actor for Billing {
    type Context = Context<Self>;
}

impl Handler<Delivery<PaidOrder>> for Billing {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<PaidOrder>, _: &mut Context<Self>) -> Self::Result {
        let m = d.message();
        self.0.lock().unwrap().push((
            d.event().clone(),
            m.tag().map(str::to_string),
            m.properties()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            m.id().to_string(),
        ));
        Ok(())
    }
}

/// The directory nats-py is importable from, installing it there if
/// needed; `Err` with the reason when it cannot be had.
fn nats_py() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/python-nats");
    let importable = |dir: &PathBuf| {
        Command::new("python3")
            .args(["-c", "import nats, nats.js"])
            .env("PYTHONPATH", dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable(&dir) {
        return Ok(dir);
    }
    let installed = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--target",
        ])
        .arg(&dir)
        .arg("nats-py")
        .status()
        .map_err(|e| format!("python3 is not runnable ({e})"))?;
    if installed.success() && importable(&dir) {
        Ok(dir)
    } else {
        Err(
            "could not install nats-py from PyPI (`python3 -m pip install --target \
             target/python-nats nats-py`)"
                .into(),
        )
    }
}

/// Runs `script` with nats-py, the server's URL as its argument; its
/// stdout.
fn python(dir: &PathBuf, script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", dir)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the Python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const PUBLISH: &str = r#"
import asyncio, json, sys, nats

async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    ack = await js.publish(
        "wq.py-orders.1._",
        json.dumps({"order_id": 42, "customer": "ada"}).encode(),
        headers={"Nats-Msg-Id": "order-42", "Wq-Tag": "paid", "Content-Type": "application/json"},
    )
    # The same again: the stream's duplicate window keeps one.
    again = await js.publish(
        "wq.py-orders.1._",
        json.dumps({"order_id": 42, "customer": "ada"}).encode(),
        headers={"Nats-Msg-Id": "order-42", "Wq-Tag": "paid", "Content-Type": "application/json"},
    )
    print(json.dumps({"seq": ack.seq, "duplicate": bool(again.duplicate)}))
    await nc.close()

asyncio.run(main())
"#;

const READ: &str = r#"
import asyncio, json, sys, nats

async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    msg = await js.get_msg("WQ_T_py-orders", int(sys.argv[2]))
    print(json.dumps({"event": json.loads(msg.data), "headers": msg.headers}))
    await nc.close()

asyncio.run(main())
"#;

#[actix::test]
async fn a_python_service_and_weirmq_exchange_plain_json_events() {
    support::within_deadline(
        "a_python_service_and_weirmq_exchange_plain_json_events",
        async {
            let dir = match nats_py() {
                Ok(d) => d,
                Err(why) if std::env::var_os("WEIRMQ_REQUIRE_NATS").is_none() => {
                    eprintln!("SKIPPED (Python NATS client): {why}");
                    return;
                }
                Err(why) => panic!("{why}; WEIRMQ_REQUIRE_NATS is set, so this is a failure"),
            };
            let Some(server) = NatsServer::start() else {
                return;
            };
            let bus = Bus::builder()
                .nats_config(weirmq::nats::NatsConfig::new(server.url.clone()))
                .open()
                .await
                .unwrap();
            bus.create_topic(weirmq::TopicConfig::new(PaidOrder::TOPIC))
                .await
                .unwrap();
            let seen: Seen = Arc::default();
            let s = seen.clone();
            let sub = bus
                .subscribe::<PaidOrder>("billing")
                .members(1, move || Billing(s.clone()))
                .start()
                .await
                .unwrap();

            // Python → weirmq: a plain JSON event with ordinary NATS headers.
            let published = python(&dir, PUBLISH, &[&server.url]);
            assert!(published.contains("\"duplicate\": true"), "{published}");
            wait_until(
                "the handler got the Python event",
                Duration::from_secs(30),
                || {
                    let n = seen.lock().unwrap().len();
                    async move { n >= 1 }
                },
            )
            .await;
            let (event, tag, props, id) = seen.lock().unwrap()[0].clone();
            assert_eq!(
                event,
                PaidOrder {
                    order_id: 42,
                    customer: "ada".into()
                }
            );
            assert_eq!(tag.as_deref(), Some("paid"), "Wq-Tag honoured");
            assert!(
                props.contains(&("Content-Type".into(), "application/json".into())),
                "its own headers are properties: {props:?}"
            );
            assert!(
                props.iter().all(|(k, _)| !k.starts_with("Nats-")),
                "{props:?}"
            );
            assert_eq!(id.len(), 32, "a weirmq id derived from Nats-Msg-Id: {id}");

            // weirmq → Python: the body is the event's JSON, the metadata headers.
            let r = bus
                .publish_with(
                    &PaidOrder {
                        order_id: 7,
                        customer: "grace hopper".into(),
                    },
                    Publish::new()
                        .tag("refund")
                        .key("order-7")
                        .property("region", "eu west"),
                )
                .await
                .unwrap();
            let read = python(&dir, READ, &[&server.url, &r.offset.to_string()]);
            let v: serde_json::Value =
                serde_json::from_str(read.trim()).expect("the script's JSON");
            assert_eq!(
                v["event"],
                serde_json::json!({"order_id": 7, "customer": "grace hopper"}),
                "the body is the event, readable without weirmq: {read}"
            );
            let h = &v["headers"];
            assert_eq!(h["Wq-Id"], r.message_id.to_string(), "{read}");
            assert_eq!(h["Wq-Tag"], "refund", "{read}");
            assert_eq!(h["Wq-Keys"], "order-7", "{read}");
            assert_eq!(h["Wq-Prop-region"], "eu%20west", "{read}");
            assert_eq!(h["Nats-Msg-Id"], r.message_id.to_string(), "{read}");

            wait_until("both events handled", Duration::from_secs(30), || {
                let n = seen.lock().unwrap().len();
                async move { n >= 2 }
            })
            .await;
            assert_eq!(
                seen.lock().unwrap().len(),
                2,
                "the duplicate was stored once"
            );
            sub.drain().await.unwrap();
            bus.shutdown().await.unwrap();
        },
    )
    .await
}
