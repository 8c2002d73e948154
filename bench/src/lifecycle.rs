//! Retention under load (the data directory stays bounded) and delayed
//! messages' lateness.

use crate::*;

/// Retention under load: a backlog of `n` messages expires while 64
/// publishers publish `live` more. Prints three lines: the publishers
/// without a cleaner running (baseline, same store, same run), the same
/// publishers while the cleaner removes the backlog, and the cleaner itself
/// (messages removed per second; data directory before the pass and after
/// the same amount was written again — the freed space is reused).
pub(super) async fn retention_under_load(name: &str, n: u64, live: u64, payload: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = open(Store::Buffered, dir.path()).await;
    bus.create_topic(TopicConfig::new(BenchEvent::TOPIC).retention(Retention::forever()))
        .await
        .expect("topic");
    let pad = "x".repeat(payload.saturating_sub(30));
    let fill = |bus: Bus, pad: String| async move {
        let mut sent = 0;
        while sent < n {
            let k = 1000.min(n - sent);
            let events: Vec<BenchEvent> = (0..k)
                .map(|_| BenchEvent {
                    sent_ns: 0,
                    pad: pad.clone(),
                })
                .collect();
            bus.publish_batch(&events).await.expect("publish");
            sent += k;
        }
    };
    fill(bus.clone(), pad.clone()).await;
    let (t, lats) = publish_p64(&bus, live, payload).await;
    Res::new(&format!("{name}/publish_p64_no_cleaner"), live, payload, t)
        .latencies(lats)
        .baseline()
        .print();
    // Everything stored so far expires; what is published from now on stays.
    // (Retention removes whole index spans, which cover at most 100 ms of
    // publish time: leave that gap so no span mixes the two.)
    let last = std::time::SystemTime::now();
    while std::time::SystemTime::now() < last + Duration::from_millis(150) {
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let cut = std::time::SystemTime::now();
    while std::time::SystemTime::now() < cut + Duration::from_millis(20) {
        actix::clock::sleep(Duration::from_millis(5)).await;
    }
    let before = dir_mb(dir.path());
    bus.create_topic(
        TopicConfig::new(BenchEvent::TOPIC).retention(
            Retention::forever().max_age(
                std::time::SystemTime::now()
                    .duration_since(cut)
                    .unwrap_or_default(),
            ),
        ),
    )
    .await
    .expect("configure");
    let cleaner = {
        let bus = bus.clone();
        actix::spawn(async move {
            let t = Instant::now();
            let r = bus.enforce_retention().await.expect("retention");
            (t.elapsed(), r)
        })
    };
    let (t, lats) = publish_p64(&bus, live, payload).await;
    Res::new(
        &format!("{name}/publish_p64_while_cleaning"),
        live,
        payload,
        t,
    )
    .latencies(lats)
    .print();
    let (ct, report) = cleaner.await.expect("cleaner");
    let expired = n + live / 64 * 64;
    assert_eq!(
        report.messages, expired,
        "retention removed {} of {expired} expired messages",
        report.messages
    );
    fill(bus.clone(), pad).await;
    let mut r = Res::new(&format!("{name}/cleaner"), report.messages, payload, ct);
    r.data_dir_mb_before = Some(before);
    r.data_dir_mb = Some(dir_mb(dir.path()));
    r.print();
    bus.shutdown().await.expect("shutdown");
}

/// Records how late each delayed message arrived (µs after its due time;
/// for a message without a delay, after its publish).
pub(super) struct LateSink {
    pub(super) count: Arc<AtomicU64>,
    pub(super) lat: Arc<Mutex<Vec<u32>>>,
}

impl Actor for LateSink {
    type Context = Context<Self>;
}

impl Handler<Delivery<BenchEvent>> for LateSink {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<BenchEvent>, _: &mut Context<Self>) -> Self::Result {
        let us = match d.message().deliver_at() {
            Some(due) => std::time::SystemTime::now()
                .duration_since(due)
                .map_or(0, |late| late.as_micros().min(u32::MAX as u128) as u32),
            None => since_us(d.event().sent_ns),
        };
        self.lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Delayed-message precision: `n` messages due over a `spread`, published
/// at once from 64 tasks; the latencies are how late each arrived after its
/// due time. The baseline, in the same run: the same messages without a
/// delay (publish to handler).
pub(super) async fn delay_lateness(
    name: &str,
    store: Store,
    n: u64,
    spread: Duration,
    payload: usize,
) {
    for delayed in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (bus, _server) = open_on(store, dir.path()).await;
        let count = Arc::new(AtomicU64::new(0));
        let lat = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
        let (c, l) = (count.clone(), lat.clone());
        let sub = bus
            .subscribe::<BenchEvent>("late")
            .max_in_flight(4096)
            .max_in_flight_per_member(64)
            .members(4, move || LateSink {
                count: c.clone(),
                lat: l.clone(),
            })
            .start()
            .await
            .expect("subscribe");
        let pad = "x".repeat(payload.saturating_sub(30));
        let start = Instant::now();
        let base = std::time::SystemTime::now() + Duration::from_millis(200);
        let per = n / 64;
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let (bus, pad) = (bus.clone(), pad.clone());
                actix::spawn(async move {
                    for i in 0..per {
                        let mut opts = Publish::new();
                        if delayed {
                            let k = i * 64 + t;
                            let at = spread.as_micros() as u64 * k / (per * 64);
                            opts = opts.deliver_at(base + Duration::from_micros(at));
                        }
                        bus.publish_with(
                            &BenchEvent {
                                sent_ns: now_ns(),
                                pad: pad.clone(),
                            },
                            opts,
                        )
                        .await
                        .expect("publish");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("publisher");
        }
        let total = per * 64;
        while count.load(Ordering::Relaxed) < total {
            actix::clock::sleep(Duration::from_micros(200)).await;
        }
        let lats = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
        let label = if delayed {
            format!("{name}/lateness_after_due")
        } else {
            format!("{name}/no_delay_e2e")
        };
        let r = Res::new(&label, total, payload, start.elapsed()).latencies(lats);
        if delayed {
            r.print()
        } else {
            r.baseline().print()
        }
        sub.drain().await.expect("drain");
        bus.shutdown().await.expect("shutdown");
    }
}
