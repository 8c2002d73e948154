//! The library mechanisms behind delayed and transactional messages on
//! JetStream (2.9 has no message schedules): a *forwarder* that moves due
//! delayed messages to their topic and a *checker* that asks transaction
//! checkers about half messages left open. Both are durable pull consumers
//! shared by every process on the server, so any live process does the
//! work; each message waits for its time as a `Nak` with that delay.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, AckKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tracing::{debug, error, info, warn};

use weirmq_bus::{Error, Message, TransactionOutcome, HALF_TOPIC, SCHEDULE_TOPIC};

use crate::names::*;
use crate::{nats_err, Inner};

/// How long a half message waits when no process here has a checker for
/// its topic (another process may).
const NO_CHECKER_RETRY: Duration = Duration::from_secs(5);
/// A delayed message due within this long is held by the forwarder (a
/// local timer) rather than handed back to the server.
const HOLD_LOCALLY: Duration = Duration::from_secs(1);

pub(crate) fn start(inner: Arc<Inner>) -> Vec<tokio::task::JoinHandle<()>> {
    let h = inner.handle.clone();
    vec![
        h.spawn(run_loop(
            inner.clone(),
            SCHEDULE_STREAM,
            "forwarder",
            Kind::Forward,
        )),
        h.spawn(run_loop(inner, HALF_STREAM, "checker", Kind::Check)),
    ]
}

#[derive(Clone, Copy)]
enum Kind {
    Forward,
    Check,
}

async fn run_loop(inner: Arc<Inner>, stream_name: &'static str, durable: &'static str, kind: Kind) {
    let mut stop = inner.stop.subscribe();
    let mut consumer = None;
    while !*stop.borrow() {
        let c = match consumer.take() {
            Some(c) => c,
            None => match open_consumer(&inner, stream_name, durable).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(stream = stream_name, error = %e, "system consumer unavailable; retrying");
                    let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
                    continue;
                }
            },
        };
        let batch = c
            .batch()
            .max_messages(256)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut msgs = match batch {
            Ok(m) => m,
            Err(e) => {
                debug!(stream = stream_name, error = %e, "system fetch failed");
                let _ = tokio::time::timeout(Duration::from_millis(200), stop.changed()).await;
                continue;
            }
        };
        let mut healthy = true;
        'fetch: while let Some(first) = msgs.next().await {
            // Whatever else has arrived is handled with it (the forwarder
            // publishes a batch pipelined).
            let mut ready = Vec::new();
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Ok(m) => ready.push(m),
                    Err(e) => {
                        debug!(stream = stream_name, error = %e, "system fetch ended");
                        healthy = false;
                    }
                }
                if healthy {
                    next = msgs.next().now_or_never().flatten();
                }
            }
            match kind {
                Kind::Forward => forward(&inner, ready).await,
                Kind::Check => {
                    for m in ready {
                        check(&inner, m).await;
                    }
                }
            }
            if !healthy {
                break 'fetch;
            }
        }
        if healthy {
            consumer = Some(c);
        }
    }
}

