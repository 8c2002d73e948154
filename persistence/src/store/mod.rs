//! The sled store: its handles, the named commit batch, the real sync; one
//! child module per tree (see the crate docs).
//!
//! [`Store`] is owned by the [`PersistenceActor`](crate::PersistenceActor),
//! the only writer. [`StoreReader`]s share the same trees for range reads
//! from other threads (sled is safe for concurrent readers); a reader only
//! reads offsets that a commit has already reported, so it never sees a
//! half-written batch.
//!
//! A corrupt, foreign or locked directory is refused at [`Store::open`] with
//! [`Error::DataDir`]; nothing in it is modified in that case.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use weirmq_bus::{Error, Message, MessageId, Retention, StorageError, TraceEvent};

use crate::data_dir::{self, DirState};
use crate::disk::{DiskGuard, DiskPolicy};
use crate::failure;
use crate::index::{
    decode_trace, encode_trace, Probe, Summary, SummaryBuilder, SPAN_BYTES, SPAN_MESSAGES,
    SPAN_MILLIS,
};

mod app_state;
mod dedupe;
mod delays;
mod log;
mod offsets;
mod open;
mod retention;
mod spans;
mod topics;
mod trace;

#[cfg(test)]
mod tests;

pub use dedupe::DedupeEntry;
use log::{decode_record, offset_of, record_count};
pub(crate) use log::{ClosedRecord, RecordBuilder};
pub(crate) use offsets::offsets_batch;
pub use offsets::OffsetState;
pub use open::{RecoveredTopic, Recovery};
use spans::Span;
pub use topics::TopicSettings;
use topics::{decode_topic, start_of};
pub use trace::TraceRecord;

const FORMAT_KEY: &[u8] = b"format";

const FORMAT: &[u8] = b"weirmq-store-v1";

const TOPIC_PREFIX: &[u8] = b"topic/";

/// `start/` · topic id · queue → the queue's first kept offset (written by
/// retention and purges; the queue's end never falls below it).
const START_PREFIX: &[u8] = b"start/";

/// How long a locked data directory is waited for before it is refused.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A step of a sync, reported to the [`SyncHook`] as it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    /// sled's `flush()` returned (its buffers are written, not yet synced).
    Flush,
    /// The main data file was fdatasync'd.
    DataSync(PathBuf),
    /// A blob file (an item too large for sled's log) was fdatasync'd.
    BlobSync(PathBuf),
    /// A directory was fsync'd (new blob files are durable by name).
    DirSync(PathBuf),
}

/// Called on the persistence thread after each sync step, before any
/// publisher waiting on the commit is answered. For tests and audits; keep it
/// cheap.
pub type SyncHook = Arc<dyn Fn(&SyncEvent) + Send + Sync>;

/// How to open the store.
#[derive(Clone, Default)]
pub struct StoreConfig {
    /// The data directory; `None` for a temporary in-memory store (same
    /// semantics, no durability).
    pub path: Option<PathBuf>,
    /// sled's page cache size in bytes (0 = sled's default).
    pub cache_capacity: u64,
    /// Observes every sync step.
    pub sync_hook: Option<SyncHook>,
    /// How often retention passes run (`None`: every 60 s).
    pub retention_interval: Option<std::time::Duration>,
    /// How much free space the store keeps on its filesystem (see
    /// [`DiskGuard`]).
    pub disk: DiskPolicy,
    /// In memory (`path: None`): the most bytes the store may hold
    /// (`None`: [`DEFAULT_MEMORY_BUDGET`]; see [`DiskGuard`]).
    pub memory_budget: Option<u64>,
    /// The time retention reads and the persistence actor's timers wait on
    /// (the system clock unless a test kit gives a manual one).
    pub clock: weirmq_bus::Clock,
}

