//! Dead-letter queues: paging, counting, redrive to the failing group only
//! (once per dead letter, with a report per message), and purge.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use weirmq::prelude::*;
use weirmq::{MessageId, Resend, ResendOutcome};

fn even_fail_while(broken: Arc<AtomicBool>) -> Behaviour {
    Arc::new(move |d: &Delivery<Num>| {
        if d.event().n % 2 == 0 && broken.load(Ordering::SeqCst) {
            Err(HandlerError::retry("downstream is down"))
        } else {
            Ok(())
        }
    })
}

#[actix::test]
async fn dead_letters_are_resent_to_their_group_only_once_each_then_purged() {
    init_tracing();
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let (a_log, b_log) = (Log::default(), Log::default());
    let a = bus
        .subscribe::<Num>("a")
        .retry(RetryPolicy::none())
        .members(2, recorders(&a_log, even_fail_while(broken.clone())))
        .start()
        .await
        .unwrap();
    let b = bus
        .subscribe::<Num>("b")
        .members(2, recorders(&b_log, ack_all()))
        .start()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(bus.publish(&Num { n }).await.unwrap().message_id);
    }
    caught_up(&bus, "a", Num::TOPIC).await;
    caught_up(&bus, "b", Num::TOPIC).await;

    // Paging and counting.
    assert_eq!(bus.dead_letter_count("a").await.unwrap(), 5);
    assert_eq!(bus.dead_letter_count("b").await.unwrap(), 0);
    let first = bus.dead_letters("a", 0, 2).await.unwrap();
    let rest = bus
        .dead_letters("a", first[1].dlq_offset + 1, 100)
        .await
        .unwrap();
    assert_eq!((first.len(), rest.len()), (2, 3));
    let dead_ids: Vec<MessageId> = first
        .iter()
        .chain(&rest)
        .map(|d| d.original_id().unwrap())
        .collect();
    let mut expected: Vec<MessageId> = ids.iter().step_by(2).copied().collect();
    let mut got = dead_ids.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert!(first.iter().all(|d| d.attempts() == Some(1) && !d.resent));
    assert!(first[0].reason().unwrap().contains("downstream is down"));

    // The fix is deployed; resend one, twice in the same call, and an unknown id.
    broken.store(false, Ordering::SeqCst);
    let unknown = MessageId::from_u128(42);
    let reports = bus
        .resend_dead_letters("a", Resend::Ids(vec![ids[0], ids[0], unknown]))
        .await
        .unwrap();
    let outcomes: Vec<ResendOutcome> = reports.iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        vec![
            ResendOutcome::Resent,
            ResendOutcome::AlreadyResent,
            ResendOutcome::NotFound
        ]
    );
    wait_until("0 is redelivered to a", Duration::from_secs(10), || {
        let n = a_log.counts().get(&0).copied().unwrap_or(0);
        async move { n == 2 }
    })
    .await;
    let again = bus
        .resend_dead_letters("a", Resend::Ids(vec![ids[0]]))
        .await
        .unwrap();
    assert_eq!(again[0].outcome, ResendOutcome::AlreadyResent);

    // The rest, while the group is not running: delivered when it resubscribes.
    a.drain().await.unwrap();
    let all = bus.resend_dead_letters("a", Resend::All).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.outcome == ResendOutcome::Resent));
    assert!(bus
        .resend_dead_letters("a", Resend::All)
        .await
        .unwrap()
        .is_empty());
    let a = bus
        .subscribe::<Num>("a")
        .retry(RetryPolicy::none())
        .members(2, recorders(&a_log, even_fail_while(broken.clone())))
        .start()
        .await
        .unwrap();
    caught_up(&bus, "a", Num::TOPIC).await;
    wait_until(
        "every even message came back to a",
        Duration::from_secs(10),
        || {
            let counts = a_log.counts();
            async move { (0..10).step_by(2).all(|n| counts.get(&n) == Some(&2)) }
        },
    )
    .await;
    let counts = a_log.counts();
    assert!((1..10).step_by(2).all(|n| counts[&n] == 1), "{counts:?}");
    // Group b never saw any of it again.
    caught_up(&bus, "b", Num::TOPIC).await;
    let b_counts = b_log.counts();
    assert_eq!(b_counts.len(), 10);
    assert!(b_counts.values().all(|c| *c == 1), "{b_counts:?}");
    let resent_letters = bus.dead_letters("a", 0, 100).await.unwrap();
    assert!(resent_letters.iter().all(|d| d.resent));

    // Purge.
    assert_eq!(bus.purge_dead_letters("a").await.unwrap(), 5);
    assert_eq!(bus.dead_letter_count("a").await.unwrap(), 0);
    assert!(bus.dead_letters("a", 0, 100).await.unwrap().is_empty());
    a.drain().await.unwrap();
    b.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
