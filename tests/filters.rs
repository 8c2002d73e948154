//! Tag filters: a group receives only the tags it asks for; the rest are
//! skipped (its position moves past them), other groups are unaffected.

mod support;

use std::collections::HashSet;

use support::*;
use weirmq::prelude::*;
use weirmq::Error;

#[actix::test]
async fn a_tag_filter_delivers_only_matching_tags_and_moves_past_the_rest() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let (vip_log, all_log) = (Log::default(), Log::default());
    let vip = bus
        .subscribe::<Num>("vip-desk")
        .filter(Filter::tags("vip || gold").unwrap())
        .members(2, recorders(&vip_log, ack_all()))
        .start()
        .await
        .unwrap();
    let all = bus
        .subscribe::<Num>("audit")
        .members(1, recorders(&all_log, ack_all()))
        .start()
        .await
        .unwrap();
    let tags = [Some("vip"), Some("gold"), Some("normal"), None, Some("VIP")];
    for n in 0..50u64 {
        let opts = match tags[(n % 5) as usize] {
            Some(t) => Publish::new().tag(t),
            None => Publish::new(),
        };
        bus.publish_with(&Num { n }, opts).await.unwrap();
    }
    caught_up(&bus, "vip-desk", Num::TOPIC).await;
    caught_up(&bus, "audit", Num::TOPIC).await;
    let got: HashSet<u64> = vip_log.entries().iter().map(|e| e.1).collect();
    let want: HashSet<u64> = (0..50).filter(|n| n % 5 < 2).collect();
    assert_eq!(got, want, "only vip and gold (case-sensitive)");
    assert_eq!(vip_log.len(), 20);
    assert_eq!(all_log.len(), 50, "the unfiltered group gets everything");
    let stats = vip.stats().await;
    assert_eq!((stats.acked, stats.filtered), (20, 30));
    vip.drain().await.unwrap();
    all.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[test]
fn a_bad_tag_expression_is_a_typed_error_with_its_position() {
    match Filter::tags("vip || ") {
        Err(e @ Error::InvalidFilter { position: 7, .. }) => {
            assert!(e.to_string().contains("position 7"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(Filter::tags("*").unwrap().is_all());
}

#[actix::test]
async fn a_sql_filter_selects_by_properties_and_tag() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("eu-big")
        .filter(Filter::sql("region = 'eu' AND amount > 100 AND TAGS <> 'test'").unwrap())
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let cases = [
        ("eu", "150", "real", true),
        ("eu", "50", "real", false),
        ("us", "150", "real", false),
        ("eu", "150", "test", false),
        ("eu", "not-a-number", "real", false),
    ];
    for (n, (region, amount, tag, _)) in cases.iter().enumerate() {
        bus.publish_with(
            &Num { n: n as u64 },
            Publish::new()
                .tag(*tag)
                .property("region", *region)
                .property("amount", *amount),
        )
        .await
        .unwrap();
    }
    // A message without the properties: NULL, filtered out.
    bus.publish(&Num { n: 99 }).await.unwrap();
    caught_up(&bus, "eu-big", Num::TOPIC).await;
    let got: Vec<u64> = log.entries().iter().map(|e| e.1).collect();
    assert_eq!(got, vec![0]);
    assert_eq!(sub.stats().await.filtered, 5);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[test]
fn a_sql_syntax_error_names_the_position() {
    match Filter::sql("region = 'eu' AND") {
        Err(Error::InvalidFilter { position, .. }) => assert_eq!(position, 17),
        other => panic!("{other:?}"),
    }
}
