//! Delayed messages on NATS arrive on time, every time: hundreds of short
//! delays over several runs, each delivered no earlier than its time and
//! less than [`BOUND`] after it (issue 17, point 5: an earlier version let
//! a few of a run's messages arrive 4-5 s late).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use support::backend::Backend;
use support::*;
use weirmq::prelude::*;

/// The lateness every delayed message must stay under.
const BOUND: Duration = Duration::from_millis(500);
/// Runs, each on a fresh bus (the first on a fresh server).
const RUNS: usize = 6;
/// Delayed messages per run.
const PER_RUN: u64 = 200;

/// One delivery: (n, received at, its due time).
type Arrival = (u64, SystemTime, SystemTime);

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Arrival>>>);

struct Timer(Seen);

impl Actor for Timer {
    type Context = Context<Self>;
}

impl Handler<Delivery<Num>> for Timer {
    type Result = Result<(), HandlerError>;
    fn handle(&mut self, d: Delivery<Num>, _: &mut Context<Self>) -> Self::Result {
        let due = d
            .message()
            .deliver_at()
            .expect("a delayed message has a time");
        self.0
             .0
            .lock()
            .unwrap()
            .push((d.event().n, SystemTime::now(), due));
        Ok(())
    }
}

/// Every consumer on the server and where it stands: says where a
/// missing message waits (the forwarder's `WQ_SYS_SCHEDULE` or the group's
/// queue consumers).
async fn consumers_of(backend: &Backend) -> String {
    use futures::TryStreamExt;
    let Backend::Nats(server) = backend else {
        return String::new();
    };
    let Ok(client) = async_nats::connect(server.url.as_str()).await else {
        return "(the server cannot be reached)".into();
    };
    let js = async_nats::jetstream::new(client);
    let mut out = String::new();
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap_or_default();
    for name in names {
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        let consumers: Vec<_> = stream.consumers().try_collect().await.unwrap_or_default();
        for c in consumers {
            out.push_str(&format!(
                "  {name}/{}: pending {} ack_pending {} redelivered {} waiting {} \
                 delivered {} ack_floor {}\n",
                c.name,
                c.num_pending,
                c.num_ack_pending,
                c.num_redelivered,
                c.num_waiting,
                c.delivered.stream_sequence,
                c.ack_floor.stream_sequence
            ));
        }
    }
    out
}

/// Delays from 50 ms to ~3 s, spread so that some are due at the same
/// millisecond, some within the forwarder's local hold (≤ 1 s) and some
/// beyond it (handed back to the server first).
fn delay_of(n: u64) -> Duration {
    Duration::from_millis(50 + (n * 7919) % 2950)
}

#[actix::test]
async fn hundreds_of_short_delays_arrive_within_the_bound_in_every_run() {
    support::within_deadline(
        "hundreds_of_short_delays_arrive_within_the_bound_in_every_run",
        async {
            let Some(backend) = Backend::nats().await else {
                return;
            };
            let mut worst_overall = Duration::ZERO;
            for run in 0..RUNS {
                let bus = backend.open().await;
                let first = run as u64 * 1000;
                let seen = Seen::default();
                let s = seen.clone();
                let sub = bus
                    .subscribe::<Num>("timers")
                    .members(1, move || Timer(s.clone()))
                    .start()
                    .await
                    .unwrap();
                // Published from several tasks at once, as a service would.
                let start = SystemTime::now();
                let mut publishers = Vec::new();
                for p in 0..4u64 {
                    let bus = bus.clone();
                    publishers.push(actix::spawn(async move {
                        for n in (first + p..first + PER_RUN).step_by(4) {
                            bus.publish_with(&Num { n }, Publish::new().delay(delay_of(n)))
                                .await
                                .unwrap();
                        }
                    }));
                }
                for p in publishers {
                    p.await.unwrap();
                }
                let last_due = start + Duration::from_millis(3000);
                let deadline = last_due
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    + Duration::from_secs(20);
                // Waits for the run's deliveries; a timeout names what is missing.
                let all_in = holds_within(deadline, || {
                    let len = seen.0.lock().unwrap().len();
                    async move { len >= PER_RUN as usize }
                })
                .await;
                if !all_in {
                    let got: std::collections::HashSet<u64> =
                        seen.0.lock().unwrap().iter().map(|a| a.0).collect();
                    let missing: Vec<(u64, Duration)> = (first..first + PER_RUN)
                        .filter(|n| !got.contains(n))
                        .map(|n| (n, delay_of(n)))
                        .collect();
                    panic!(
                        "run {run}: {} of {PER_RUN} delivered {:?} after the publishes began; \
                     missing (n, delay): {missing:?}\nthe server's consumers:\n{}",
                        got.len(),
                        start.elapsed().unwrap_or_default(),
                        consumers_of(&backend).await
                    );
                }
                let arrivals = seen.0.lock().unwrap().clone();
                let mut ns: Vec<u64> = arrivals.iter().map(|a| a.0).collect();
                ns.sort_unstable();
                ns.dedup();
                assert_eq!(
                    ns,
                    (first..first + PER_RUN).collect::<Vec<_>>(),
                    "run {run}: every message of this run, once"
                );
                assert_eq!(arrivals.len() as u64, PER_RUN, "run {run}: none twice");
                let mut late: Vec<Duration> = Vec::new();
                for (n, at, due) in &arrivals {
                    let lateness = at.duration_since(*due).unwrap_or_else(|e| {
                        panic!(
                            "run {run}: message {n} arrived {:?} before its time",
                            e.duration()
                        )
                    });
                    late.push(lateness);
                }
                late.sort_unstable();
                let worst = *late.last().unwrap();
                eprintln!(
                    "run {run}: lateness p50 {:?} p99 {:?} max {worst:?}",
                    late[late.len() / 2],
                    late[late.len() * 99 / 100]
                );
                assert!(
                    worst < BOUND,
                    "run {run}: a delayed message arrived {worst:?} late (bound {BOUND:?}); \
                 lateness sorted: {:?}",
                    &late[late.len().saturating_sub(10)..]
                );
                worst_overall = worst_overall.max(worst);
                sub.drain().await.unwrap();
                bus.shutdown().await.unwrap();
            }
            eprintln!("worst lateness over {RUNS} runs: {worst_overall:?}");
        },
    )
    .await
}
