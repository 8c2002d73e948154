//! Tag filters: a group receives only the tags it asks for; the rest are
//! skipped (its position moves past them), other groups are unaffected.

mod support;

use std::collections::HashSet;

use support::*;
use weirmq::prelude::*;
use weirmq::{Error, Message, OutgoingMessage};

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

/// One term of a long flat chain, per operator the grammar has; each is
/// true for a message with property `a = 1`.
const TERMS: &[&str] = &[
    "a = 1",
    "a <> 2",
    "a != 2",
    "a > 0",
    "a >= 1",
    "a < 2",
    "a <= 1",
    "a BETWEEN 0 AND 2",
    "a NOT BETWEEN 5 AND 6",
    "a IN (1, 2)",
    "a NOT IN (3)",
    "a IS NOT NULL",
    "b IS NULL",
    "a CONTAINS '1'",
    "a STARTSWITH '1'",
    "a ENDSWITH '1'",
    "a NOT CONTAINS 'x'",
    "(a = 1)",
    "NOT a = 2",
    "TRUE",
];

/// A chain of `n` copies of `term` joined by `joiner` (`AND`, `OR`, or
/// both alternating), cut to stay within the filter size limit.
fn chain(term: &str, joiner: usize, n: usize) -> String {
    let mut s = String::from(term);
    for i in 1..n {
        let op = match joiner {
            0 => " AND ",
            1 => " OR ",
            _ if i % 2 == 0 => " AND ",
            _ => " OR ",
        };
        if s.len() + op.len() + term.len() > weirmq::MAX_FILTER_BYTES {
            break;
        }
        s.push_str(op);
        s.push_str(term);
    }
    s
}

/// Parses, evaluates, clones and drops `src` on a thread with a small
/// stack (a recursive parser, evaluator or drop of a 5,000-term chain
/// overflows it: the process would abort, not fail a test).
fn on_small_stack(src: String) -> Result<(bool, bool), String> {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let f = Filter::sql(&src).map_err(|e| e.to_string())?;
            let yes = Message::prepare(
                OutgoingMessage::new("t", vec![]).property("a", "1"),
                "t".into(),
            );
            let no = Message::prepare(
                OutgoingMessage::new("t", vec![]).property("a", "7"),
                "t".into(),
            );
            let copy = f.clone();
            let r = (copy.matches(&yes), f.matches(&no));
            drop(copy);
            drop(f);
            Ok(r)
        })
        .expect("spawning a test thread")
        .join()
        .expect("the filter thread panicked")
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Regression (issue 13, defect 10): a flat chain of ~5,000 terms used
    /// to overflow the stack (in parse, evaluation or drop) and abort the
    /// process. Now every chain within the size limit parses and evaluates.
    #[test]
    fn long_flat_chains_of_every_operator_parse_and_evaluate(
        term in 0..TERMS.len(), joiner in 0usize..3, n in 1usize..8_000,
    ) {
        let src = chain(TERMS[term], joiner, n);
        let (yes, _) = on_small_stack(src.clone()).map_err(|e| {
            proptest::test_runner::TestCaseError::fail(format!("{e}: {}...", &src[..60.min(src.len())]))
        })?;
        proptest::prop_assert!(yes, "every term is true for a = 1");
    }
}

#[test]
fn a_5000_term_chain_is_accepted_and_a_chain_over_the_size_limit_is_a_typed_error() {
    let src = chain("a = 1", 0, 5_000);
    assert_eq!(src.matches(" AND ").count(), 4_999);
    assert_eq!(on_small_stack(src), Ok((true, false)));
    // With one term false, AND is false and OR is true.
    let mixed = format!("{} AND a = 7", chain("a = 1", 0, 5_000));
    assert_eq!(on_small_stack(mixed), Ok((false, false)));
    let any = format!("{} OR a = 7", chain("a = 2", 1, 5_000));
    assert_eq!(on_small_stack(any), Ok((false, true)));

    let too_long = "a = 1 AND ".repeat(7_000) + "a = 1";
    match Filter::sql(&too_long) {
        Err(e @ Error::InvalidFilter { .. }) => {
            let text = e.to_string();
            assert!(text.contains("more than the limit of 65536"), "{text}");
            assert!(
                text.len() < 400,
                "the message does not repeat the whole input"
            );
        }
        other => panic!("{other:?}"),
    }
    match Filter::tags(&"vip || ".repeat(10_000)) {
        Err(Error::InvalidFilter { position, .. }) => {
            assert_eq!(position, weirmq::MAX_FILTER_BYTES)
        }
        other => panic!("{other:?}"),
    }
    // Nesting beyond the limit is an error too, not an overflow.
    let deep = "NOT ".repeat(weirmq::MAX_NESTING + 1) + "a = 1";
    assert!(on_small_stack(deep)
        .unwrap_err()
        .contains("nested too deeply"));
}

#[actix::test]
async fn a_subscription_with_a_5000_term_filter_delivers_and_drains() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let log = Log::default();
    let src = chain("a = 1", 0, 5_000);
    let sub = bus
        .subscribe::<Num>("long-filter")
        .filter(Filter::sql(&src).unwrap())
        .members(1, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    for n in 0..20u64 {
        let a = if n % 2 == 0 { "1" } else { "2" };
        bus.publish_with(&Num { n }, Publish::new().property("a", a))
            .await
            .unwrap();
    }
    caught_up(&bus, "long-filter", Num::TOPIC).await;
    let got: Vec<u64> = log.entries().iter().map(|e| e.1).collect();
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|n| n % 2 == 0), "{got:?}");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
