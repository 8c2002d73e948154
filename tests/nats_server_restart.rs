//! The NATS server crashes (SIGKILL) and comes back on the same store while
//! a group consumes and a producer publishes: the bus reconnects on its
//! own, publishes that failed during the outage are retried by the
//! producer, and every message acknowledged by a receipt is delivered.
//!
//! A publish the server did not confirm is `Error::Unavailable` (outcome
//! unknown); retried with the same id (`Publish::message_id`) it is stored
//! once — whether or not the first attempt was.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::backend::NatsServer;
use support::*;
use weirmq::prelude::*;
use weirmq::{Error, MessageId};

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
    support::within_deadline("a_server_crash_loses_no_acknowledged_message", async {
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
    })
    .await
}

/// What a handler saw: (n, message id) per delivery.
type Seen = Arc<Mutex<Vec<(u64, MessageId)>>>;

struct ById(Seen);

impl Actor for ById {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for ById {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        self.0.lock().unwrap().push((d.event().n, d.message_id()));
        Ok(())
    }
}

const PRODUCERS: u64 = 8;
const MESSAGES: u64 = 800;

/// Publishes `n` under `id` until a receipt comes back, retrying every
/// failure with the same id; counts the failures whose outcome was
/// unknown.
async fn publish_once(bus: &Bus, n: u64, unknown: &AtomicU64) {
    let id = MessageId::generate();
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        match bus
            .publish_with(&Num { n }, Publish::new().message_id(id))
            .await
        {
            Ok(r) => {
                assert_eq!(r.message_id, id, "stored under the id it was given");
                return;
            }
            Err(e) => {
                if let Error::Unavailable { message_ids, .. } = &e {
                    assert_eq!(message_ids, &vec![id], "the error names the message");
                    assert!(e.outcome_unknown());
                    unknown.fetch_add(1, Ordering::Relaxed);
                }
                assert!(
                    Instant::now() < end,
                    "message {n} not stored within 90 s: {e}"
                );
                // A retry pause, not a wait for a condition.
                actix::clock::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[actix::test]
async fn publishes_retried_with_their_ids_through_a_crash_are_stored_and_delivered_once() {
    support::within_deadline(
        "publishes_retried_with_their_ids_through_a_crash_are_stored_and_delivered_once",
        async {
            init_tracing();
            let Some(mut server) = NatsServer::start() else {
                return;
            };
            let bus = Bus::builder()
                .nats(server.url.clone())
                .open()
                .await
                .unwrap();
            bus.create_topic(TopicConfig::new(Num::TOPIC).queues(4))
                .await
                .unwrap();
            let stored = Arc::new(AtomicU64::new(0));
            let unknown = Arc::new(AtomicU64::new(0));
            let mut producers = Vec::new();
            for p in 0..PRODUCERS {
                let (bus, stored, unknown) = (bus.clone(), stored.clone(), unknown.clone());
                producers.push(actix::spawn(async move {
                    for n in (p..MESSAGES).step_by(PRODUCERS as usize) {
                        publish_once(&bus, n, &unknown).await;
                        stored.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            wait_until("100 messages stored", Duration::from_secs(30), || async {
                stored.load(Ordering::Relaxed) >= 100
            })
            .await;
            // The crash, with the producers mid-stream; the server stays down
            // until a publish has been left unconfirmed (its ack timed out).
            assert!(server.crash(), "the test's own server can be crashed");
            wait_until(
                "a publish with an unknown outcome",
                Duration::from_secs(30),
                || async { unknown.load(Ordering::Relaxed) > 0 },
            )
            .await;
            server.restart();
            for p in producers {
                p.await.unwrap();
            }
            let unknown = unknown.load(Ordering::Relaxed);
            assert!(unknown > 0, "the crash left publishes unconfirmed");
            // Stored once each: read every queue back.
            let mut copies: BTreeMap<u64, usize> = BTreeMap::new();
            for q in 0..4 {
                for m in bus.read_queue(Num::TOPIC, q, 0, 10_000).await.unwrap() {
                    let n: Num = serde_json::from_slice(m.body()).unwrap();
                    *copies.entry(n.n).or_default() += 1;
                }
            }
            assert_eq!(copies.len() as u64, MESSAGES, "every message stored");
            let twice: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
            assert!(twice.is_empty(), "stored more than once: {twice:?}");
            // Delivered once each (the group starts after the crash, so no ack of
            // its can be lost in it).
            let seen = Seen::default();
            let s = seen.clone();
            let sub = bus
                .subscribe::<Num>("billing")
                .start_from(StartFrom::Earliest)
                .members(2, move || ById(s.clone()))
                .start()
                .await
                .unwrap();
            wait_until(
                "every message delivered",
                Duration::from_secs(60),
                || async { seen.lock().unwrap().len() as u64 >= MESSAGES },
            )
            .await;
            caught_up(&bus, "billing", Num::TOPIC).await;
            let seen = seen.lock().unwrap().clone();
            let ns: BTreeSet<u64> = seen.iter().map(|(n, _)| *n).collect();
            assert_eq!(ns.len() as u64, MESSAGES);
            assert_eq!(seen.len() as u64, MESSAGES, "each delivered exactly once");
            println!(
                "{unknown} publishes had an unknown outcome; each retried with its id, stored once"
            );
            sub.drain().await.unwrap();
            bus.shutdown().await.unwrap();
        },
    )
    .await
}
