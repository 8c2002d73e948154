//! The peak-shaving scenarios: a burst drained by a slower consumer, and a
//! large backlog drained, each with its peak RSS against the stated bound.

use crate::*;

/// Builds a backlog of `n` messages behind a group limited to 5,000 msg/s
/// and reports the process's peak RSS; checks nothing was lost.
pub(super) async fn peak_shaving_rss(name: &str, n: u64, payload: usize) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = open(Store::Buffered, dir.path()).await;
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (c, l) = (count.clone(), lat.clone());
    let sub = bus
        .subscribe::<BenchEvent>("backend")
        .rate_limit(5000)
        .members(4, move || Sink {
            count: c.clone(),
            lat: l.clone(),
            inbox: false,
        })
        .start()
        .await
        .expect("subscribe");
    let start = Instant::now();
    publish_in_batches(&bus, n, payload).await;
    let elapsed = start.elapsed();
    let stored: u64 = bus
        .positions("backend", BenchEvent::TOPIC)
        .await
        .expect("positions")
        .iter()
        .map(|p| p.max)
        .sum();
    assert_eq!(stored, n, "messages lost in the peak-shaving scenario");
    let res = Res::new(name, n, payload, elapsed);
    sub.drain().await.expect("drain");
    bus.shutdown().await.expect("shutdown");
    res
}

/// The store's cache in the drain scenario: small, so that the backlog is
/// many times the cache and the bound is tight.
pub(super) const DRAIN_CACHE_MIB: u64 = 16;

/// A backlog of `n` messages written with no consumer, then read back from
/// the store and consumed by a group starting at the earliest offset, with
/// a 16 MiB cache: peak RSS against the bound docs/delivery.md states.
/// Throughput is the drain's.
pub(super) async fn backlog_drain_rss(name: &str, n: u64, payload: usize) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = Bus::builder()
        .data_dir(dir.path())
        .durability(Durability::Buffered)
        .cache_capacity(DRAIN_CACHE_MIB * 1024 * 1024)
        .open()
        .await
        .expect("open bus");
    let start_rss = rss_mb();
    publish_in_batches(&bus, n, payload).await;
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (c, l) = (count.clone(), lat.clone());
    let start = Instant::now();
    let sub = bus
        .subscribe::<BenchEvent>("backend")
        .start_from(StartFrom::Earliest)
        .members(4, move || Sink {
            count: c.clone(),
            lat: l.clone(),
            inbox: false,
        })
        .start()
        .await
        .expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(600);
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "drained {} of {n} in 600 s",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut res = Res::new(name, n, payload, start.elapsed());
    // The default in-flight window (1,024) of decoded messages.
    let window_mb = 1024.0 * (payload + 256) as f64 / (1024.0 * 1024.0);
    res.rss_bound_mb = Some(start_rss + 2.0 * DRAIN_CACHE_MIB as f64 + 96.0 + window_mb);
    sub.drain().await.expect("drain");
    bus.shutdown().await.expect("shutdown");
    res
}

/// Publishes `n` events of `payload` bytes in batches of 1,000, as fast as
/// the bus takes them.
pub(super) async fn publish_in_batches(bus: &Bus, n: u64, payload: usize) {
    let pad = "x".repeat(payload.saturating_sub(30));
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        let events: Vec<BenchEvent> = (0..k)
            .map(|_| BenchEvent {
                sent_ns: now_ns(),
                pad: pad.clone(),
            })
            .collect();
        bus.publish_batch(&events).await.expect("publish");
        sent += k;
    }
}
