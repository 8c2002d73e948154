//! The library mechanisms behind delayed and transactional messages on
//! JetStream (2.9 has no message schedules): a *forwarder* that moves due
//! delayed messages to their topic and a *checker* that asks transaction
//! checkers about half messages left open. Both are durable pull consumers
//! shared by every process on the server, so any live process does the
//! work; each message waits for its time as a `Nak` with that delay.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer, AckKind};
use bytes::Bytes;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use weirmq_bus::{Error, Message, TransactionOutcome, HALF_TOPIC, SCHEDULE_TOPIC};

use crate::names::*;
use crate::{nats_err, Inner, Pull};

/// How long a half message waits when no process here has a checker for
/// its topic (another process may).
const NO_CHECKER_RETRY: Duration = Duration::from_secs(5);
/// A delayed message due within this long is held by the forwarder (a
/// local timer) rather than handed back to the server.
const HOLD_LOCALLY: Duration = Duration::from_secs(1);
/// How long one fetch of the system consumers waits for messages.
const SYSTEM_FETCH_WAIT: Duration = Duration::from_secs(1);
/// The system consumers' ack wait.
const SYSTEM_ACK_WAIT: Duration = Duration::from_secs(30);
/// How late past its nak delay a delayed message may come back before the
/// watch forwards it from the stream itself.
const WATCH_GRACE: Duration = Duration::from_millis(250);
/// How often the watch looks for overdue messages.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// At most this many naked messages are watched (memory bound: ~40 bytes
/// each); beyond, a lost redelivery costs the ack wait, as without a watch.
const WATCH_MAX: usize = 200_000;

/// The forwarder's watch over the delayed messages it handed back to the
/// server (nak with a delay): stream sequence → when the server should send
/// each again.
///
/// Once in a few thousand naks under load (CI, Debian's 2.9 server) the
/// redelivery did not come, and the message waited out the consumer's whole
/// ack wait — a +2.5 s delay delivered after more than 23 s. Whatever loses
/// it (the nak, or the redelivery on its way), the watch bounds the damage:
/// a message not back [`WATCH_GRACE`] after its time is read from the
/// stream by sequence and forwarded from here. Its id is the same, so when
/// the server does send it again (or another process forwards it), the
/// topic stream's duplicate window drops the second copy. Only naks shorter
/// than the ack wait are watched: a longer one that is lost comes back after
/// the ack wait, still before it is due, and is naked again.
#[derive(Default)]
pub(crate) struct Watch(std::sync::Mutex<HashMap<u64, tokio::time::Instant>>);

impl Watch {
    fn expect(&self, seq: u64, at: tokio::time::Instant) {
        let mut w = self.0.lock().unwrap();
        if w.len() < WATCH_MAX || w.contains_key(&seq) {
            w.insert(seq, at);
        }
    }

    fn seen(&self, seq: u64) {
        let mut w = self.0.lock().unwrap();
        if !w.is_empty() {
            w.remove(&seq);
        }
    }

    /// Removes and returns the messages due back before `by`.
    fn overdue(&self, by: tokio::time::Instant) -> Vec<u64> {
        let mut w = self.0.lock().unwrap();
        let late: Vec<u64> = w
            .iter()
            .filter(|(_, at)| **at < by)
            .map(|(s, _)| *s)
            .collect();
        for s in &late {
            w.remove(s);
        }
        late
    }
}

/// Spawns the forwarder, the checker and the watch on the NATS runtime.
/// Each gets its stop receiver here, before it runs: a shutdown at any
/// moment after this reaches them.
pub(crate) fn start(inner: Arc<Inner>) -> Vec<tokio::task::JoinHandle<()>> {
    let h = inner.handle.clone();
    let stop = || inner.stop.subscribe();
    vec![
        h.spawn(run_loop(
            inner.clone(),
            stop(),
            SCHEDULE_STREAM,
            "forwarder",
            Kind::Forward,
        )),
        h.spawn(run_loop(
            inner.clone(),
            stop(),
            HALF_STREAM,
            "checker",
            Kind::Check,
        )),
        h.spawn(watch_loop(inner.clone(), stop())),
    ]
}

