//! Queue ownership for FIFO subscriptions: a lease per (group, queue) held
//! by one process at a time.
//!
//! The lease is the last message on subject `wqlease.<group>.<queue>` of
//! stream `WQ_SYS_LEASES` (one message per subject): `<owner> <expires ms>`.
//! Taking or renewing it is a publish conditional on the subject's last
//! sequence (`Nats-Expected-Last-Subject-Sequence`), so two processes
//! cannot both win; an expired lease (its owner died) can be taken by
//! anyone. This is the KV-bucket pattern built on a plain stream, because
//! `create_key_value` fails on 2.9 and per-entry TTLs are ignored there
//! (../shared/NATS-2.9.md): expiry is the time written in the value.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tracing::{debug, info};

use crate::names::{enc, LEASE_STREAM};
use weirmq_bus::now_ms;

pub(crate) struct Lease {
    js: jetstream::Context,
    subject: String,
    owner: String,
    ttl: Duration,
    /// The subject sequence of our last write, while we hold the lease.
    held: Option<u64>,
    renew_at: Instant,
}

impl Lease {
    pub(crate) fn new(
        js: jetstream::Context,
        group: &str,
        queue: u32,
        owner: String,
        ttl: Duration,
    ) -> Lease {
        Lease {
            js,
            subject: format!("wqlease.{}.{queue}", enc(group)),
            owner,
            ttl,
            held: None,
            renew_at: Instant::now(),
        }
    }

    /// Whether this process holds the lease now, taking or renewing it if
    /// it can. `Err` = the lease was held and has just been lost.
    pub(crate) async fn ensure(&mut self) -> Result<bool, ()> {
        if self.held.is_some() && Instant::now() < self.renew_at {
            return Ok(true);
        }
        let was_held = self.held.is_some();
        let won = self.try_take().await;
        match (was_held, won) {
            (true, false) => {
                info!(lease = %self.subject, "lost the FIFO queue's lease");
                Err(())
            }
            (false, true) => {
                info!(lease = %self.subject, "took the FIFO queue's lease");
                Ok(true)
            }
            (_, won) => Ok(won),
        }
    }

    async fn try_take(&mut self) -> bool {
        let Ok(stream) = self.js.get_stream(LEASE_STREAM).await else {
            self.held = None;
            return false;
        };
        let last = match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) => {
                let text = String::from_utf8_lossy(&m.payload).to_string();
                let mut parts = text.split(' ');
                let owner = parts.next().unwrap_or_default().to_string();
                let expires: u64 = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
                if owner != self.owner && expires > now_ms() {
                    self.held = None;
                    return false;
                }
                m.sequence
            }
            Err(_) => 0,
        };
        let expires = now_ms() + self.ttl.as_millis() as u64;
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(format!("{} {expires}", self.owner)))
            .expected_last_subject_sequence(last);
        let ack = match self.js.send_publish(self.subject.clone(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => {
                debug!(error = %e, "lease publish failed");
                self.held = None;
                return false;
            }
        };
        match ack {
            Ok(a) => {
                self.held = Some(a.sequence);
                self.renew_at = Instant::now() + self.ttl / 3;
                true
            }
            Err(e) => {
                debug!(error = %e, "lease taken by another process");
                self.held = None;
                false
            }
        }
    }

    /// Gives the lease up (clean stop), so another process takes the queue
    /// at once instead of after the ttl.
    pub(crate) async fn release(&mut self) {
        let Some(seq) = self.held.take() else {
            return;
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(format!("{} 0", self.owner)))
            .expected_last_subject_sequence(seq);
        if let Ok(ack) = self.js.send_publish(self.subject.clone(), publish).await {
            let _ = ack.await;
        }
    }
}
