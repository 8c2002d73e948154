//! Broadcasting: every member gets every message, each member keeps its own
//! position across restarts, failures are not retried by default.

mod support;

use std::sync::Arc;
use std::sync::Mutex;

use support::*;
use weirmq::prelude::*;

/// Records (member id, n) for every delivery; fails n == 13 on member "b".
struct Node {
    id: String,
    seen: Arc<Mutex<Vec<(String, u64, u32)>>>,
}

impl Actor for Node {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Node {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let n = d.event().n;
        self.seen
            .lock()
            .unwrap()
            .push((self.id.clone(), n, d.attempt()));
        if self.id == "b" && n == 13 {
            return Err(HandlerError::retry("b cannot take 13"));
        }
        Ok(())
    }
}

type Seen = Arc<Mutex<Vec<(String, u64, u32)>>>;

/// A factory handing out ids in order (one actor per broadcast member).
fn nodes(ids: &[&str], seen: &Seen) -> impl Fn() -> Node + 'static {
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    let next = Arc::new(Mutex::new(0usize));
    let seen = seen.clone();
    move || {
        let mut i = next.lock().unwrap();
        let id = ids[*i % ids.len()].clone();
        *i += 1;
        Node {
            id,
            seen: seen.clone(),
        }
    }
}

async fn settled(bus: &Bus, sub: &Subscription) {
    for g in sub.position_groups() {
        caught_up(bus, g, Num::TOPIC).await;
    }
}

#[actix::test]
async fn every_member_gets_every_message_and_resumes_at_its_own_position() {
    let dir = temp_dir();
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let seen: Seen = Arc::default();
    let sub = bus
        .subscribe::<Num>("cache-invalidation")
        .broadcast(["a", "b", "c"])
        .members(1, nodes(&["a", "b", "c"], &seen))
        .start()
        .await
        .unwrap();
    assert_eq!(
        sub.position_groups(),
        vec![
            "cache-invalidation%a",
            "cache-invalidation%b",
            "cache-invalidation%c"
        ]
    );
    for n in 0..20 {
        bus.publish(&Num { n }).await.unwrap();
    }
    settled(&bus, &sub).await;
    {
        let seen = seen.lock().unwrap();
        for id in ["a", "b", "c"] {
            let mut got: Vec<u64> = seen.iter().filter(|s| s.0 == id).map(|s| s.1).collect();
            got.sort_unstable();
            assert_eq!(got, (0..20).collect::<Vec<_>>(), "member {id}");
        }
        assert!(
            seen.iter().all(|s| s.2 == 1),
            "no retries in broadcast mode"
        );
    }
    // b's failure was not retried: it is counted and kept in b's DLQ only.
    let stats = sub.stats().await;
    assert_eq!(
        (stats.acked, stats.dead_lettered, stats.retried),
        (59, 1, 0)
    );
    assert_eq!(
        bus.dead_letter_count("cache-invalidation%b").await.unwrap(),
        1
    );
    assert_eq!(
        bus.dead_letter_count("cache-invalidation%a").await.unwrap(),
        0
    );
    sub.drain().await.unwrap();

    // Only member "a" comes back: it resumes after what it handled.
    for n in 20..25 {
        bus.publish(&Num { n }).await.unwrap();
    }
    seen.lock().unwrap().clear();
    let sub = bus
        .subscribe::<Num>("cache-invalidation")
        .broadcast(["a"])
        .members(1, nodes(&["a"], &seen))
        .start()
        .await
        .unwrap();
    settled(&bus, &sub).await;
    let got: Vec<u64> = {
        let mut v: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.1).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(got, (20..25).collect::<Vec<_>>());
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn broadcast_member_ids_are_validated() {
    let bus = Bus::builder().in_memory().open().await.unwrap();
    let seen: Seen = Arc::default();
    let e = bus
        .subscribe::<Num>("g")
        .broadcast(["ok", "not ok"])
        .members(1, nodes(&["x"], &seen))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, weirmq::Error::InvalidName { .. }), "{e}");
    let e = bus
        .subscribe::<Num>("g")
        .broadcast(Vec::<String>::new())
        .members(1, nodes(&["x"], &seen))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(e, weirmq::Error::InvalidConfig { .. }), "{e}");
    bus.shutdown().await.unwrap();
}
