//! The group's durable pull consumers, one per queue: their configuration,
//! creating or updating them, and moving them (reset).

use super::*;

/// One process's share of the subscription's in-flight limit per queue:
/// the permits of its fetch loop (and, for FIFO, the consumer's
/// `max_ack_pending`, which also bounds the messages waiting behind a busy
/// message group).
pub(super) fn per_queue_limit(spec: &SubscriptionSpec, queues: u32) -> usize {
    (spec.max_in_flight / queues.max(1) as usize).max(1)
}

/// How many processes' shares a concurrent group's consumer lets be
/// unacked at once.
///
/// The consumer is shared by every process of the group. Were its
/// `max_ack_pending` one process's share, a process that died holding its
/// share (fetched, unacked) would stop the whole group until the ack wait
/// ran out — measured: a survivor handled nothing for ~30 s. Each process
/// bounds itself with its permits, so the server's limit only has to leave
/// room for the dead: with 16 shares, up to 15 dead or stuck processes
/// never stop a live one.
pub(super) const GROUP_SHARES: usize = 16;

/// The consumer's `max_ack_pending` for this subscription: FIFO, one share
/// (one process owns the queue at a time); concurrent, [`GROUP_SHARES`].
pub(super) fn server_ack_pending(spec: &SubscriptionSpec, queues: u32) -> usize {
    let share = per_queue_limit(spec, queues);
    match spec.ordering {
        weirmq_bus::Ordering::Fifo => share,
        weirmq_bus::Ordering::Concurrent => share.saturating_mul(GROUP_SHARES),
    }
}

pub(super) fn consumer_config(
    group: &str,
    topic: &str,
    queue: u32,
    ack_wait: Duration,
    max_ack_pending: usize,
    deliver_policy: consumer::DeliverPolicy,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(consumer_name(group, queue)),
        description: Some(format!("weirmq group={group} topic={topic} queue={queue}")),
        filter_subject: queue_filter(topic, queue),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: max_ack_pending as i64,
        // The retry policy above the seam decides when to give up.
        max_deliver: -1,
        deliver_policy,
        ..Default::default()
    }
}

pub(super) async fn ensure_consumer(
    inner: &Inner,
    stream: &jetstream::stream::Stream,
    spec: &SubscriptionSpec,
    queue: u32,
    limit: usize,
) -> Result<consumer::Consumer<consumer::pull::Config>, Error> {
    let name = consumer_name(&spec.group, queue);
    if let Ok(c) = stream.get_consumer::<consumer::pull::Config>(&name).await {
        let have = &c.cached_info().config;
        if have.max_ack_pending != limit as i64 || have.ack_wait != inner.ack_wait {
            let cfg = consumer_config(
                &spec.group,
                &spec.topic,
                queue,
                inner.ack_wait,
                limit,
                have.deliver_policy,
            );
            if let Err(e) = stream.update_consumer(cfg).await {
                warn!(group = %spec.group, queue, error = %e,
                    "could not update the consumer's limits; using it as it is");
            }
        }
        return Ok(c);
    }
    let policy = match spec.start {
        StartFrom::Latest => consumer::DeliverPolicy::New,
        StartFrom::Earliest => consumer::DeliverPolicy::All,
    };
    let cfg = consumer_config(
        &spec.group,
        &spec.topic,
        queue,
        inner.ack_wait,
        limit,
        policy,
    );
    match stream.create_consumer(cfg).await {
        Ok(c) => Ok(c),
        // Created by another process meanwhile.
        Err(e) => stream
            .get_consumer::<consumer::pull::Config>(&name)
            .await
            .map_err(|_| nats_err(format!("creating consumer {name}"), e)),
    }
}

/// Moves `group`'s consumers of every queue of `topic` to `to` by
/// recreating them (JetStream cannot move a durable consumer's start); a
/// running subscription's fetch loops pick the new ones up.
pub(crate) async fn reset(
    inner: &Inner,
    group: &str,
    topic: &TopicState,
    to: ResetTo,
    running: Option<&SubState>,
) -> Result<(), Error> {
    let name = topic.config.name();
    let stream = inner.stream(&topic_stream(name)).await?;
    let policy = match to {
        ResetTo::Earliest => consumer::DeliverPolicy::All,
        ResetTo::Latest => consumer::DeliverPolicy::New,
        ResetTo::Time(t) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from(t),
        },
    };
    if let Some(s) = running {
        // FIFO: what was held from the old consumers is forgotten before
        // the new ones deliver (it comes again from them).
        for f in &s.fifo {
            f.lock().unwrap().drain_held();
        }
    }
    for q in 0..topic.config.queue_count() {
        let cname = consumer_name(group, q);
        let limit = match stream.get_consumer::<consumer::pull::Config>(&cname).await {
            Ok(c) => c.cached_info().config.max_ack_pending.max(1) as usize,
            Err(_) => running.map_or(16 * GROUP_SHARES, |s| {
                server_ack_pending(&s.spec, topic.config.queue_count())
            }),
        };
        let _ = stream.delete_consumer(&cname).await;
        let cfg = consumer_config(group, name, q, inner.ack_wait, limit, policy);
        stream
            .create_consumer(cfg)
            .await
            .map_err(|e| nats_err(format!("recreating consumer {cname}"), e))?;
    }
    if let Some(s) = running {
        // Deliveries from the old consumers finish; their settlements go
        // nowhere. Forget their retry bookkeeping.
        s.failures.clear();
        s.counters
            .scheduled_retries
            .store(0, AtomicOrdering::Relaxed);
    }
    Ok(())
}