async fn open_consumer(
    inner: &Inner,
    stream_name: &str,
    durable: &str,
) -> Result<consumer::Consumer<consumer::pull::Config>, Error> {
    let stream = inner.stream(stream_name).await?;
    if let Ok(c) = stream.get_consumer(durable).await {
        return Ok(c);
    }
    let cfg = consumer::pull::Config {
        durable_name: Some(durable.to_string()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        // Every waiting message is pending (naked until its time).
        max_ack_pending: -1,
        max_deliver: -1,
        ..Default::default()
    };
    match stream.create_consumer(cfg).await {
        Ok(c) => Ok(c),
        Err(e) => stream
            .get_consumer(durable)
            .await
            .map_err(|_| nats_err(format!("creating consumer {durable} on {stream_name}"), e)),
    }
}

fn until(at: Option<SystemTime>) -> Option<Duration> {
    at.and_then(|t| t.duration_since(SystemTime::now()).ok())
        .filter(|d| !d.is_zero())
}

/// Delayed messages: one not due waits (nak with the rest of its delay);
/// due ones are stored in their topics (same id, so a crash between the two
/// steps does not deliver one twice within the duplicate window), pipelined,
/// then acked.
async fn forward(inner: &Arc<Inner>, batch: Vec<jetstream::Message>) {
    let mut due = Vec::new();
    let mut held = Vec::new();
    for m in batch {
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        let msg = match Message::decode_envelope(Arc::from(SCHEDULE_TOPIC), 0, seq, &m.payload) {
            Ok((msg, _)) => msg,
            Err(e) => {
                error!(seq, error = %e, "a delayed message does not decode; dropping it");
                let _ = m.ack_with(AckKind::Term).await;
                continue;
            }
        };
        let Some(dest) = msg.destination() else {
            error!(seq, "a delayed message names no topic; dropping it");
            let _ = m.ack_with(AckKind::Term).await;
            continue;
        };
        let out = msg.for_destination(Arc::from(dest));
        match until(msg.deliver_at()) {
            // The server's redelivery after a nak is not precise (tens of
            // ms): ask for it back a little early, then wait here.
            Some(wait) if wait > HOLD_LOCALLY => {
                let _ = m
                    .ack_with(AckKind::Nak(Some(wait - HOLD_LOCALLY / 2)))
                    .await;
            }
            Some(wait) => held.push((m, out, tokio::time::Instant::now() + wait)),
            None => due.push((m, out)),
        }
    }
    for (m, out, at) in held {
        let inner = inner.clone();
        inner.handle.clone().spawn(async move {
            tokio::time::sleep_until(at).await;
            store_and_ack(&inner, vec![(m, out)]).await;
        });
    }
    store_and_ack(inner, due).await;
}

async fn store_and_ack(inner: &Inner, due: Vec<(jetstream::Message, Message)>) {
    if due.is_empty() {
        return;
    }
    let (acks, out): (Vec<_>, Vec<_>) = due.into_iter().unzip();
    match inner.store_in_topic(out, ALL_GROUPS).await {
        Ok(_) => {
            for m in acks {
                let _ = m.ack().await;
            }
        }
        Err(e) => {
            warn!(error = %e, "could not forward due delayed messages; retrying");
            for m in acks {
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        }
    }
}

async fn read_checks(inner: &Inner, seq: u64) -> u32 {
    let Ok(stream) = inner.stream(HALF_CHECKS_STREAM).await else {
        return 0;
    };
    match stream
        .get_last_raw_message_by_subject(&half_checks_subject(seq))
        .await
    {
        Ok(m) => std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Removes a resolved half message and its check count.
pub(crate) async fn resolve(inner: &Inner, seq: u64) -> Result<bool, Error> {
    let stream = inner.stream(HALF_STREAM).await?;
    let deleted = match stream.delete_message(seq).await {
        Ok(d) => d,
        Err(e) => {
            // Already gone: resolved by someone else.
            debug!(seq, error = %e, "half message already removed");
            false
        }
    };
    if let Ok(c) = inner.stream(HALF_CHECKS_STREAM).await {
        let _ = c.purge().filter(half_checks_subject(seq)).await;
    }
    Ok(deleted)
}

async fn check(inner: &Inner, m: jetstream::Message) {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    let half = match Message::decode_envelope(Arc::from(HALF_TOPIC), 0, seq, &m.payload) {
        Ok((msg, _)) => msg,
        Err(e) => {
            error!(seq, error = %e, "a half message does not decode; dropping it");
            let _ = m.ack_with(AckKind::Term).await;
            return;
        }
    };
    if let Some(wait) = until(half.deliver_at()) {
        let _ = m.ack_with(AckKind::Nak(Some(wait))).await;
        return;
    }
    let Some(topic) = half.destination().map(str::to_string) else {
        let _ = m.ack_with(AckKind::Term).await;
        return;
    };
    let Some((checker, cfg)) = inner.checkers.get(&topic) else {
        let _ = m.ack_with(AckKind::Nak(Some(NO_CHECKER_RETRY))).await;
        return;
    };
    let checks = read_checks(inner, seq).await;
    let msg = half.for_destination(Arc::from(topic.as_str()));
    if checks >= cfg.max_checks {
        warn!(topic = %topic, msg_id = %msg.id(), checks,
            "transaction still unknown after the last check; rolling it back");
        let _ = resolve(inner, seq).await;
        let _ = m.ack_with(AckKind::Term).await;
        return;
    }
    let outcome = checker.check(&msg).await;
    match outcome {
        TransactionOutcome::Commit => match inner.store_in_topic(vec![msg], ALL_GROUPS).await {
            Ok(_) => {
                let _ = resolve(inner, seq).await;
                let _ = m.ack().await;
            }
            Err(e) => {
                warn!(error = %e, "could not commit a checked transaction; checking again");
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        },
        TransactionOutcome::Rollback => {
            info!(topic = %topic, msg_id = %msg.id(), "transaction rolled back by its checker");
            let _ = resolve(inner, seq).await;
            let _ = m.ack().await;
        }
        TransactionOutcome::Unknown => {
            let counted = inner
                .publish_raw(vec![(
                    half_checks_subject(seq),
                    Bytes::from((checks + 1).to_string()),
                    format!("check-{seq}-{}", checks + 1),
                )])
                .await;
            if let Err(e) = counted {
                warn!(error = %e, "could not record a transaction check");
            }
            let _ = m
                .ack_with(AckKind::Nak(Some(
                    cfg.check_interval.max(Duration::from_millis(1)),
                )))
                .await;
        }
    }
}
