//! Nothing is stored where no consumer looks (NATS): a topic's stream takes
//! only its queues' subjects, so a publish by another NATS client to a
//! queue the topic does not have is refused; one to a queue with a target
//! no group answers to is dead-lettered with the reason; and a stream made
//! by an earlier version (which took every `wq.<topic>.>` subject) is
//! narrowed when the bus opens the topic.

mod support;

use std::time::Duration;

use async_nats::jetstream;
use support::{init_tracing, wait_until, Num};
use weirmq::prelude::*;

async fn raw(url: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(url).await.expect("connect"))
}

/// A publish by a plain JetStream client: whether the stream acknowledged
/// it.
async fn stored(js: &jetstream::Context, subject: &str, body: &'static [u8]) -> bool {
    match js.publish(subject.to_string(), body.into()).await {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
            .await
            .is_ok_and(|a| a.is_ok()),
        Err(_) => false,
    }
}

#[actix::test]
async fn a_publish_outside_the_queues_is_refused_and_an_unaddressed_one_is_dead_lettered() {
    support::within_deadline(
        "a_publish_outside_the_queues_is_refused_and_an_unaddressed_one_is_dead_lettered",
        async {
            init_tracing();
            let Some(server) = support::backend::NatsServer::start() else {
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
            let js = raw(&server.url).await;
            // The topic has queues 0..4: queue 9 (and extra tokens) match no
            // stream, so the server refuses them.
            assert!(!stored(&js, "wq.numbers.9._", b"{\"n\":1}").await);
            assert!(!stored(&js, "wq.numbers.0._.extra", b"{\"n\":1}").await);
            assert!(!stored(&js, "wq.numbers", b"{\"n\":1}").await);
            // A queue it has, but a target that is neither `_` (every group) nor a
            // group's: stored, and surfaced in each subscribed group's DLQ.
            assert!(stored(&js, "wq.numbers.0.junk", b"{\"n\":1}").await);
            let received = support::Log::default();
            let sub = bus
                .subscribe::<Num>("billing")
                .start_from(StartFrom::Earliest)
                .members(1, support::recorders(&received, support::ack_all()))
                .start()
                .await
                .unwrap();
            wait_until(
                "the unaddressed message is dead-lettered",
                Duration::from_secs(20),
                || async { bus.dead_letter_count("billing").await.unwrap() == 1 },
            )
            .await;
            let dl = bus.dead_letters("billing", 0, 10).await.unwrap();
            let reason = dl[0].reason().unwrap_or_default();
            assert!(
                reason.contains("wq.numbers.0.junk")
                    && reason.contains("addresses no consumer group"),
                "{reason}"
            );
            assert_eq!(received.len(), 0, "not delivered to a handler");
            sub.drain().await.unwrap();
            bus.shutdown().await.unwrap();
        },
    )
    .await
}

#[actix::test]
async fn a_stream_of_an_earlier_version_is_narrowed_to_its_queues() {
    support::within_deadline(
        "a_stream_of_an_earlier_version_is_narrowed_to_its_queues",
        async {
            init_tracing();
            let Some(server) = support::backend::NatsServer::start() else {
                return;
            };
            let js = raw(&server.url).await;
            // As weirmq made topic streams before: every subject under wq.<T>.>.
            js.create_stream(jetstream::stream::Config {
                name: "WQ_T_legacy".into(),
                subjects: vec!["wq.legacy.>".into()],
                description: Some("weirmq topic=legacy queues=2".into()),
                ..Default::default()
            })
            .await
            .unwrap();
            assert!(stored(&js, "wq.legacy.7._", b"stranded").await);
            let bus = Bus::builder()
                .nats(server.url.clone())
                .open()
                .await
                .unwrap();
            let stats = bus.topic_stats("legacy").await.unwrap();
            assert_eq!(stats.queues.len(), 2);
            let mut stream = js.get_stream("WQ_T_legacy").await.unwrap();
            let subjects = stream.info().await.unwrap().config.subjects.clone();
            assert_eq!(
                subjects,
                vec!["wq.legacy.0.*".to_string(), "wq.legacy.1.*".to_string()]
            );
            assert!(!stored(&js, "wq.legacy.7._", b"refused now").await);
            assert!(stored(&js, "wq.legacy.1._", b"a queue it has").await);
            bus.shutdown().await.unwrap();
        },
    )
    .await
}
