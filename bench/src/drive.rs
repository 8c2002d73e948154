//! A load driver shared by the peers and the raw limit: publisher tasks
//! (single or batch publishes, at full speed or paced at an offered rate)
//! and the consumers' tally of end-to-end latencies. A message's payload
//! starts with its send time (8 bytes, little endian), then padding.

use crate::*;

/// The payload of one message sent now: its send time, then padding up
/// to `payload` bytes.
pub(super) fn payload_now(payload: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.max(8));
    v.extend_from_slice(&now_ns().to_le_bytes());
    v.resize(payload.max(8), b'x');
    v
}

/// The send time a payload starts with.
pub(super) fn sent_ns_of(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// What the consumers saw: a count and each message's end-to-end latency.
#[derive(Default)]
pub(super) struct Tally {
    count: AtomicU64,
    lat: Mutex<Vec<u32>>,
}

impl Tally {
    /// One message consumed (its payload).
    pub(super) fn seen(&self, payload: &[u8]) {
        let us = since_us(sent_ns_of(payload));
        self.lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.lat.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// How the load is offered.
#[derive(Debug, Clone, Copy)]
pub(super) enum Load {
    /// `publishers` tasks, each publishing `batch` messages a call and
    /// waiting for its acknowledgement, `n` messages in all.
    Full {
        publishers: usize,
        batch: usize,
        n: u64,
    },
    /// Independent single publishes paced at `rate` a second for `secs`.
    Offered { rate: u64, secs: f64 },
}

impl Load {
    pub(super) fn messages(self) -> u64 {
        match self {
            Load::Full { publishers, n, .. } => n / publishers as u64 * publishers as u64,
            Load::Offered { rate, secs } => (rate as f64 * secs) as u64,
        }
    }
}

/// Drives `load` through `publish` (one call per publish: a batch of
/// payloads, acknowledged when it resolves) on the current actix/tokio
/// local set, waits until `tally` has counted every message (at most 5
/// minutes), and reports throughput and end-to-end latencies.
pub(super) async fn drive<F, Fut>(
    name: &str,
    load: Load,
    payload: usize,
    tally: Arc<Tally>,
    publish: F,
) -> Result<Res, String>
where
    F: Fn(Vec<Vec<u8>>) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let total = load.messages();
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let start = Instant::now();
    match load {
        Load::Full {
            publishers, batch, ..
        } => {
            let per = total / publishers as u64;
            let tasks: Vec<_> = (0..publishers)
                .map(|_| {
                    let publish = publish.clone();
                    tokio::task::spawn_local(async move {
                        let mut sent = 0;
                        while sent < per {
                            let k = (batch as u64).min(per - sent);
                            let batch = (0..k).map(|_| payload_now(payload)).collect();
                            publish(batch).await?;
                            sent += k;
                        }
                        Ok::<_, String>(())
                    })
                })
                .collect();
            for t in tasks {
                t.await.map_err(|e| e.to_string())??;
            }
        }
        Load::Offered { rate, .. } => {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while sent < total {
                tick.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
                while sent < due {
                    let (publish, failed) = (publish.clone(), failed.clone());
                    let one = vec![payload_now(payload)];
                    tokio::task::spawn_local(async move {
                        if let Err(e) = publish(one).await {
                            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        }
                    });
                    sent += 1;
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while tally.count() < total {
        if let Some(e) = failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: {} of {total} messages consumed after 5 minutes",
                tally.count()
            ));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(Res::new(name, total, payload, start.elapsed()).latencies(tally.take()))
}

/// Prints that a peer is skipped, and why (it is not reachable here): the
/// run goes on without it, and nothing is reported in its place.
pub(super) fn skipped(name: &str, why: &str) {
    eprintln!("{name}: skipped: {why}");
    println!(
        "{}",
        serde_json::json!({ "scenario": name, "skipped": why })
    );
}
