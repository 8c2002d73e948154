//! The NATS server crashes (SIGKILL) and comes back on the same store while
//! a group consumes and a producer publishes: the bus reconnects on its
//! own, publishes that failed during the outage are retried by the
//! producer, and every message acknowledged by a receipt is delivered.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::backend::NatsServer;
use support::*;
use weirmq::prelude::*;

/// Publishes `n` until it has a receipt (the server may be down), with a
/// deadline.
async fn publish_until_stored(bus: &Bus, n: u64) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match bus.publish(&Num { n }).await {
            Ok(_) => return,
            Err(e) => {
                assert!(
                    Instant::now() < end,
                    "message {n} not stored within 60 s: {e}"
                );
                actix::clock::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[actix::test]
async fn a_server_crash_loses_no_acknowledged_message() {
    init_tracing();
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    let mut config = weirmq::nats::NatsConfig::new(server.url.clone());
    config.ack_wait = Duration::from_secs(2);
    let bus = Bus::builder().nats_config(config).open().await.unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("billing")
        .start_from(StartFrom::Earliest)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    for n in 0..500 {
        publish_until_stored(&bus, n).await;
    }
    delivered(&log, 100).await;
    if !server.crash_and_restart() {
        eprintln!("SKIPPED: a shared server (NATS_URL) cannot be restarted by the test");
        return;
    }
    for n in 500..1000 {
        publish_until_stored(&bus, n).await;
    }
    wait_until(
        "every stored message was delivered",
        Duration::from_secs(90),
        || {
            let seen: BTreeSet<u64> = log.entries().iter().map(|e| e.1).collect();
            async move { seen.len() == 1000 }
        },
    )
    .await;
    let seen: BTreeSet<u64> = log.entries().iter().map(|e| e.1).collect();
    assert_eq!(seen, (0..1000).collect::<BTreeSet<_>>());
    caught_up(&bus, "billing", Num::TOPIC).await;
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
