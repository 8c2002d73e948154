//! Fail-stop: the store as the persistence actor holds it.
//!
//! A write or sync that fails stops the store's writes for good: every later
//! write is refused with that first failure (marked with the data directory
//! and the time, so it reaches users as `Error::StoreFailed`), so a queue
//! log never gets a hole a later commit would paper over. Shutdown closes a
//! stopped store without another write. Every path of the actor asks
//! [`FailStop::writable`] before it writes.

use super::*;

/// The store, the failure that stopped it (if any), or neither once closed.
pub(super) struct FailStop {
    store: Option<Store>,
    failed: Option<StorageError>,
}

/// The refusal of a store that was shut down.
pub(super) fn closed() -> StorageError {
    StorageError::msg("the store is closed (the bus was shut down)")
}

impl FailStop {
    pub(super) fn new(store: Store) -> Self {
        FailStop {
            store: Some(store),
            failed: None,
        }
    }

    /// The store to read plans from: there until shutdown, also after a
    /// failure.
    pub(super) fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Whether the store is still there (not shut down).
    pub(super) fn is_open(&self) -> bool {
        self.store.is_some()
    }

    /// Whether writes are still accepted (open, and no failure).
    pub(super) fn is_writable(&self) -> bool {
        self.store.is_some() && self.failed.is_none()
    }

    /// The failure that stopped the store, if one did.
    pub(super) fn failure(&self) -> Option<&StorageError> {
        self.failed.as_ref()
    }

    /// The store to write to, or why not: the failure that stopped it, or
    /// that it is closed.
    pub(super) fn writable(&mut self) -> Result<&mut Store, StorageError> {
        match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err(closed()),
            (None, Some(store)) => Ok(store),
        }
    }

    /// Why a write must be refused now, if it must.
    pub(super) fn refusal(&self) -> Option<StorageError> {
        match (&self.failed, &self.store) {
            (Some(e), _) => Some(e.clone()),
            (None, None) => Some(closed()),
            (None, Some(_)) => None,
        }
    }

    /// Stops the store's writes after `e` (the first failure wins); returns
    /// the failure every waiter and later write gets.
    pub(super) fn trip(&mut self, e: StorageError) -> StorageError {
        if let Some(f) = &self.failed {
            return f.clone();
        }
        let e = self.located(e).stopping(std::time::SystemTime::now());
        error!(error = %e, "store write failed; refusing further writes until the bus is reopened");
        self.failed = Some(e.clone());
        e
    }

    /// `e` with the data directory named.
    pub(super) fn located(&self, e: StorageError) -> StorageError {
        e.in_dir(self.store.as_ref().and_then(Store::dir))
    }

    /// Closes the store: a running one is synced and its queue ends
    /// recorded (when `durable`); a stopped one is closed as it is, and
    /// answers `Ok` — what it had stored before the failure is on disk, and
    /// reopening the bus is the way back.
    pub(super) fn close(&mut self, durable: bool) -> Result<(), StorageError> {
        let result = match (&self.failed, self.store.as_mut()) {
            (Some(e), _) => {
                warn!(error = %e, "closing a store that had stopped after a failure");
                Ok(())
            }
            (None, Some(store)) if durable => store.sync().and_then(|()| store.record_ends()),
            _ => Ok(()),
        };
        let result = result.map_err(|e| self.located(e));
        self.store = None;
        result
    }
}
