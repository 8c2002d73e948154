//! The `app-state` tree: the application's own keys (the local outbox),
//! written in one transaction with their message's record (sled's, or
//! both maps locked in memory).

use super::*;

impl Store {
    /// Writes a commit's log records together with the application's state
    /// writes in one sled transaction; then their index summaries.
    pub(crate) fn write_with_state(
        &mut self,
        log: crate::kv::Batch,
        ops: &[weirmq_bus::StateOp],
        index: Option<crate::kv::Batch>,
    ) -> Result<(), StorageError> {
        use sled::transaction::TransactionError;
        let ops: Vec<(&[u8], Option<&[u8]>)> = ops
            .iter()
            .map(|op| match op {
                weirmq_bus::StateOp::Put { key, value } => (key.as_slice(), Some(value.as_slice())),
                weirmq_bus::StateOp::Delete { key } => (key.as_slice(), None),
            })
            .collect();
        let r = self.log.apply_with(log, &self.state, &ops);
        r.map_err(|e| match e {
            TransactionError::Storage(e) => {
                failure::sled_error("writing a message with application state", e)
            }
            TransactionError::Abort(()) => StorageError::msg("an outbox transaction was aborted"),
        })?;
        if let Some(i) = index {
            self.index
                .apply_batch(i)
                .map_err(failure::sled("writing the index"))?;
        }
        Ok(())
    }
}

impl StoreReader {
    /// One key of the application's state.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.located(|| {
            Ok(self
                .state
                .get(key)
                .map_err(failure::sled("reading application state"))?
                .map(|v| v.to_vec()))
        })
    }

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, StorageError> {
        self.located(|| {
            self.state
                .scan_prefix(prefix)
                .map(|kv| {
                    kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(failure::sled("reading application state"))
                })
                .collect()
        })
    }
}
