//! weirmq end to end: publish and consume through the public API on the
//! embedded store (durable or not) or NATS, at full speed or at a fixed
//! rate, with publish-to-handler latencies.

use crate::*;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub(super) struct BenchEvent {
    pub(super) sent_ns: u64,
    pub(super) pad: String,
}

impl Event for BenchEvent {
    const TOPIC: &'static str = "bench";
}

/// Records end-to-end latency and counts deliveries.
pub(super) struct Sink {
    pub(super) count: Arc<AtomicU64>,
    pub(super) lat: Arc<Mutex<Vec<u32>>>,
    /// An inbox subscription's handler: commits one row per message.
    pub(super) inbox: bool,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Delivery<BenchEvent>> for Sink {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<BenchEvent>, _: &mut Context<Self>) -> Self::Result {
        if self.inbox {
            d.commit_state(
                weirmq::StateBatch::new().put(format!("row/{}", d.message_id()), "handled"),
            )?;
        }
        let us = since_us(d.event().sent_ns);
        self.lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Store {
    Memory,
    Buffered,
    Flushed,
    /// weirmq on NATS JetStream (a server of the scenario's own).
    Nats,
}

impl Store {
    pub(super) fn name(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Buffered => "buffered",
            Store::Flushed => "flushed",
            Store::Nats => "nats",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Run {
    pub(super) name: String,
    pub(super) store: Store,
    pub(super) publishers: usize,
    pub(super) batch: usize,
    pub(super) messages: u64,
    pub(super) groups: usize,
    pub(super) queues: u32,
    pub(super) payload: usize,
    /// What observes the bus (the overhead of observing it).
    pub(super) observed: Observe,
    /// The consumer groups are inbox subscriptions whose handler commits a
    /// row per message (the exactly-once path; compare with the plain ack).
    pub(super) inbox: bool,
}

/// What is installed while a run observes the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Observe {
    /// Nothing: no recorder, no subscriber.
    Off,
    /// A Prometheus recorder and an INFO `tracing` subscriber, as a service
    /// runs in production (weirmq's per-message spans, at DEBUG, are off).
    Metrics,
    /// As `Metrics`, with weirmq's `publish` / `process` spans turned on
    /// (`weirmq::publish=debug,weirmq::process=debug`) and the bus's
    /// default sampling (100 new traces a second): every message carries a
    /// W3C trace context, the sampled ones get spans.
    Traced,
    /// As `Traced` with `TraceSampling::always()`: spans on every message.
    TracedAll,
}

/// A bus on `store`; for NATS, with the server it runs on (keep it alive).
pub(super) async fn open_on(store: Store, dir: &Path) -> (Bus, Option<NatsServer>) {
    open_sampled(store, dir, weirmq::TraceSampling::default()).await
}

/// As `open_on`, with the bus's trace sampling.
async fn open_sampled(
    store: Store,
    dir: &Path,
    sampling: weirmq::TraceSampling,
) -> (Bus, Option<NatsServer>) {
    let b = Bus::builder().trace_sampling(sampling);
    let (b, server) = match store {
        Store::Memory => (b.in_memory().durability(Durability::Buffered), None),
        Store::Buffered => (b.data_dir(dir).durability(Durability::Buffered), None),
        Store::Flushed => (b.data_dir(dir).durability(Durability::Flushed), None),
        Store::Nats => {
            let server = start_nats()
                .await
                .expect("nats-server for the NATS backend");
            let mut config = weirmq::nats::NatsConfig::new(server.url.clone());
            // WEIRMQ_NATS_SCHEDULES=1: delay with the server's message
            // schedules (2.12+) instead of the forwarder, to compare the two
            // paths on one server.
            config.use_message_schedules =
                std::env::var("WEIRMQ_NATS_SCHEDULES").is_ok_and(|v| v == "1");
            (b.nats_config(config), Some(server))
        }
    };
    (b.open().await.expect("open bus"), server)
}

pub(super) async fn open(store: Store, dir: &Path) -> Bus {
    assert!(store != Store::Nats, "use open_on for NATS");
    open_on(store, dir).await.0
}

/// Publishes `messages` from `publishers` tasks (single or batch publishes),
/// optionally with `groups` consumer groups; reports throughput and latency
/// (per publish call without groups, end to end with them).
pub(super) async fn weirmq_run(r: Run) -> Res {
    if r.observed != Observe::Off {
        weirmq::web::install_metrics().expect("the Prometheus recorder");
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(r.observed.filter()))
            .with_ansi(false)
            .with_writer(std::io::sink)
            .init();
    }
    measure(r).await
}

impl Observe {
    /// The `tracing` filter a run observed this way installs: INFO, as a
    /// service logs in production, plus weirmq's spans when traced.
    pub(super) fn filter(self) -> &'static str {
        match self {
            Observe::Off => "off",
            Observe::Metrics => "info",
            Observe::Traced | Observe::TracedAll => {
                "info,weirmq::publish=debug,weirmq::process=debug"
            }
        }
    }
}

/// The run itself, with whatever recorder and subscriber are installed.
pub(super) async fn measure(r: Run) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let sampling = if r.observed == Observe::TracedAll {
        weirmq::TraceSampling::always()
    } else {
        weirmq::TraceSampling::default()
    };
    let (bus, _server) = open_sampled(r.store, dir.path(), sampling).await;
    bus.create_topic(TopicConfig::new(BenchEvent::TOPIC).queues(r.queues))
        .await
        .expect("topic");
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(r.messages as usize)));
    let mut subs = Vec::new();
    for g in 0..r.groups {
        let (c, l) = (count.clone(), lat.clone());
        let sub = bus
            .subscribe::<BenchEvent>(format!("group-{g}"))
            .max_in_flight(4096)
            .max_in_flight_per_member(64);
        let sub = if r.inbox { sub.inbox() } else { sub };
        let inbox = r.inbox;
        subs.push(
            sub.members(4, move || Sink {
                count: c.clone(),
                lat: l.clone(),
                inbox,
            })
            .start()
            .await
            .expect("subscribe"),
        );
    }
    let pad = "x".repeat(r.payload.saturating_sub(30));
    let per = r.messages / r.publishers as u64;
    let total = per * r.publishers as u64;
    let publish_lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..r.publishers {
        let (bus, pad, pl) = (bus.clone(), pad.clone(), publish_lat.clone());
        let batch = r.batch;
        tasks.push(actix::spawn(async move {
            let mut mine = Vec::new();
            let mut sent = 0;
            while sent < per {
                let n = (batch as u64).min(per - sent);
                let t = now_ns();
                if batch == 1 {
                    let e = BenchEvent {
                        sent_ns: t,
                        pad: pad.clone(),
                    };
                    bus.publish(&e).await.expect("publish");
                } else {
                    let events: Vec<BenchEvent> = (0..n)
                        .map(|_| BenchEvent {
                            sent_ns: t,
                            pad: pad.clone(),
                        })
                        .collect();
                    bus.publish_batch(&events).await.expect("publish");
                }
                mine.push(since_us(t));
                sent += n;
            }
            pl.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let expected = total * r.groups as u64;
    while count.load(Ordering::Relaxed) < expected {
        actix::clock::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = start.elapsed();
    let res = Res::new(&r.name, total, r.payload, elapsed);
    let lats = if r.groups > 0 {
        std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()))
    } else {
        std::mem::take(&mut *publish_lat.lock().unwrap_or_else(|p| p.into_inner()))
    };
    for s in subs {
        s.drain().await.expect("drain");
    }
    bus.shutdown().await.expect("shutdown");
    res.latencies(lats)
}

/// End-to-end latency at a fixed offered load: independent single publishes
/// paced every millisecond.
pub(super) async fn fixed_load(
    name: &str,
    store: Store,
    rate: u64,
    secs: f64,
    payload: usize,
) -> Res {
    let dir = tempfile::tempdir().expect("temp dir");
    let (bus, _server) = open_on(store, dir.path()).await;
    let count = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let (c, l) = (count.clone(), lat.clone());
    let sub = bus
        .subscribe::<BenchEvent>("latency")
        .members(4, move || Sink {
            count: c.clone(),
            lat: l.clone(),
            inbox: false,
        })
        .start()
        .await
        .expect("subscribe");
    let pad = "x".repeat(payload.saturating_sub(30));
    let total = (rate as f64 * secs) as u64;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = actix::clock::interval(Duration::from_millis(1));
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let (bus, e) = (
                bus.clone(),
                BenchEvent {
                    sent_ns: now_ns(),
                    pad: pad.clone(),
                },
            );
            actix::spawn(async move {
                bus.publish(&e).await.expect("publish");
            });
            sent += 1;
        }
    }
    while count.load(Ordering::Relaxed) < total {
        actix::clock::sleep(Duration::from_micros(200)).await;
    }
    let res = Res::new(name, total, payload, start.elapsed());
    let lats = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
    sub.drain().await.expect("drain");
    bus.shutdown().await.expect("shutdown");
    res.latencies(lats)
}

/// 64 publishers, single publishes of `n` messages in all; per-publish
/// latencies.
pub(super) async fn publish_p64(bus: &Bus, n: u64, payload: usize) -> (Duration, Vec<u32>) {
    let pad = "x".repeat(payload.saturating_sub(30));
    let per = n / 64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (bus, pad) = (bus.clone(), pad.clone());
            actix::spawn(async move {
                let mut lat = Vec::with_capacity(per as usize);
                for _ in 0..per {
                    let t = now_ns();
                    bus.publish(&BenchEvent {
                        sent_ns: t,
                        pad: pad.clone(),
                    })
                    .await
                    .expect("publish");
                    lat.push(since_us(t));
                }
                lat
            })
        })
        .collect();
    let mut lats = Vec::new();
    for t in tasks {
        lats.extend(t.await.expect("publisher"));
    }
    (start.elapsed(), lats)
}
