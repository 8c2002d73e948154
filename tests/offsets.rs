//! Offset reset and replay: to the earliest message, the latest, or a
//! point in time; for a running subscription and for a stopped group.

mod support;

use std::time::{Duration, SystemTime};

use support::*;
use weirmq::prelude::*;
use weirmq::ResetTo;

#[actix::test]
async fn a_running_group_replays_from_earliest_from_a_time_and_skips_to_latest() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("replayer")
        .start_from(StartFrom::Earliest)
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    for n in 0..10 {
        bus.publish(&Num { n }).await.unwrap();
    }
    // A clear gap in publish times between the two halves.
    caught_up(&bus, "replayer", Num::TOPIC).await;
    let before_second_half = SystemTime::now();
    wait_until(
        "the clock moved on",
        Duration::from_secs(5),
        || async move { SystemTime::now() > before_second_half + Duration::from_millis(5) },
    )
    .await;
    let mid = SystemTime::now();
    for n in 10..20 {
        bus.publish(&Num { n }).await.unwrap();
    }
    caught_up(&bus, "replayer", Num::TOPIC).await;
    assert_eq!(log.len(), 20);

    // Replay everything, without restarting the subscription.
    let positions = bus
        .reset_offsets("replayer", Num::TOPIC, ResetTo::Earliest)
        .await
        .unwrap();
    assert!(positions.iter().all(|p| p.committed == 0));
    delivered(&log, 40).await;
    caught_up(&bus, "replayer", Num::TOPIC).await;
    let counts = log.counts();
    assert!((0..20).all(|n| counts[&n] == 2), "{counts:?}");

    // Replay from a point in time: only the second half comes again.
    bus.reset_offsets("replayer", Num::TOPIC, ResetTo::Time(mid))
        .await
        .unwrap();
    delivered(&log, 50).await;
    caught_up(&bus, "replayer", Num::TOPIC).await;
    let counts = log.counts();
    assert!((0..10).all(|n| counts[&n] == 2), "{counts:?}");
    assert!((10..20).all(|n| counts[&n] == 3), "{counts:?}");

    // Skip to the end: nothing more is delivered, lag is 0.
    let positions = bus
        .reset_offsets("replayer", Num::TOPIC, ResetTo::Latest)
        .await
        .unwrap();
    assert!(positions.iter().all(|p| p.lag == 0));
    assert_eq!(log.len(), 50);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_stopped_group_is_reset_and_a_new_group_replays_history() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let events: Vec<Num> = (0..30).map(|n| Num { n }).collect();
    bus.publish_batch(&events).await.unwrap();
    // "audit" never subscribed; its position is set before it starts.
    bus.reset_offsets("audit", Num::TOPIC, ResetTo::Earliest)
        .await
        .unwrap();
    let lagging: u64 = bus
        .positions("audit", Num::TOPIC)
        .await
        .unwrap()
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lagging, 30);
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("audit") // default StartFrom::Latest, but the reset wins
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    caught_up(&bus, "audit", Num::TOPIC).await;
    assert_eq!(log.len(), 30);
    sub.drain().await.unwrap();
    let e = bus
        .reset_offsets("audit", "no-such-topic", ResetTo::Earliest)
        .await
        .unwrap_err();
    assert!(matches!(e, weirmq::Error::InvalidConfig { .. }), "{e}");
    bus.shutdown().await.unwrap();
}
