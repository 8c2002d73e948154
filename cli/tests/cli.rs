//! The `weirmq` binary against a data directory (offline) and against a
//! running admin API (online): they answer the same, exit codes mean what
//! the docs say, and changes need the token online.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::Value;
use weirmq::prelude::*;
use weirmq::TopicConfig;

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Order {
    n: u64,
}
impl Event for Order {
    const TOPIC: &'static str = "orders";
}

/// Dead-letters order 2, acks the rest.
struct Ledger;
impl Actor for Ledger {
    type Context = Context<Self>;
}
impl Handler<Delivery<Order>> for Ledger {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Order>, _: &mut Context<Self>) -> Self::Result {
        if d.event().n == 2 {
            Err(HandlerError::dead_letter("order 2 is malformed"))
        } else {
            Ok(())
        }
    }
}

const TOKEN: &str = "cli-test-token";

/// Runs the binary: (exit code, stdout, stderr).
async fn weirmq(args: Vec<String>) -> (i32, String, String) {
    let out = actix_web::rt::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_weirmq"))
            .args(&args)
            .env_remove("WEIRMQ_ADMIN_TOKEN")
            .env_remove("WEIRMQ_URL")
            .env_remove("WEIRMQ_DATA_DIR")
            .output()
            .expect("run weirmq")
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(base: &[&str], rest: &[&str]) -> Vec<String> {
    base.iter().chain(rest).map(|s| s.to_string()).collect()
}

async fn json(base: &[&str], rest: &[&str]) -> Value {
    let (code, out, err) = weirmq(args(base, &[&["--json"], rest].concat())).await;
    assert_eq!(code, 0, "weirmq {rest:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

async fn prepare(dir: &Path) -> (Bus, String) {
    let bus = Bus::builder().data_dir(dir).open().await.unwrap();
    bus.create_topic(TopicConfig::new(Order::TOPIC).queues(2).trace(true))
        .await
        .unwrap();
    for n in 0..5 {
        bus.publish_with(&Order { n }, Publish::new().key(format!("order-{n}")))
            .await
            .unwrap();
    }
    let sub = bus
        .subscribe::<Order>("ledger")
        .start_from(StartFrom::Earliest)
        .members(1, || Ledger)
        .start()
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let lag: u64 = sub.positions().await.unwrap().iter().map(|p| p.lag).sum();
        if lag == 0 && bus.dead_letter_count("ledger").await.unwrap() == 1 {
            break;
        }
        assert!(Instant::now() < end, "the ledger did not settle");
        actix::clock::sleep(Duration::from_millis(10)).await;
    }
    sub.drain().await.unwrap();
    let id = bus.dead_letters("ledger", 0, 1).await.unwrap()[0]
        .original_id()
        .unwrap()
        .to_string();
    (bus, id)
}

/// The read commands whose answers must not depend on the mode.
const READS: &[&[&str]] = &[
    &["topics"],
    &["dlq", "list"],
    &["dlq", "list", "ledger"],
    &["dlq", "show", "ledger", "0"],
];

#[actix_web::test]
async fn offline_and_online_agree_and_exit_codes_are_reliable() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, id) = prepare(dir.path()).await;
    let d = dir.path().to_str().unwrap().to_string();

    // Online: the admin API of a running service.
    let b = bus.clone();
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new().service(weirmq::web::admin(b.clone()).token(TOKEN))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let url = format!("http://127.0.0.1:{}/admin", server.addrs()[0].port());
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    let online = ["--url", url.as_str()];

    let mut answers = Vec::new();
    for r in READS {
        answers.push(json(&online, r).await);
    }
    let get = json(&online, &["get", &id]).await;
    assert_eq!(get["keys"][0], "order-2");
    let trace = json(&online, &["trace", &id]).await;
    let kinds: Vec<&str> = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"deadlettered"), "{kinds:?}");
    let found = json(&online, &["find", "--topic", "orders", "--key", "order-2"]).await;
    assert_eq!(found[0]["id"], id.as_str());
    let (code, out, _) = weirmq(args(
        &online,
        &["tail", "orders", "--from-start", "--count", "5"],
    ))
    .await;
    assert_eq!((code, out.lines().count()), (0, 5), "{out}");
    let (code, out, _) = weirmq(args(&online, &["lag", "ledger"])).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("GROUP"), "{out}");

    // The data directory is held by this process: offline refuses, naming it.
    let (code, _, err) = weirmq(args(&["--data-dir", &d], &["topics"])).await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains(&format!("held by process {}", std::process::id())),
        "{err}"
    );

    // Changes online need the token.
    let resend = ["dlq", "resend", "ledger", "--id", id.as_str()];
    let (code, _, err) = weirmq(args(&online, &resend)).await;
    assert_eq!(code, 4, "{err}");
    let (code, _, _) = weirmq(args(
        &[&online[..], &["--token", "wrong"]].concat(),
        &resend,
    ))
    .await;
    assert_eq!(code, 4);
    let with_token = [&online[..], &["--token", TOKEN]].concat();
    let (code, out, err) = weirmq(args(&with_token, &resend)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("resent"), "{out}");
    let r = json(&with_token, &resend).await;
    assert_eq!(r["results"][0]["outcome"], "already_resent", "{r}");
    // Not found, bad input, unreachable.
    let (code, _, _) = weirmq(args(&online, &["get", "01a243ade2d582bb9aca0000000000ff"])).await;
    assert_eq!(code, 3);
    let (code, _, _) = weirmq(args(
        &with_token,
        &["reset", "ledger", "orders", "--to", "soon", "--yes"],
    ))
    .await;
    assert_eq!(code, 2);
    let (code, _, _) = weirmq(args(
        &with_token,
        &["reset", "ledger", "orders", "--to", "latest"],
    ))
    .await;
    assert_eq!(code, 2, "no terminal, no --yes: refused");
    let answers_after: Vec<Value> = {
        let mut v = Vec::new();
        for r in READS {
            v.push(json(&online, r).await);
        }
        v
    };
    handle.stop(true).await;
    bus.shutdown().await.unwrap();
    drop(bus);
    let (code, _, err) = weirmq(args(&online, &["topics"])).await;
    assert_eq!(code, 5, "the service is gone: {err}");

    // Offline on the same data: the same answers.
    let offline = ["--data-dir", d.as_str()];
    for (r, want) in READS.iter().zip(&answers_after) {
        assert_eq!(
            &json(&offline, r).await,
            want,
            "weirmq {r:?} offline and online differ"
        );
    }
    assert_ne!(
        answers, answers_after,
        "the resend shows in the DLQ listing"
    );
    assert_eq!(json(&offline, &["get", &id]).await, get);
    let kept = json(&offline, &["retention"]).await;
    assert_eq!(kept["messages"], 0, "nothing is old enough to go: {kept}");
    let purged = json(&offline, &["dlq", "purge", "ledger", "--yes"]).await;
    assert_eq!(purged["purged"], 1, "{purged}");
    let (code, out, _) = weirmq(args(&offline, &["dlq", "list", "ledger"])).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "only the header is left: {out}");
    let (code, _, _) = weirmq(args(&["--data-dir", "/nonexistent/weirmq"], &["topics"])).await;
    assert_eq!(code, 3);
    let (code, _, _) = weirmq(args(&[], &["topics"])).await;
    assert_eq!(code, 2);
    let (code, out, _) = weirmq(args(&[], &["completions", "bash"])).await;
    assert_eq!(code, 0);
    assert!(out.contains("weirmq"), "{out}");
}
