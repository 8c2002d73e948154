//! Durability: `Flushed` publishes resolve only after sled's flush *and* an
//! fdatasync of the store's files (blob files and their directory included);
//! `Buffered` ones without a sync.

mod support;

use std::sync::{Arc, Mutex};

use support::*;
use weirmq::prelude::*;
use weirmq::{OutgoingMessage, SyncEvent};

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Sync(SyncEvent),
    Receipt,
}

fn recording_bus(dir: &std::path::Path) -> (weirmq::BusBuilder, Arc<Mutex<Vec<Step>>>) {
    let steps = Arc::new(Mutex::new(Vec::new()));
    let s = steps.clone();
    let builder = Bus::builder()
        .data_dir(dir)
        .on_sync(move |e| s.lock().unwrap().push(Step::Sync(e.clone())));
    (builder, steps)
}

#[actix::test]
async fn flushed_publish_resolves_after_flush_and_fdatasync() {
    let dir = temp_dir();
    let (builder, steps) = recording_bus(dir.path());
    let bus = builder.open().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC))
        .await
        .unwrap();
    steps.lock().unwrap().clear();

    bus.publish_with(
        &Num { n: 1 },
        Publish::new().durability(Durability::Flushed),
    )
    .await
    .unwrap();
    steps.lock().unwrap().push(Step::Receipt);

    let steps = steps.lock().unwrap().clone();
    let flush = steps
        .iter()
        .position(|s| *s == Step::Sync(SyncEvent::Flush));
    let datasync = steps
        .iter()
        .position(|s| matches!(s, Step::Sync(SyncEvent::DataSync(p)) if p.ends_with("db")));
    let receipt = steps.iter().position(|s| *s == Step::Receipt);
    let (Some(flush), Some(datasync), Some(receipt)) = (flush, datasync, receipt) else {
        panic!("missing a step: {steps:?}");
    };
    assert!(flush < datasync, "fdatasync before sled's flush: {steps:?}");
    assert!(
        datasync < receipt,
        "receipt before the fdatasync: {steps:?}"
    );
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn buffered_publish_does_not_wait_for_a_sync() {
    let dir = temp_dir();
    let (builder, steps) = recording_bus(dir.path());
    let bus = builder.open().await.unwrap();
    bus.create_topic(TopicConfig::new(Num::TOPIC))
        .await
        .unwrap();
    steps.lock().unwrap().clear();
    for n in 0..100 {
        bus.publish_with(&Num { n }, Publish::new().durability(Durability::Buffered))
            .await
            .unwrap();
    }
    assert_eq!(*steps.lock().unwrap(), Vec::<Step>::new());
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn a_4_mib_message_takes_the_blob_path_and_its_blob_is_synced_before_the_receipt() {
    let dir = temp_dir();
    let (builder, steps) = recording_bus(dir.path());
    let bus = builder.open().await.unwrap();
    let body: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let msg = OutgoingMessage::new("blobs", body.clone()).tag("big");
    steps.lock().unwrap().clear();
    let receipt = bus.publish_raw(msg, Durability::Flushed).await.unwrap();
    steps.lock().unwrap().push(Step::Receipt);

    let steps_now = steps.lock().unwrap().clone();
    let blob = steps_now
        .iter()
        .position(|s| matches!(s, Step::Sync(SyncEvent::BlobSync(p)) if p.parent().unwrap().ends_with("blobs")))
        .unwrap_or_else(|| panic!("no blob file was synced: {steps_now:?}"));
    let dir_sync = steps_now
        .iter()
        .position(|s| matches!(s, Step::Sync(SyncEvent::DirSync(p)) if p.ends_with("blobs")))
        .unwrap_or_else(|| panic!("the blob directory was not synced: {steps_now:?}"));
    let receipt_at = steps_now.iter().position(|s| *s == Step::Receipt).unwrap();
    assert!(blob < dir_sync && dir_sync < receipt_at, "{steps_now:?}");
    bus.shutdown().await.unwrap();

    // And it reads back whole after a reopen.
    let bus = Bus::builder().data_dir(dir.path()).open().await.unwrap();
    let got = bus
        .read_queue("blobs", receipt.queue, receipt.offset, 1)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id(), receipt.message_id);
    assert_eq!(got[0].tag(), Some("big"));
    assert!(
        got[0].body() == body.as_slice(),
        "body differs after reopen"
    );
    bus.shutdown().await.unwrap();
}

#[actix::test]
async fn in_memory_bus_publishes_and_delivers_without_touching_disk() {
    let synced = Arc::new(Mutex::new(0));
    let s = synced.clone();
    let bus = Bus::builder()
        .in_memory()
        .on_sync(move |_| *s.lock().unwrap() += 1)
        .open()
        .await
        .unwrap();
    let log = Log::default();
    let sub = bus
        .subscribe::<Num>("g")
        .members(2, recorders(&log, ack_all()))
        .start()
        .await
        .unwrap();
    let r = bus.publish(&Num { n: 5 }).await.unwrap();
    assert_eq!(r.offset, 0);
    delivered(&log, 1).await;
    assert_eq!(*synced.lock().unwrap(), 0);
    sub.drain().await.unwrap();
    bus.shutdown().await.unwrap();
}
