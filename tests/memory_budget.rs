//! An in-memory bus keeps its store within its memory budget
//! (`BusBuilder::memory_budget`): consumed messages are removed as the
//! store fills, a publish that would pass the budget is refused with a
//! typed `MemoryFull` (nothing stored), and nothing unconsumed is ever
//! removed to make room.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use weirmq::prelude::*;
use weirmq::{Error, SendReceipt};

const BUDGET: u64 = 2 * 1024 * 1024;

async fn open() -> Bus {
    Bus::builder()
        .in_memory()
        .memory_budget(BUDGET)
        .open()
        .await
        .unwrap()
}

/// The numbers of the blobs a group was handed.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashSet<u64>>>);

impl Seen {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

struct Sink(Seen);
impl Actor for Sink {
    type Context = Context<Self>;
}
impl Handler<Delivery<Blob>> for Sink {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Blob>, _: &mut Context<Self>) -> Self::Result {
        self.0 .0.lock().unwrap().insert(d.event().n);
        Ok(())
    }
}

/// Publishes `n`, waiting out `MemoryFull` (the documented way to shed
/// load) for up to 30 s; how many refusals it took.
async fn publish_through(bus: &Bus, n: u64) -> u32 {
    let refused = std::cell::Cell::new(0);
    let through = holds_within(Duration::from_secs(30), || async {
        match bus.publish(&blob(n)).await {
            Ok(_) => true,
            Err(Error::MemoryFull { .. }) => {
                refused.set(refused.get() + 1);
                false
            }
            Err(e) => panic!("publish {n}: {e}"),
        }
    })
    .await;
    assert!(through, "publish {n} still refused after 30 s");
    refused.get()
}

#[actix::test]
async fn a_full_in_memory_bus_refuses_publishes_and_loses_nothing() {
    let bus = open().await;
    // A group that has started (its position counts) but is not running.
    let first = bus
        .subscribe::<Blob>("archive")
        .start_from(StartFrom::Earliest)
        .members(1, || Sink(Seen::default()))
        .start()
        .await
        .unwrap();
    first.drain().await.unwrap();

    let mut receipts: Vec<SendReceipt> = Vec::new();
    let e = loop {
        match bus.publish(&blob(receipts.len() as u64)).await {
            Ok(r) => receipts.push(r),
            Err(e) => break e,
        }
        assert!(receipts.len() < 10_000, "40 MiB went into a 2 MiB budget");
    };
    match &e {
        Error::MemoryFull { budget, available } => {
            assert_eq!(*budget, BUDGET);
            assert!(*available < 8 * 1024, "refused only when full: {e}");
        }
        other => panic!("expected MemoryFull, got {other:?}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("nothing was stored") && text.contains("memory_budget"),
        "says what happened and what to do: {text}"
    );
    // Most of the budget holds messages (the rest: envelopes, index, the
    // per-entry overhead counted).
    let stored = receipts.len() as u64 * 4096;
    assert!(stored > BUDGET / 2, "{} blobs stored", receipts.len());
    // Nobody consumed anything: nothing may go, publishes stay refused.
    let again = bus.publish(&blob(999_999)).await;
    assert!(matches!(again, Err(Error::MemoryFull { .. })), "{again:?}");
    for r in &receipts {
        let got = bus
            .read_queue(Blob::TOPIC, r.queue, r.offset, 1)
            .await
            .unwrap();
        assert_eq!(got.first().map(|m| m.id()), Some(r.message_id), "{r:?}");
    }

    // The group consumes every receipted message; then there is room again.
    let seen = Seen::default();
    let s = seen.clone();
    let sub = bus
        .subscribe::<Blob>("archive")
        .members(2, move || Sink(s.clone()))
        .start()
        .await
        .unwrap();
    caught_up(&bus, "archive", Blob::TOPIC).await;
    assert_eq!(seen.len(), receipts.len(), "every receipted message");
    publish_through(&bus, 1_000_000).await;
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}

/// With a group keeping up, a bus carries many times its budget: what was
/// consumed is removed as the store fills.
#[actix::test]
async fn a_consuming_group_lets_a_bus_carry_many_times_its_budget() {
    let bus = open().await;
    let seen = Seen::default();
    let s = seen.clone();
    let sub = bus
        .subscribe::<Blob>("mailer")
        .start_from(StartFrom::Earliest)
        .members(2, move || Sink(s.clone()))
        .start()
        .await
        .unwrap();
    // 10x the budget.
    let n = 10 * BUDGET / 4096;
    let mut refused = 0;
    for i in 0..n {
        refused += publish_through(&bus, i).await;
    }
    caught_up(&bus, "mailer", Blob::TOPIC).await;
    assert_eq!(seen.len() as u64, n, "every message, once each");
    eprintln!("{n} blobs through a {BUDGET}-byte budget, {refused} refusals waited out");
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
