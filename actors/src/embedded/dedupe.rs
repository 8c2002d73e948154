//! Idempotent publish on the embedded store (`Publish::dedupe_key`): each
//! topic's live keys in memory ([`Keys`], in the topic registry), the
//! store's entries beside each message's record (written in the same
//! batch, see `weirmq_persistence`'s `store/dedupe.rs`) so a restart
//! loads them back.
//!
//! The window of a key opens at its first publish's birth time (the bus's
//! clock when the publish was admitted) and closes one window later, to the
//! millisecond; duplicates neither store anything nor move it. A publish
//! racing the first with the same key waits for the first's receipt; if the
//! first fails, the waiter publishes itself.

use std::collections::HashMap;

use tokio::sync::oneshot;
use weirmq_bus::SendReceipt;

/// What a key is doing now.
#[derive(Debug)]
enum Slot {
    /// Its first publish is on its way; these wait for its receipt (`None`
    /// if it failed).
    Pending(Vec<oneshot::Sender<Option<SendReceipt>>>),
    /// Stored: its receipt until `until_ms` (Unix ms, exclusive).
    Stored { receipt: SendReceipt, until_ms: u64 },
}

/// The answer to a publish with a key.
#[derive(Debug)]
pub(super) enum Claim {
    /// Nobody holds the key: publish, then say [`Keys::stored`] or
    /// [`Keys::failed`].
    Fresh,
    /// A duplicate of a stored publish: its receipt.
    Duplicate(SendReceipt),
    /// A duplicate of a publish under way: its receipt comes here (`None`:
    /// it failed, publish again).
    Wait(oneshot::Receiver<Option<SendReceipt>>),
}

/// One topic's idempotency keys.
#[derive(Debug, Default)]
pub(super) struct Keys {
    slots: HashMap<String, Slot>,
    /// Keys added since closed windows were last swept out.
    added: usize,
}

/// Closed windows are swept out of memory after this many new keys (and
/// looked at one by one on every claim).
const SWEEP_EVERY: usize = 1024;

impl Keys {
    /// Claims `key` for a publish at `now_ms`.
    pub(super) fn claim(&mut self, key: &str, now_ms: u64) -> Claim {
        match self.slots.get_mut(key) {
            Some(Slot::Stored { receipt, until_ms }) if now_ms < *until_ms => {
                Claim::Duplicate(*receipt)
            }
            Some(Slot::Pending(waiters)) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Claim::Wait(rx)
            }
            _ => {
                self.added += 1;
                if self.added >= SWEEP_EVERY {
                    self.added = 0;
                    self.slots.retain(|_, s| match s {
                        Slot::Stored { until_ms, .. } => now_ms < *until_ms,
                        Slot::Pending(_) => true,
                    });
                }
                self.slots
                    .insert(key.to_string(), Slot::Pending(Vec::new()));
                Claim::Fresh
            }
        }
    }

    /// The claimed publish of `key` was stored: duplicates get `receipt`
    /// until `until_ms`.
    pub(super) fn stored(&mut self, key: &str, receipt: SendReceipt, until_ms: u64) {
        let old = self
            .slots
            .insert(key.to_string(), Slot::Stored { receipt, until_ms });
        if let Some(Slot::Pending(waiters)) = old {
            for w in waiters {
                let _ = w.send(Some(receipt));
            }
        }
    }

    /// The claimed publish of `key` failed (or was dropped): the key is
    /// free again, and whoever waited publishes itself.
    pub(super) fn failed(&mut self, key: &str) {
        if matches!(self.slots.get(key), Some(Slot::Pending(_))) {
            if let Some(Slot::Pending(waiters)) = self.slots.remove(key) {
                for w in waiters {
                    let _ = w.send(None);
                }
            }
        }
    }

    /// A key found in the store at open.
    pub(super) fn load(&mut self, key: String, receipt: SendReceipt, until_ms: u64) {
        self.slots.insert(key, Slot::Stored { receipt, until_ms });
    }

    /// Keys held (stored or under way), closed windows not yet swept
    /// included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weirmq_bus::MessageId;

    fn receipt(offset: u64) -> SendReceipt {
        SendReceipt {
            message_id: MessageId::generate(),
            queue: 1,
            offset,
            deliver_at: None,
        }
    }

    #[test]
    fn a_window_is_half_open_and_duplicates_do_not_move_it() {
        let mut k = Keys::default();
        assert!(matches!(k.claim("a", 1_000), Claim::Fresh));
        let r = receipt(5);
        k.stored("a", r, 3_000);
        assert!(matches!(k.claim("a", 1_000), Claim::Duplicate(x) if x == r));
        assert!(matches!(k.claim("a", 2_999), Claim::Duplicate(x) if x == r));
        assert!(matches!(k.claim("a", 3_000), Claim::Fresh));
    }

    #[test]
    fn a_racing_duplicate_waits_and_a_failure_frees_the_key() {
        let mut k = Keys::default();
        assert!(matches!(k.claim("a", 0), Claim::Fresh));
        let Claim::Wait(mut first) = k.claim("a", 0) else {
            panic!("expected to wait")
        };
        k.failed("a");
        assert_eq!(first.try_recv().unwrap(), None);
        assert!(matches!(k.claim("a", 0), Claim::Fresh));
        let Claim::Wait(mut second) = k.claim("a", 0) else {
            panic!("expected to wait")
        };
        let r = receipt(9);
        k.stored("a", r, 10);
        assert_eq!(second.try_recv().unwrap(), Some(r));
    }

    #[test]
    fn closed_windows_are_swept_out_of_memory() {
        let mut k = Keys::default();
        for i in 0..SWEEP_EVERY as u64 - 1 {
            let key = format!("k{i}");
            assert!(matches!(k.claim(&key, 0), Claim::Fresh));
            k.stored(&key, receipt(i), 100);
        }
        assert_eq!(k.len(), SWEEP_EVERY - 1);
        assert!(matches!(k.claim("late", 100), Claim::Fresh));
        assert_eq!(k.len(), 1);
    }
}
