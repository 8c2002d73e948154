//! The publisher role: storing messages, and the admission every backend
//! applies before it does.
//!
//! # Contract
//!
//! * [`Publisher::publish`] resolves only once every message of the batch is
//!   stored with the asked [`Durability`]; the receipts are in the order of
//!   the input. On error none of the batch is acknowledged (some may be
//!   stored: at-least-once).
//! * Unknown user topics are created with the defaults.
//! * A message whose `deliver_at` has come is published at once; a later
//!   one is invisible until then (its receipt says when).
//! * Admission comes first, and fails before anything is stored: every
//!   message is checked against the [`Limits`], then room is taken in the
//!   backend's bounded pipeline ([`Admission`]); `publish` waits for room,
//!   [`Publisher::try_publish`] answers [`Error::Busy`] at once.
//! * [`Publisher::cancel_delayed`] of a delayed message not yet due makes
//!   sure it is never delivered ([`CancelOutcome::Cancelled`], answered once
//!   that is stored); one that fell due (or was cancelled before) is left
//!   as it is ([`CancelOutcome::AlreadyDelivered`]). Never both.

use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::clock::Clock;
use crate::error::Error;
use crate::message::{Durability, OutgoingMessage, SendReceipt};
use crate::topic::Limits;

/// Storing messages.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Stores a batch (auto-creating unknown user topics with defaults) and
    /// returns one receipt per message, in order, once `durability` holds.
    ///
    /// # Errors
    ///
    /// Validation errors (nothing stored), [`Error::Closed`], or a storage
    /// error.
    async fn publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error>;

    /// As [`Publisher::publish`], but returns [`Error::Busy`] at once,
    /// storing nothing, when the backend would have to wait for room.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`], or as [`Publisher::publish`].
    async fn try_publish(
        &self,
        messages: Vec<OutgoingMessage>,
        durability: Durability,
    ) -> Result<Vec<SendReceipt>, Error>;

    /// Recalls the delayed message `receipt` names, if it is not due yet.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a receipt that is not a delayed
    /// message's ([`delayed_receipt`]), [`Error::Closed`], or a storage
    /// error.
    async fn cancel_delayed(&self, receipt: &SendReceipt) -> Result<CancelOutcome, Error>;
}

/// What [`Publisher::cancel_delayed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was not due yet: it is removed and will never be delivered.
    Cancelled,
    /// Too late: it fell due and is in its topic (delivered, or about to
    /// be), or it was cancelled before. Nothing changed.
    AlreadyDelivered,
}

/// The delivery time of the delayed message `receipt` names.
///
/// # Errors
///
/// [`Error::InvalidConfig`] if it is not a delayed message's receipt (one
/// without `deliver_at`: a plain message, or a delay that had come by the
/// time it was published).
pub fn delayed_receipt(receipt: &SendReceipt) -> Result<std::time::SystemTime, Error> {
    receipt.deliver_at.ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "message {} was not published as a delayed message (its receipt has no \
             deliver_at): there is nothing to cancel",
            receipt.message_id
        ),
    })
}

/// Publish admission, the same on every backend: the limits check, and a
/// bound on the messages waiting to be stored (`max_pending_messages`).
///
/// The messages waiting, summed over the process's buses, are the gauge
/// `weirmq.publish.pending`
/// ([`metrics::PENDING_PUBLISHES`](crate::metrics::PENDING_PUBLISHES)),
/// sampled once a second ([`pending_publishes`]): counting each publish in
/// and out of a shared gauge cost two contended atomic updates per publish.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    pending: Arc<Semaphore>,
    max_pending: usize,
    clock: Clock,
}

/// Room for messages in the publish pipeline; given back when dropped.
#[derive(Debug)]
pub struct AdmissionPermit {
    _permit: OwnedSemaphorePermit,
}

/// Every live admission of the process: its pipeline and bound.
static LIVE: Mutex<Vec<(Weak<Semaphore>, usize)>> = Mutex::new(Vec::new());

/// Published messages waiting to be stored, summed over every bus of the
/// process (what the gauge `weirmq.publish.pending` shows).
pub fn pending_publishes() -> usize {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|(w, _)| w.strong_count() > 0);
    live.iter()
        .filter_map(|(w, max)| {
            w.upgrade()
                .map(|s| max.saturating_sub(s.available_permits()))
        })
        .sum()
}

