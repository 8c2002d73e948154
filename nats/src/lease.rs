//! Queue ownership for FIFO subscriptions: a lease per (group, queue) held
//! by one process at a time, and the group's live members, over which its
//! queues are spread.
//!
//! The lease is the last message on subject `wqlease.<group>.<queue>` of
//! stream `WQ_SYS_LEASES` (one message per subject): `<owner> <expires ms>`.
//! Taking or renewing it is a publish conditional on the subject's last
//! sequence (`Nats-Expected-Last-Subject-Sequence`), so two processes
//! cannot both win; an expired lease (its owner died) can be taken by
//! anyone. This is the KV-bucket pattern built on a plain stream, because
//! `create_key_value` fails on 2.9 and per-entry TTLs are ignored there
//! (../shared/NATS-2.9.md): expiry is the time written in the value.
//!
//! Members: each FIFO subscription writes a heartbeat, `<expires ms>`, on
//! `wqlease.<group>.m.<owner>` of the same stream every
//! [`MEMBER_HEARTBEAT`]; the live members are those whose heartbeat has not
//! expired ([`MEMBER_TTL`]). Queue `q` belongs to the `q % n`-th of the `n`
//! live members in name order ([`assigned`]). The assignment only says who
//! should hold a lease; the lease alone decides who does, so two processes
//! that briefly disagree about the members never both fetch a queue.

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

    /// Whether this process holds the lease (as of its last write).
    pub(crate) fn is_held(&self) -> bool {
        self.held.is_some()
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

/// How long a member's heartbeat keeps it live: shorter than any lease (the
/// ack wait plus 2 s, at least 3 s), so a dead process has left the
/// members by the time its leases expire.
pub(crate) const MEMBER_TTL: Duration = Duration::from_millis(3000);
/// How often a member writes its heartbeat and reads the others'.
pub(crate) const MEMBER_HEARTBEAT: Duration = Duration::from_millis(1000);

/// One FIFO subscription's membership in its consumer group.
pub(crate) struct Membership {
    js: jetstream::Context,
    /// `wqlease.<group>.m`
    prefix: String,
    owner: String,
}

impl Membership {
    pub(crate) fn new(js: jetstream::Context, group: &str, owner: String) -> Membership {
        Membership {
            js,
            prefix: format!("wqlease.{}.m", enc(group)),
            owner,
        }
    }

    fn subject(&self) -> String {
        format!("{}.{}", self.prefix, self.owner)
    }

    /// Writes this member's heartbeat.
    pub(crate) async fn heartbeat(&self) -> bool {
        let expires = now_ms() + MEMBER_TTL.as_millis() as u64;
        match self
            .js
            .publish(self.subject(), Bytes::from(expires.to_string()))
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(e) => {
                debug!(error = %e, "member heartbeat not sent");
                false
            }
        }
    }

    /// The live members' names, sorted, this one always among them; `None`
    /// when the server could not be asked. Expired heartbeats (members that
    /// died) are removed on the way.
    pub(crate) async fn live(&self) -> Option<Vec<String>> {
        use futures::TryStreamExt;
        let stream = self.js.get_stream(LEASE_STREAM).await.ok()?;
        let subjects: Vec<(String, usize)> = stream
            .info_with_subjects(format!("{}.*", self.prefix))
            .await
            .ok()?
            .try_collect()
            .await
            .ok()?;
        let now = now_ms();
        let mut live = vec![self.owner.clone()];
        let prefix = format!("{}.", self.prefix);
        for (subject, _) in subjects {
            let Some(owner) = subject.strip_prefix(&prefix) else {
                continue;
            };
            if owner == self.owner {
                continue;
            }
            let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await else {
                continue;
            };
            let expires: u64 = std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if expires > now {
                live.push(owner.to_string());
            } else {
                // Its owner died (or stopped): forget it.
                let _ = stream.purge().filter(subject.clone()).await;
            }
        }
        live.sort();
        Some(live)
    }

    /// Leaves the group (clean stop): the others rebalance at once rather
    /// than after the heartbeat expires.
    pub(crate) async fn leave(&self) {
        if let Ok(stream) = self.js.get_stream(LEASE_STREAM).await {
            let _ = stream.purge().filter(self.subject()).await;
        }
    }

    /// This member's name.
    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }
}

/// Whether queue `queue` belongs to `me` among the sorted live `members`.
pub(crate) fn assigned(members: &[String], me: &str, queue: u32) -> bool {
    match members.iter().position(|m| m == me) {
        Some(i) => queue as usize % members.len() == i,
        // Not (yet) seen among the members: compete for every queue.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::assigned;

    #[test]
    fn queues_are_spread_round_robin_over_the_sorted_members() {
        let m: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let owners: Vec<Vec<u32>> = m
            .iter()
            .map(|me| (0..8).filter(|q| assigned(&m, me, *q)).collect())
            .collect();
        assert_eq!(owners, vec![vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
        // A member alone owns everything; one not listed competes for all.
        assert!((0..4).all(|q| assigned(&m[..1], "a", q)));
        assert!((0..4).all(|q| assigned(&m, "z", q)));
    }
}
