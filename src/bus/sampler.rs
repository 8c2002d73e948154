//! The metrics sampler: once a second, while metrics are on
//! (`weirmq_bus::metrics::sampled`), the publishes waiting to be stored
//! (every bus of the process), and the gauges of every position group
//! subscribed through this bus — lag per queue, deliveries in flight,
//! retries waiting, the filtered count, the dead-letter queue's size — read
//! through the seam, so both backends report them the same way. A stopped
//! subscription stays watched: its lag keeps growing while it is stopped.
//! The task ends when the bus is dropped or shut down.

use std::sync::Weak;

use weirmq_bus::metrics as m;
use weirmq_bus::Error;

use super::BusInner;

pub(super) async fn run(inner: Weak<BusInner>) {
    loop {
        actix_rt::time::sleep(m::SAMPLE_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if !m::sampled() {
            continue;
        }
        // Every bus of the process, summed (each bus's sampler sets it).
        metrics::gauge!(m::PENDING_PUBLISHES).set(weirmq_bus::pending_publishes() as f64);
        let watched: Vec<(String, String)> = inner
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for (group, topic) in watched {
            if sample(&inner, group, topic).await.is_err() {
                return;
            }
        }
    }
}

/// One group's gauges; `Err` once the bus is closed.
async fn sample(inner: &BusInner, group: String, topic: String) -> Result<(), ()> {
    let broker = &inner.broker;
    match broker.positions(&group, &topic).await {
        Ok(positions) => {
            for p in positions {
                metrics::gauge!(m::LAG, "group" => group.clone(), "topic" => topic.clone(),
                    "queue" => p.queue.to_string())
                .set(p.lag as f64);
            }
        }
        Err(Error::Closed) => return Err(()),
        Err(_) => {}
    }
    let stats = broker.group_stats(&group, &topic).await;
    let labels = [("group", group.clone()), ("topic", topic.clone())];
    metrics::gauge!(m::IN_FLIGHT, &labels).set(stats.in_flight as f64);
    metrics::gauge!(m::SCHEDULED_RETRIES, &labels).set(stats.scheduled_retries as f64);
    metrics::counter!(m::FILTERED, &labels).absolute(stats.filtered);
    match broker.dead_letter_count(&group).await {
        Ok(n) => metrics::gauge!(m::DEAD_LETTERS, "group" => group).set(n as f64),
        Err(Error::Closed) => return Err(()),
        Err(_) => {}
    }
    Ok(())
}