impl Admission {
    /// Admission with these limits and at most `max_pending` messages
    /// waiting to be stored (at least 1).
    pub fn new(limits: Limits, max_pending: usize) -> Self {
        let max_pending = max_pending.max(1);
        let pending = Arc::new(Semaphore::new(max_pending));
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Arc::downgrade(&pending), max_pending));
        Admission {
            limits,
            pending,
            max_pending,
            clock: Clock::system(),
        }
    }

    /// Measures delays (and stamps births, through the broker) by `clock`
    /// instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The clock publishes are measured by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Checks one message against the limits at the clock's now, and
    /// makes a relative delay absolute (no due-now clearing: for a
    /// publish path that refuses delays, like a transaction's half). A
    /// dedupe key is refused here: these paths do not deduplicate.
    ///
    /// # Errors
    ///
    /// The first limit broken, as [`Limits::check`] says.
    pub fn check_one(&self, m: &mut OutgoingMessage) -> Result<(), Error> {
        if m.dedupe_key.is_some() {
            return Err(Error::Unsupported {
                feature: "a dedupe key on a transactional or outbox message (its own \
                          commit already makes it happen once)"
                    .into(),
            });
        }
        let now = self.clock.now();
        self.limits.check_at(m, now)?;
        m.resolve_delay(now);
        Ok(())
    }

    /// The limits messages are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks every message against the limits, and makes a message whose
    /// delivery time has come an ordinary one.
    ///
    /// # Errors
    ///
    /// The first message over a limit, as [`Limits::check`] says.
    pub fn check(&self, messages: &mut [OutgoingMessage]) -> Result<(), Error> {
        let now = self.clock.now();
        for m in messages.iter_mut() {
            self.limits.check_at(m, now)?;
            m.resolve_delay(now);
            if m.deliver_at.is_some_and(|t| t <= now) {
                m.deliver_at = None;
            }
        }
        Ok(())
    }

    /// Takes room for `n` messages (at least 1, at most the bound): waits
    /// for it when `wait`, else fails at once.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] (not waiting, no room), or [`Error::Closed`] once
    /// [`Admission::close`] ran.
    pub async fn admit(&self, n: usize, wait: bool) -> Result<AdmissionPermit, Error> {
        let permits = n.clamp(1, self.max_pending) as u32;
        let permit = if wait {
            self.pending
                .clone()
                .acquire_many_owned(permits)
                .await
                .map_err(|_| Error::Closed)?
        } else {
            self.pending
                .clone()
                .try_acquire_many_owned(permits)
                .map_err(|e| match e {
                    TryAcquireError::Closed => Error::Closed,
                    TryAcquireError::NoPermits => Error::Busy {
                        pending: self.max_pending - self.pending.available_permits(),
                    },
                })?
        };
        Ok(AdmissionPermit { _permit: permit })
    }

    /// Waits until no publish is in the pipeline, and keeps it empty while
    /// the returned permit lives (shutdown: answered before the store
    /// closes).
    pub async fn drain(&self) -> Option<AdmissionPermit> {
        self.pending
            .clone()
            .acquire_many_owned(self.max_pending as u32)
            .await
            .ok()
            .map(|p| AdmissionPermit { _permit: p })
    }

    /// Refuses every later admission with [`Error::Closed`].
    pub fn close(&self) {
        self.pending.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn busy_when_full_and_closed_after_close() {
        let a = Admission::new(Limits::default(), 2);
        let held = a.admit(5, true).await.unwrap();
        assert!(matches!(
            a.admit(1, false).await,
            Err(Error::Busy { pending: 2 })
        ));
        drop(held);
        a.admit(1, false).await.unwrap();
        a.close();
        assert!(matches!(a.admit(1, true).await, Err(Error::Closed)));
    }

    #[test]
    fn a_due_delay_is_cleared_and_limits_apply() {
        let a = Admission::new(Limits::default(), 8);
        let mut m = vec![OutgoingMessage::new("t", b"x".to_vec())];
        m[0].deliver_at = Some(std::time::SystemTime::now() - std::time::Duration::from_secs(1));
        a.check(&mut m).unwrap();
        assert!(m[0].deliver_at.is_none());
        let mut big = vec![OutgoingMessage::new("t", vec![0; 5 * 1024 * 1024])];
        assert!(a.check(&mut big).is_err());
    }
}