/// An in-memory store's default budget: 1 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field("cache_capacity", &self.cache_capacity)
            .field("sync_hook", &self.sync_hook.is_some())
            .field("retention_interval", &self.retention_interval)
            .field("disk", &self.disk)
            .field("memory_budget", &self.memory_budget)
            .field("clock", &self.clock)
            .finish()
    }
}

/// One queue of one topic, as the store names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    /// The topic's id in this store.
    pub topic_id: u32,
    /// The queue.
    pub queue: u32,
}

impl QueueKey {
    fn log_key(self, offset: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..4].copy_from_slice(&self.topic_id.to_be_bytes());
        k[4..8].copy_from_slice(&self.queue.to_be_bytes());
        k[8..].copy_from_slice(&offset.to_be_bytes());
        k
    }

    fn trace_key(self, offset: u64, seq: u64) -> [u8; 24] {
        let mut k = [0u8; 24];
        k[..16].copy_from_slice(&self.log_key(offset));
        k[16..].copy_from_slice(&seq.to_be_bytes());
        k
    }

    fn start_key(self) -> Vec<u8> {
        let mut k = START_PREFIX.to_vec();
        k.extend_from_slice(&self.log_key(0)[..8]);
        k
    }
}

/// One commit's writes, one batch per tree (`None`: that tree is not
/// touched); [`Store::write`] applies them in a crash-safe order.
#[derive(Default)]
pub(crate) struct CommitWrites {
    /// Records of the queue logs.
    pub(crate) log: crate::kv::Batch,
    /// Their span summaries.
    pub(crate) index: Option<crate::kv::Batch>,
    /// Trace events.
    pub(crate) trace: Option<crate::kv::Batch>,
    /// Retry entries, staged messages, "resent" marks.
    pub(crate) delay: Option<crate::kv::Batch>,
    /// Consumer offsets.
    pub(crate) offsets: Option<crate::kv::Batch>,
}

impl CommitWrites {
    /// Log records only.
    pub(crate) fn log(log: crate::kv::Batch) -> Self {
        CommitWrites {
            log,
            ..CommitWrites::default()
        }
    }
}