/// Forwards, from the stream, the naked delayed messages the server has not
/// sent back in time (see [`Watch`]).
async fn watch_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let _ = tokio::time::timeout(WATCH_EVERY, stop.changed()).await;
        let late = inner
            .watch
            .overdue(tokio::time::Instant::now() - WATCH_GRACE);
        if late.is_empty() {
            continue;
        }
        let stream = match inner.stream(SCHEDULE_STREAM).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot read overdue delayed messages; the server redelivers them after its ack wait");
                continue;
            }
        };
        for seq in late {
            let raw = match stream.get_raw_message(seq).await {
                Ok(raw) => raw,
                // Gone (forwarded and removed by the stream's limits).
                Err(e) => {
                    debug!(seq, error = %e, "an overdue delayed message is no longer in the stream");
                    continue;
                }
            };
            let msg = match crate::wire::decode_stored(Arc::from(SCHEDULE_TOPIC), 0, &raw) {
                Ok(m) => m,
                Err(e) => {
                    debug!(seq, error = %e, "an overdue delayed message does not decode");
                    continue;
                }
            };
            let Some(dest) = msg.destination() else {
                continue;
            };
            warn!(seq, id = %msg.id(), "the server did not send a delayed message back in time; forwarding it from the stream");
            let out = msg.for_destination(Arc::from(dest));
            let wait = until(msg.deliver_at()).unwrap_or_default();
            let inner = inner.clone();
            inner.handle.clone().spawn(async move {
                tokio::time::sleep(wait).await;
                if let Err(e) = inner.store_in_topic(vec![out], ALL_GROUPS).await {
                    warn!(seq, error = %e, "could not forward an overdue delayed message; the server redelivers it after its ack wait");
                }
            });
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Forward,
    Check,
}

async fn run_loop(
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
    stream_name: &'static str,
    durable: &'static str,
    kind: Kind,
) {
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
        let asked = tokio::time::Instant::now();
        let batch = c
            .batch()
            .max_messages(256)
            .expires(SYSTEM_FETCH_WAIT)
            .messages()
            .await;
        let mut msgs = match batch {
            Ok(m) => Pull::new(m, asked, SYSTEM_FETCH_WAIT),
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
                    next = msgs.ready();
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
        // A late message of a request given up on is handled as if it had
        // come in time (the forwarder's holds and naks, the checker's check).
        let late_inner = inner.clone();
        msgs.salvage(&inner.handle, move |m| {
            let inner = late_inner.clone();
            async move {
                match kind {
                    Kind::Forward => forward(&inner, vec![m]).await,
                    Kind::Check => check(&inner, m).await,
                }
            }
        });
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
        ack_wait: SYSTEM_ACK_WAIT,
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
        inner.watch.seen(seq);
        let msg = match crate::wire::decode_fetched(Arc::from(SCHEDULE_TOPIC), 0, seq, &m) {
            Ok(msg) => msg,
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
                let back = wait - HOLD_LOCALLY / 2;
                debug!(seq, id = %out.id(), ?wait, "delayed message not due: back to the server");
                if back < SYSTEM_ACK_WAIT {
                    inner.watch.expect(seq, tokio::time::Instant::now() + back);
                }
                if let Err(e) = m.ack_with(AckKind::Nak(Some(back))).await {
                    warn!(seq, error = %e, "could not hand a delayed message back; it returns after the ack wait");
                }
            }
            Some(wait) => {
                debug!(seq, id = %out.id(), ?wait, "delayed message held here until due");
                held.push((m, out, tokio::time::Instant::now() + wait))
            }
            None => {
                debug!(seq, id = %out.id(), "delayed message due");
                due.push((m, out))
            }
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
    let half = match crate::wire::decode_fetched(Arc::from(HALF_TOPIC), 0, seq, &m) {
        Ok(msg) => msg,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_returns_only_what_is_overdue_and_not_seen() {
        let w = Watch::default();
        let now = tokio::time::Instant::now();
        w.expect(1, now);
        w.expect(2, now + Duration::from_secs(10));
        w.expect(3, now);
        w.seen(3);
        assert_eq!(w.overdue(now + Duration::from_millis(1)), vec![1]);
        // Returned once: the watch forgets what it hands out.
        assert!(w.overdue(now + Duration::from_millis(1)).is_empty());
        assert_eq!(w.overdue(now + Duration::from_secs(11)), vec![2]);
    }
}