/// The store. Owned by the persistence actor; see the module docs.
pub struct Store {
    /// sled's database (`None` in memory).
    db: Option<sled::Db>,
    guard: DiskGuard,
    log: crate::kv::Tree,
    /// The application's own state (the local outbox).
    state: crate::kv::Tree,
    index: crate::kv::Tree,
    trace: crate::kv::Tree,
    offsets: crate::kv::Tree,
    meta: crate::kv::Tree,
    delay: crate::kv::Tree,
    /// Stored bytes per queue, counted on first need (retention by size)
    /// and kept up to date by appends and removals.
    queue_bytes: HashMap<QueueKey, u64>,
    /// Each queue's newest records not summarised in the index yet.
    spans: HashMap<QueueKey, Span>,
    trace_seq: u64,
    /// Every topic's queue count and settings, by id.
    topics: BTreeMap<u32, (u32, TopicSettings)>,
    retention_interval: std::time::Duration,
    clock: weirmq_bus::Clock,
    dir: Option<PathBuf>,
    data_file: Option<File>,
    synced_blobs: HashSet<OsString>,
    hook: Option<SyncHook>,
    next_topic_id: u32,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

impl Store {
    /// A reader sharing this store's trees.
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            dir: self.dir.clone(),
            log: self.log.clone(),
            state: self.state.clone(),
            index: self.index.clone(),
            trace: self.trace.clone(),
            meta: self.meta.clone(),
            offsets: self.offsets.clone(),
            delay: self.delay.clone(),
        }
    }

    /// How often retention passes run.
    pub(crate) fn retention_interval(&self) -> std::time::Duration {
        self.retention_interval
    }

    /// The clock the store was opened with.
    pub(crate) fn clock(&self) -> &weirmq_bus::Clock {
        &self.clock
    }

    /// Applies one commit's writes, tree by tree: queue log records, the
    /// index, the trace, then delay-index changes, then consumer offsets —
    /// in that order, so a crash (sled recovers a prefix of its log) never
    /// keeps an offset past a retry entry that was lost.
    pub(crate) fn write(&mut self, w: CommitWrites) -> Result<(), StorageError> {
        let CommitWrites {
            log,
            index,
            trace,
            delay,
            offsets,
        } = w;
        self.log
            .apply_batch(log)
            .map_err(failure::sled("writing the queue log"))?;
        let rest = [
            (&self.index, index, "writing the record index"),
            (&self.trace, trace, "writing the trace"),
            (&self.delay, delay, "writing the delay index"),
            (&self.offsets, offsets, "writing consumer offsets"),
        ];
        for (tree, batch, what) in rest {
            if let Some(b) = batch {
                tree.apply_batch(b).map_err(failure::sled(what))?;
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable: sled `flush()`, then
    /// `fdatasync` of the data file and of new blob files, then `fsync` of
    /// the blob directory if it gained files.
    /// The store's size on disk, if sled can tell.
    pub(crate) fn size_on_disk(&self) -> Option<u64> {
        self.db.as_ref()?.size_on_disk().ok()
    }

    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        let Some(db) = &self.db else {
            // In memory: nothing to make durable.
            return Ok(());
        };
        db.flush().map_err(failure::sled("flushing the store"))?;
        self.report(SyncEvent::Flush);
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        if let Some(f) = &self.data_file {
            f.sync_data()
                .map_err(failure::io("syncing the data file (fdatasync)"))?;
            self.report(SyncEvent::DataSync(dir.join("db")));
        }
        let blobs = dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failure::io("listing the store's blob directory")(e)),
        };
        let mut present = HashSet::new();
        let mut new_files = false;
        for entry in entries {
            let entry = entry.map_err(failure::io("listing the store's blob directory"))?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                let path = entry.path();
                match File::open(&path) {
                    Ok(f) => {
                        f.sync_data()
                            .map_err(failure::io("syncing a blob file (fdatasync)"))?;
                        self.report(SyncEvent::BlobSync(path));
                        new_files = true;
                    }
                    // sled removed it (garbage-collected) meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(failure::io("opening a blob file to sync it")(e)),
                }
            }
            present.insert(name);
        }
        self.synced_blobs = present;
        if new_files {
            File::open(&blobs)
                .and_then(|d| d.sync_all())
                .map_err(failure::io("syncing the blob directory (fsync)"))?;
            self.report(SyncEvent::DirSync(blobs));
        }
        Ok(())
    }

    /// Every queue of every topic, for a pressure pass.
    pub(crate) fn all_queues(&self) -> Vec<QueueKey> {
        self.topics
            .iter()
            .flat_map(|(&topic_id, &(queues, _))| {
                (0..weirmq_bus::queues_with_lanes(queues))
                    .map(move |queue| QueueKey { topic_id, queue })
            })
            .collect()
    }

    /// The store's disk guard (shared with the broker's admission).
    pub fn disk_guard(&self) -> DiskGuard {
        self.guard.clone()
    }

    /// The data directory (`None` in memory).
    pub(crate) fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    fn report(&self, event: SyncEvent) {
        if let Some(h) = &self.hook {
            h(&event);
        }
    }
}

/// Reads the store from any thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreReader {
    /// The data directory, named in errors.
    dir: Option<PathBuf>,
    log: crate::kv::Tree,
    state: crate::kv::Tree,
    index: crate::kv::Tree,
    trace: crate::kv::Tree,
    meta: crate::kv::Tree,
    offsets: crate::kv::Tree,
    delay: crate::kv::Tree,
}

impl StoreReader {
    /// Runs a read; its error names the data directory.
    fn located<T>(
        &self,
        read: impl FnOnce() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        read().map_err(|e| e.in_dir(self.dir.as_deref()))
    }
}

impl fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreReader")
    }
}
