//! The sled store: layout, open and recovery, record encoding, the real sync.
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
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field("cache_capacity", &self.cache_capacity)
            .field("sync_hook", &self.sync_hook.is_some())
            .field("retention_interval", &self.retention_interval)
            .field("disk", &self.disk)
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

/// A trace event of the message at `offset` of queue `key`.
#[derive(Debug, Clone)]
pub struct TraceRecord {
    /// The message's queue.
    pub key: QueueKey,
    /// The message's offset.
    pub offset: u64,
    /// What happened.
    pub event: TraceEvent,
}

/// A topic's settings as the store keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicSettings {
    /// How long its messages are kept.
    pub retention: Retention,
    /// Whether its messages' lifecycles are traced.
    pub trace: bool,
}

/// id u32 · queues u32 · max age ms u64 (0: none) · max bytes u64 (0: none)
/// · trace u8. Stores written before retention existed hold only the first
/// eight bytes (default settings).
fn encode_topic(id: u32, queues: u32, settings: &TopicSettings) -> Vec<u8> {
    let mut v = Vec::with_capacity(25);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&queues.to_be_bytes());
    let age = settings
        .retention
        .age()
        .map_or(0, |a| (a.as_millis() as u64).max(1));
    v.extend_from_slice(&age.to_be_bytes());
    v.extend_from_slice(&settings.retention.bytes().unwrap_or(0).to_be_bytes());
    v.push(settings.trace as u8);
    v
}

fn decode_topic(name: &str, v: &[u8]) -> Result<(u32, u32, TopicSettings), StorageError> {
    let bad = || StorageError::msg(format!("metadata of topic `{name}` is corrupt"));
    let u32_at = |i: usize| -> Result<u32, StorageError> {
        Ok(u32::from_be_bytes(
            v.get(i..i + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ))
    };
    let u64_at = |i: usize| -> Result<u64, StorageError> {
        Ok(u64::from_be_bytes(
            v.get(i..i + 8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ))
    };
    let (id, queues) = (u32_at(0)?, u32_at(4)?);
    let settings = match v.len() {
        8 => TopicSettings::default(),
        25 => {
            let mut retention = Retention::forever();
            let age = u64_at(8)?;
            if age > 0 {
                retention = retention.max_age(std::time::Duration::from_millis(age));
            }
            let bytes = u64_at(16)?;
            if bytes > 0 {
                retention = retention.max_bytes(bytes);
            }
            TopicSettings {
                retention,
                trace: v[24] == 1,
            }
        }
        _ => return Err(bad()),
    };
    Ok((id, queues, settings))
}

/// A consumer group's committed position in one queue: every offset below
/// `committed` is acked, and so are those in `acked_above` (acks out of
/// order, kept so a restart does not redeliver them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetState {
    /// Every offset below this is acked.
    pub committed: u64,
    /// Acked offsets above `committed`, ascending.
    pub acked_above: Vec<u64>,
}

impl OffsetState {
    /// committed u64 · runs u32 · (first u64 · length u32) per run of
    /// consecutive acked offsets: compact however many acks are out of order.
    fn encode(&self) -> Vec<u8> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for &o in &self.acked_above {
            match runs.last_mut() {
                Some((first, len)) if *first + *len as u64 == o && *len < u32::MAX => *len += 1,
                _ => runs.push((o, 1)),
            }
        }
        let mut v = Vec::with_capacity(12 + 12 * runs.len());
        v.extend_from_slice(&self.committed.to_be_bytes());
        v.extend_from_slice(&(runs.len() as u32).to_be_bytes());
        for (first, len) in runs {
            v.extend_from_slice(&first.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
        }
        v
    }

    fn decode(b: &[u8]) -> Result<OffsetState, StorageError> {
        let bad = || StorageError::msg(format!("offset record of {} bytes is corrupt", b.len()));
        let u64_at = |i: usize| {
            b.get(i..i + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
        };
        let u32_at = |i: usize| {
            b.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_be_bytes)
        };
        let committed = u64_at(0).ok_or_else(bad)?;
        let n = u32_at(8).ok_or_else(bad)? as usize;
        if b.len() != 12 + 12 * n {
            return Err(bad());
        }
        let mut acked_above = Vec::new();
        for r in 0..n {
            let first = u64_at(12 + 12 * r).ok_or_else(bad)?;
            let len = u32_at(20 + 12 * r).ok_or_else(bad)? as u64;
            if len > (1 << 24) || first.checked_add(len).is_none() {
                return Err(bad());
            }
            acked_above.extend(first..first + len);
        }
        Ok(OffsetState {
            committed,
            acked_above,
        })
    }
}

fn offsets_key(group: &str, key: QueueKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 9);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&key.topic_id.to_be_bytes());
    k.extend_from_slice(&key.queue.to_be_bytes());
    k
}

/// A topic found in the store at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTopic {
    /// Its name.
    pub name: String,
    /// Its id in this store.
    pub id: u32,
    /// Its queue count.
    pub queues: u32,
    /// For each queue, the next offset to write.
    pub ends: Vec<u64>,
    /// Its retention and trace settings.
    pub settings: TopicSettings,
}

/// What the store holds at open.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The topics, by id.
    pub topics: Vec<RecoveredTopic>,
}

/// The store. Owned by the persistence actor; see the module docs.
pub struct Store {
    db: sled::Db,
    guard: DiskGuard,
    log: sled::Tree,
    /// The application's own state (the local outbox).
    state: sled::Tree,
    index: sled::Tree,
    trace: sled::Tree,
    offsets: sled::Tree,
    meta: sled::Tree,
    delay: sled::Tree,
    /// Stored bytes per queue, counted on first need (retention by size)
    /// and kept up to date by appends and removals.
    queue_bytes: HashMap<QueueKey, u64>,
    /// Each queue's newest records not summarised in the index yet.
    spans: HashMap<QueueKey, Span>,
    trace_seq: u64,
    /// Every topic's queue count and settings, by id.
    topics: BTreeMap<u32, (u32, TopicSettings)>,
    retention_interval: std::time::Duration,
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
    /// Opens (or creates) the store and reads what it holds.
    ///
    /// # Errors
    ///
    /// [`Error::DataDir`] if the directory is a file, not empty and not a
    /// weirmq directory, locked by another process, or corrupt; nothing in
    /// it is changed then.
    pub fn open(config: StoreConfig) -> Result<(Store, Recovery), Error> {
        let mut sled_cfg = sled::Config::new();
        if config.cache_capacity > 0 {
            sled_cfg = sled_cfg.cache_capacity(config.cache_capacity);
        }
        let (dir, state) = match &config.path {
            None => {
                sled_cfg = sled_cfg.temporary(true);
                (None, DirState::Fresh)
            }
            Some(path) => {
                let state = data_dir::inspect(path, FORMAT)?;
                if state == DirState::Fresh {
                    data_dir::begin_init(path)?;
                }
                sled_cfg = sled_cfg.path(path);
                (Some(path.clone()), state)
            }
        };
        let shown = dir.clone().unwrap_or_else(|| PathBuf::from("<in-memory>"));
        let damaged = |what: &str| {
            data_dir::refuse(
                &shown,
                format!("the store is damaged: {what}; {}", failure::DAMAGED),
            )
        };
        // sled lets go of its file lock only when its last I/O thread is done
        // with a closed database, a moment after the handle is dropped: a
        // store reopened at once by this process can find it still locked.
        // So a lock is waited on for up to LOCK_WAIT before it is refused.
        let waited = std::time::Instant::now();
        let opened = loop {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sled_cfg.open()));
            match &r {
                Ok(Err(sled::Error::Io(e)))
                    if e.to_string().contains("lock") && waited.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => break r,
            }
        };
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(data_dir::open_error(&shown, e)),
            Err(_) => return Err(damaged("sled could not read its data file `db`")),
        };
        let plain = |context: &str, e: sled::Error| {
            data_dir::refuse(&shown, failure::sled_error(context, e).to_string())
        };
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| plain(&format!("opening its tree `{name}`"), e))
        };
        let log = tree("log")?;
        let state_tree = tree("app-state")?;
        let index = tree("index")?;
        let trace = tree("trace")?;
        let offsets = tree("offsets")?;
        let meta = tree("meta")?;
        let delay = tree("delay")?;
        match meta
            .get(FORMAT_KEY)
            .map_err(|e| plain("reading its format", e))?
        {
            Some(v) if v.as_ref() == FORMAT => {
                if let (DirState::Initialising, Some(d)) = (state, &dir) {
                    data_dir::finish_init(d, FORMAT)?;
                }
            }
            Some(v) => {
                return Err(data_dir::refuse(
                    &shown,
                    format!(
                        "it holds store format `{}`, this build reads `{}`",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(FORMAT)
                    ),
                ))
            }
            None => {
                if state == DirState::Initialised {
                    return Err(damaged(
                        "sled recovered none of its data (the data file `db` is damaged or was \
                         replaced)",
                    ));
                }
                if !log.is_empty() || !offsets.is_empty() || !meta.is_empty() {
                    return Err(data_dir::refuse(
                        &shown,
                        "it is a sled database but not a weirmq store",
                    ));
                }
                meta.insert(FORMAT_KEY, FORMAT)
                    .map_err(|e| plain("writing its format", e))?;
                if let Some(d) = &dir {
                    db.flush().map_err(|e| plain("flushing it", e))?;
                    File::open(d.join("db"))
                        .and_then(|f| f.sync_all())
                        .map_err(|e| {
                            data_dir::refuse(d, format!("cannot sync its data file: {e}"))
                        })?;
                    data_dir::finish_init(d, FORMAT)?;
                }
            }
        }
        let data_file = match &dir {
            Some(d) => {
                let f = File::open(d.join("db")).map_err(|e| {
                    data_dir::refuse(d, format!("cannot open its data file `db`: {e}"))
                })?;
                // Make the files sled created durable by name.
                File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| data_dir::refuse(d, format!("cannot sync the directory: {e}")))?;
                Some(f)
            }
            None => None,
        };
        let mut store = Store {
            db,
            log,
            state: state_tree,
            index,
            trace,
            offsets,
            meta,
            delay,
            queue_bytes: HashMap::new(),
            spans: HashMap::new(),
            topics: BTreeMap::new(),
            retention_interval: config
                .retention_interval
                .unwrap_or(std::time::Duration::from_secs(60)),
            // Increasing across restarts (unless 65,536 events per ms).
            trace_seq: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64))
                << 16,
            dir,
            data_file,
            synced_blobs: HashSet::new(),
            hook: config.sync_hook,
            guard: DiskGuard::new(config.path.as_deref(), config.disk),
            next_topic_id: 0,
        };
        let recovery = store.recover().map_err(|e| {
            let e = e.with_advice(failure::DAMAGED);
            data_dir::refuse(&shown, format!("what it holds could not be read back: {e}"))
        })?;
        if let Some(d) = &store.dir {
            if let Some(recorded) = data_dir::read_ends(d)? {
                let recovered = recovery
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.ends
                            .iter()
                            .enumerate()
                            .map(|(q, e)| ((t.id, q as u32), *e))
                    })
                    .collect();
                data_dir::check_ends(d, &recorded, &recovered, |id| {
                    recovery
                        .topics
                        .iter()
                        .find(|t| t.id == id)
                        .map(|t| t.name.clone())
                })?;
            }
        }
        Ok((store, recovery))
    }

    fn recover(&mut self) -> Result<Recovery, StorageError> {
        let mut topics = Vec::new();
        for item in self.meta.scan_prefix(TOPIC_PREFIX) {
            let (k, v) = item.map_err(failure::sled("reading topic metadata"))?;
            let name = String::from_utf8(k[TOPIC_PREFIX.len()..].to_vec())
                .map_err(|_| StorageError::msg("topic name in metadata is not UTF-8"))?;
            let (id, queues, settings) = decode_topic(&name, &v)?;
            let mut ends = Vec::with_capacity(queues as usize);
            for queue in 0..queues {
                let key = QueueKey {
                    topic_id: id,
                    queue,
                };
                self.rebuild_span(key)?;
                ends.push(self.queue_end(key)?.max(start_of(&self.meta, key)?));
            }
            self.next_topic_id = self.next_topic_id.max(id + 1);
            self.topics.insert(id, (queues, settings.clone()));
            topics.push(RecoveredTopic {
                name,
                id,
                queues,
                ends,
                settings,
            });
        }
        topics.sort_by_key(|t| t.id);
        Ok(Recovery { topics })
    }

    fn queue_end(&self, key: QueueKey) -> Result<u64, StorageError> {
        let last = self
            .log
            .range(key.log_key(0)..=key.log_key(u64::MAX))
            .next_back();
        match last {
            None => Ok(0),
            Some(item) => {
                let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
                let first = offset_of(&k)?;
                let count = record_count(&v)?;
                // Decode the whole record: a torn or corrupt tail is found at open.
                let topic: Arc<str> = Arc::from("");
                decode_record(&topic, key.queue, first, &v, |_| true)?;
                Ok(first + count as u64)
            }
        }
    }

    /// Rebuilds a queue's open span from the records after its last written
    /// summary (the tail not summarised yet; for a store written before
    /// summaries existed, the whole log, written as spans as it goes).
    fn rebuild_span(&mut self, key: QueueKey) -> Result<(), StorageError> {
        let from = match self
            .index
            .range(key.log_key(0)..=key.log_key(u64::MAX))
            .next_back()
        {
            Some(item) => {
                let (k, v) = item.map_err(failure::sled("reading the index"))?;
                offset_of(&k)? + Summary::decode(&v)?.count as u64
            }
            None => 0,
        };
        // Spans are whole records: the tail starts with a record at `from`.
        let start = key.log_key(from);
        let mut index = sled::Batch::default();
        let mut written = 0usize;
        let topic: Arc<str> = Arc::from("");
        for item in self.log.range(start..=key.log_key(u64::MAX)) {
            let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
            let first = offset_of(&k)?;
            let mut sb = SummaryBuilder::default();
            for m in decode_record(&topic, key.queue, first, &v, |_| true)? {
                sb.add(&m, m.size_hint());
            }
            if let Some((span_key, summary)) = self.extend_span(key, first, sb) {
                index.insert(&span_key[..], summary);
                written += 1;
            }
        }
        if written > 0 {
            tracing::info!(?key, spans = written, "index summaries rebuilt");
            self.index
                .apply_batch(index)
                .map_err(failure::sled("writing the index"))?;
        }
        Ok(())
    }

    /// Adds a record to its queue's open span; returns a span's summary to
    /// write if one is complete: the open one when the record comes too late
    /// for it (by publish time), or the span with the record when it is full.
    fn extend_span(
        &mut self,
        key: QueueKey,
        first: u64,
        summary: SummaryBuilder,
    ) -> Option<([u8; 16], Vec<u8>)> {
        if let Some(b) = self.queue_bytes.get_mut(&key) {
            *b += summary.bytes();
        }
        let late = self.spans.get(&key).is_some_and(|s| {
            s.summary.count() > 0 && summary.max_born() >= s.summary.min_born() + SPAN_MILLIS
        });
        if late {
            let done = self.close_span(key);
            self.spans.insert(key, Span { first, summary });
            return done;
        }
        let span = self.spans.entry(key).or_insert_with(|| Span {
            first,
            summary: SummaryBuilder::default(),
        });
        if span.first + span.summary.count() as u64 != first {
            // Not contiguous (cannot happen: offsets are dense); start over.
            tracing::warn!(?key, span = span.first, first, "index span restarted");
            *span = Span {
                first,
                summary: SummaryBuilder::default(),
            };
        }
        span.summary.merge(summary);
        if span.summary.count() >= SPAN_MESSAGES || span.summary.bytes() >= SPAN_BYTES {
            self.close_span(key)
        } else {
            None
        }
    }

    /// Takes a queue's open span out as (index key, summary).
    fn close_span(&mut self, key: QueueKey) -> Option<([u8; 16], Vec<u8>)> {
        let span = self.spans.remove(&key)?;
        (span.summary.count() > 0).then(|| (key.log_key(span.first), span.summary.finish()))
    }

    /// The index batch for a commit's records: their spans' summaries, for
    /// the spans they filled.
    pub(crate) fn index_records(&mut self, records: Vec<ClosedRecord>) -> Option<sled::Batch> {
        let mut batch = None;
        for r in records {
            if let Some((k, v)) = self.extend_span(r.key, r.first, r.summary) {
                batch
                    .get_or_insert_with(sled::Batch::default)
                    .insert(&k[..], v);
            }
        }
        batch
    }

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

    /// Registers a topic; returns its id.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub(crate) fn create_topic(
        &mut self,
        name: &str,
        queues: u32,
        settings: &TopicSettings,
    ) -> Result<u32, StorageError> {
        let id = self.next_topic_id;
        self.write_topic(name, id, queues, settings)?;
        self.next_topic_id += 1;
        Ok(id)
    }

    /// Rewrites a topic's metadata (new settings).
    pub(crate) fn write_topic(
        &mut self,
        name: &str,
        id: u32,
        queues: u32,
        settings: &TopicSettings,
    ) -> Result<(), StorageError> {
        let mut key = TOPIC_PREFIX.to_vec();
        key.extend_from_slice(name.as_bytes());
        self.meta
            .insert(key, encode_topic(id, queues, settings))
            .map_err(failure::sled("writing topic metadata"))?;
        self.topics.insert(id, (queues, settings.clone()));
        Ok(())
    }

    /// How often retention passes run.
    pub(crate) fn retention_interval(&self) -> std::time::Duration {
        self.retention_interval
    }

    /// Every queue of a topic with a retention limit, with the limit.
    pub(crate) fn retention_plan(&self) -> Vec<(QueueKey, Retention)> {
        let mut out = Vec::new();
        for (&topic_id, (queues, settings)) in &self.topics {
            let r = settings.retention;
            if r.age().is_none() && r.bytes().is_none() {
                continue;
            }
            out.extend((0..*queues).map(|queue| (QueueKey { topic_id, queue }, r)));
        }
        out
    }

    /// The trace tree's batch for `events` (each gets the next sequence
    /// number, so a message's events read back in the order recorded).
    pub(crate) fn trace_batch(&mut self, events: &[TraceRecord]) -> sled::Batch {
        let mut b = sled::Batch::default();
        for e in events {
            self.trace_seq += 1;
            b.insert(
                &e.key.trace_key(e.offset, self.trace_seq)[..],
                encode_trace(&e.event),
            );
        }
        b
    }

    fn stored_bytes(&mut self, key: QueueKey) -> Result<u64, StorageError> {
        if let Some(b) = self.queue_bytes.get(&key) {
            return Ok(*b);
        }
        let mut total = self.spans.get(&key).map_or(0, |s| s.summary.bytes());
        for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (_, v) = item.map_err(failure::sled("reading the index"))?;
            total += Summary::decode(&v)?.bytes as u64;
        }
        self.queue_bytes.insert(key, total);
        Ok(total)
    }

    /// Removes up to `max_spans` of a queue's oldest spans (whole records,
    /// up to ~1,000 messages) that the retention limits expire, never one
    /// holding an offset at or above `keep_from`; records the new first
    /// offset. The queue's open span (its newest messages) is closed first
    /// when it is expired too. Returns what it removed and whether more may
    /// be due.
    pub(crate) fn expire(
        &mut self,
        key: QueueKey,
        cutoff_ms: Option<u64>,
        max_bytes: Option<u64>,
        keep_from: u64,
        max_spans: usize,
    ) -> Result<Expired, StorageError> {
        let mut total = match max_bytes {
            Some(_) => self.stored_bytes(key)?,
            None => 0,
        };
        // The newest messages are in the open span: close it if they have
        // expired (a quiet queue) or the closed spans cannot bring the queue
        // under its size limit.
        let open_expired = self.spans.get(&key).is_some_and(|s| {
            cutoff_ms.is_some_and(|c| s.summary.max_born() < c)
                || max_bytes.is_some_and(|m| total.saturating_sub(s.summary.bytes()) > m)
        });
        if open_expired {
            if let Some((k, v)) = self.close_span(key) {
                self.index
                    .insert(&k[..], v)
                    .map_err(failure::sled("writing the index"))?;
            }
        }
        let mut out = Expired::default();
        let mut log = sled::Batch::default();
        let mut index = sled::Batch::default();
        let mut trace = sled::Batch::default();
        let mut new_start = None;
        for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            if out.records >= max_spans {
                out.more = true;
                break;
            }
            let (k, v) = item.map_err(failure::sled("reading the index"))?;
            let first = offset_of(&k)?;
            let s = Summary::decode(&v)?;
            let end = first + s.count as u64;
            let old = cutoff_ms.is_some_and(|c| s.max_born < c);
            let big = max_bytes.is_some_and(|m| total > m);
            if !(old || big) || end > keep_from {
                break;
            }
            for r in self.log.range(key.log_key(first)..key.log_key(end)).keys() {
                log.remove(r.map_err(failure::sled("reading the queue log"))?);
            }
            index.remove(&k[..]);
            for t in self
                .trace
                .range(key.trace_key(first, 0)..key.trace_key(end, 0))
                .keys()
            {
                trace.remove(t.map_err(failure::sled("reading the trace"))?);
            }
            total = total.saturating_sub(s.bytes as u64);
            out.records += 1;
            out.messages += s.count as u64;
            out.bytes += s.bytes as u64;
            new_start = Some(end);
        }
        if let Some(start) = new_start {
            self.log
                .apply_batch(log)
                .map_err(failure::sled("removing expired records"))?;
            self.index
                .apply_batch(index)
                .map_err(failure::sled("removing expired summaries"))?;
            self.trace
                .apply_batch(trace)
                .map_err(failure::sled("removing expired traces"))?;
            self.meta
                .insert(key.start_key(), &start.to_be_bytes())
                .map_err(failure::sled("writing a queue's start"))?;
            if let Some(b) = self.queue_bytes.get_mut(&key) {
                *b = b.saturating_sub(out.bytes);
            }
            out.start = start;
        }
        Ok(out)
    }

    /// The lowest offset each queue's retry entries name.
    pub(crate) fn retry_floors(&self) -> Result<HashMap<QueueKey, u64>, StorageError> {
        crate::delay::retry_floors(&self.delay)
    }

    /// Applies one commit's log records and offsets.
    /// Applies one commit: queue log records, then delay-index changes,
    /// then consumer offsets — in that order, so a crash (sled recovers a
    /// prefix of its log) never keeps an offset past a retry entry that
    /// was lost.
    pub(crate) fn write(
        &mut self,
        log: sled::Batch,
        index: Option<sled::Batch>,
        trace: Option<sled::Batch>,
        delay: Option<sled::Batch>,
        offsets: Option<sled::Batch>,
    ) -> Result<(), StorageError> {
        self.log
            .apply_batch(log)
            .map_err(failure::sled("writing the queue log"))?;
        if let Some(i) = index {
            self.index
                .apply_batch(i)
                .map_err(failure::sled("writing the record index"))?;
        }
        if let Some(t) = trace {
            self.trace
                .apply_batch(t)
                .map_err(failure::sled("writing the trace"))?;
        }
        if let Some(d) = delay {
            self.delay
                .apply_batch(d)
                .map_err(failure::sled("writing the delay index"))?;
        }
        if let Some(o) = offsets {
            self.offsets
                .apply_batch(o)
                .map_err(failure::sled("writing consumer offsets"))?;
        }
        Ok(())
    }

    /// Writes a commit's log records together with the application's state
    /// writes in one sled transaction; then their index summaries.
    pub(crate) fn write_with_state(
        &mut self,
        log: sled::Batch,
        ops: &[weirmq_bus::StateOp],
        index: Option<sled::Batch>,
    ) -> Result<(), StorageError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        let r: Result<(), TransactionError<()>> =
            (&self.log, &self.state).transaction(|(log_tx, state_tx)| {
                log_tx.apply_batch(&log)?;
                for op in ops {
                    match op {
                        weirmq_bus::StateOp::Put { key, value } => {
                            state_tx.insert(key.as_slice(), value.as_slice())?;
                        }
                        weirmq_bus::StateOp::Delete { key } => {
                            state_tx.remove(key.as_slice())?;
                        }
                    }
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
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

    /// Deletes every record of `key`'s queue and every delay-index key under
    /// `marks`; returns how many messages were deleted.
    pub(crate) fn purge_queue(&mut self, key: QueueKey, marks: &[u8]) -> Result<u64, StorageError> {
        let mut log = sled::Batch::default();
        let mut index = sled::Batch::default();
        let mut n = 0u64;
        let mut end = None;
        for item in self.log.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
            let count = record_count(&v)? as u64;
            n += count;
            end = Some(offset_of(&k)? + count);
            index.remove(&k);
            log.remove(k);
        }
        let mut delay = sled::Batch::default();
        for item in self.delay.scan_prefix(marks) {
            let (k, _) = item.map_err(failure::sled("reading the delay index"))?;
            delay.remove(k);
        }
        let mut trace = sled::Batch::default();
        for k in self
            .trace
            .range(key.trace_key(0, 0)..=key.trace_key(u64::MAX, u64::MAX))
            .keys()
        {
            trace.remove(k.map_err(failure::sled("reading the trace"))?);
        }
        self.write(log, Some(index), Some(trace), Some(delay), None)?;
        if let Some(end) = end {
            // Offsets go on from where they were after a reopen.
            self.meta
                .insert(key.start_key(), &end.to_be_bytes())
                .map_err(failure::sled("writing a queue's start"))?;
        }
        self.queue_bytes.remove(&key);
        self.spans.remove(&key);
        Ok(n)
    }

    /// Makes everything written so far durable: sled `flush()`, then
    /// `fdatasync` of the data file and of new blob files, then `fsync` of
    /// the blob directory if it gained files.
    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        self.db
            .flush()
            .map_err(failure::sled("flushing the store"))?;
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

    /// Each queue's *acked floor*: the lowest committed offset of any
    /// consumer group with a position in it (`pending`: positions not
    /// written yet, newer than the stored ones). Queues no group has a
    /// position in are absent: nothing in them counts as consumed.
    pub(crate) fn acked_floors(
        &self,
        pending: &HashMap<(String, QueueKey), OffsetState>,
    ) -> Result<HashMap<QueueKey, u64>, StorageError> {
        let mut committed: HashMap<(Vec<u8>, QueueKey), u64> = HashMap::new();
        for item in self.offsets.iter() {
            let (k, v) = item.map_err(failure::sled("reading consumer offsets"))?;
            let n = k.len();
            let word = |at: usize| k.get(at..at + 4).and_then(|b| b.try_into().ok());
            let (Some(t), Some(q)) = (if n >= 9 {
                (word(n - 8), word(n - 4))
            } else {
                (None, None)
            }) else {
                return Err(StorageError::msg("consumer offset key is corrupt"));
            };
            let key = QueueKey {
                topic_id: u32::from_be_bytes(t),
                queue: u32::from_be_bytes(q),
            };
            let group = k[..n - 9].to_vec();
            committed.insert((group, key), OffsetState::decode(&v)?.committed);
        }
        for ((group, key), state) in pending {
            committed.insert((group.as_bytes().to_vec(), *key), state.committed);
        }
        let mut floors: HashMap<QueueKey, u64> = HashMap::new();
        for ((_, key), c) in committed {
            let f = floors.entry(key).or_insert(c);
            *f = (*f).min(c);
        }
        Ok(floors)
    }

    /// Every queue of every topic, for a pressure pass.
    pub(crate) fn all_queues(&self) -> Vec<QueueKey> {
        self.topics
            .iter()
            .flat_map(|(&topic_id, &(queues, _))| {
                (0..queues).map(move |queue| QueueKey { topic_id, queue })
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

    /// Records each queue's end in the data directory (at a clean
    /// shutdown, after the last sync), so the next open can tell whether
    /// sled lost committed data.
    pub(crate) fn record_ends(&self) -> Result<(), StorageError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let mut ends = BTreeMap::new();
        for (&topic_id, &(queues, _)) in &self.topics {
            for queue in 0..queues {
                let key = QueueKey { topic_id, queue };
                let end = self.queue_end(key)?.max(start_of(&self.meta, key)?);
                ends.insert((topic_id, queue), end);
            }
        }
        data_dir::write_ends(dir, &ends)
    }

    fn report(&self, event: SyncEvent) {
        if let Some(h) = &self.hook {
            h(&event);
        }
    }
}

fn offset_of(key: &[u8]) -> Result<u64, StorageError> {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::msg("queue log key is corrupt"))
}

fn record_count(v: &[u8]) -> Result<u32, StorageError> {
    v.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StorageError::msg("queue log record is corrupt (no header)"))
}

/// Decodes the messages of a record for which `want(offset)` holds.
fn decode_record(
    topic: &Arc<str>,
    queue: u32,
    first: u64,
    v: &[u8],
    mut want: impl FnMut(u64) -> bool,
) -> Result<Vec<Arc<Message>>, StorageError> {
    let count = record_count(v)?;
    let mut pos = 4usize;
    let mut out = Vec::new();
    for i in 0..count as u64 {
        let len = v
            .get(pos..pos + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| {
                StorageError::msg(format!(
                    "queue log record at offset {first} is truncated at message {i}"
                ))
            })? as usize;
        pos += 4;
        let body = v.get(pos..pos + len).ok_or_else(|| {
            StorageError::msg(format!(
                "queue log record at offset {first} is truncated at message {i}"
            ))
        })?;
        pos += len;
        if want(first + i) {
            let (m, _) = Message::decode_envelope(topic.clone(), queue, first + i, body)?;
            out.push(Arc::new(m));
        }
    }
    Ok(out)
}

/// Builds the records of one commit: consecutive messages of a queue go into
/// one record up to [`RecordBuilder::MAX_MESSAGES`] messages or
/// [`RecordBuilder::MAX_BYTES`] bytes.
#[derive(Debug, Default)]
pub(crate) struct RecordBuilder {
    open: BTreeMap<QueueKey, (u64, u32, Vec<u8>, SummaryBuilder)>,
    batch: sled::Batch,
    closed: Vec<ClosedRecord>,
}

/// A record of a commit, as the index needs it.
#[derive(Debug)]
pub(crate) struct ClosedRecord {
    key: QueueKey,
    first: u64,
    summary: SummaryBuilder,
}

/// A queue's newest records, not summarised in the index yet.
#[derive(Debug)]
struct Span {
    first: u64,
    summary: SummaryBuilder,
}

/// What a commit's records hold.
#[derive(Debug)]
pub(crate) struct Records {
    pub(crate) log: sled::Batch,
    /// The records, for [`Store::index_records`].
    pub(crate) closed: Vec<ClosedRecord>,
}

/// What one [`Store::expire`] call removed from a queue.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Expired {
    pub(crate) records: usize,
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
    /// The queue's new first offset (when something was removed).
    pub(crate) start: u64,
    /// Stopped at `max_records`: call again.
    pub(crate) more: bool,
}

impl RecordBuilder {
    pub(crate) const MAX_MESSAGES: u32 = 512;
    /// Small records keep memory bounded when a backlog is read back: sled
    /// caches whole leaves of records and evicts lazily, so with 64 KiB
    /// records a drained 750k-message backlog peaked at 368 MiB RSS, with
    /// 8 KiB at ~130 MiB (64 MiB cache), at no cost in throughput
    /// (docs/delivery.md, "Memory").
    pub(crate) const MAX_BYTES: usize = 8 * 1024;

    pub(crate) fn push(&mut self, key: QueueKey, offset: u64, m: &Message) {
        if let Some((first, count, buf, _)) = self.open.get(&key) {
            let contiguous = first + *count as u64 == offset;
            if !contiguous
                || *count >= Self::MAX_MESSAGES
                || buf.len() + m.size_hint() > Self::MAX_BYTES
            {
                self.close(key);
            }
        }
        let (_, count, buf, summary) = self.open.entry(key).or_insert_with(|| {
            (
                offset,
                0,
                0u32.to_be_bytes().to_vec(),
                SummaryBuilder::default(),
            )
        });
        let at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        m.encode_envelope(buf);
        let len = buf.len() - at - 4;
        buf[at..at + 4].copy_from_slice(&(len as u32).to_be_bytes());
        summary.add(m, len);
        *count += 1;
    }

    fn close(&mut self, key: QueueKey) {
        if let Some((first, count, mut buf, summary)) = self.open.remove(&key) {
            buf[..4].copy_from_slice(&count.to_be_bytes());
            self.batch.insert(&key.log_key(first), buf);
            self.closed.push(ClosedRecord {
                key,
                first,
                summary,
            });
        }
    }

    pub(crate) fn finish(mut self) -> Records {
        let keys: Vec<QueueKey> = self.open.keys().copied().collect();
        for k in keys {
            self.close(k);
        }
        Records {
            log: self.batch,
            closed: self.closed,
        }
    }
}

pub(crate) fn offsets_batch(entries: &HashMap<(String, QueueKey), OffsetState>) -> sled::Batch {
    let mut b = sled::Batch::default();
    for ((group, key), state) in entries {
        b.insert(offsets_key(group, *key), state.encode());
    }
    b
}

/// Reads the store from any thread. Cheap to clone.
#[derive(Clone)]
pub struct StoreReader {
    /// The data directory, named in errors.
    dir: Option<PathBuf>,
    log: sled::Tree,
    state: sled::Tree,
    index: sled::Tree,
    trace: sled::Tree,
    meta: sled::Tree,
    offsets: sled::Tree,
    delay: sled::Tree,
}

/// A queue's first kept offset as retention or a purge recorded it (0 if
/// never).
fn start_of(meta: &sled::Tree, key: QueueKey) -> Result<u64, StorageError> {
    match meta
        .get(key.start_key())
        .map_err(failure::sled("reading a queue's start"))?
    {
        None => Ok(0),
        Some(v) => v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StorageError::msg("a queue's start record is corrupt")),
    }
}

impl fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreReader")
    }
}

impl StoreReader {
    /// Reads up to `max` messages of a queue from offset `from` (inclusive)
    /// to `end` (exclusive).
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or a record does not decode.
    pub fn read_range(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, StorageError> {
        self.read_range_here(topic, key, from, end, max)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn read_range_here(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, StorageError> {
        let mut out = Vec::new();
        if from >= end || max == 0 {
            return Ok(out);
        }
        let lo = key.log_key(0);
        let hi = key.log_key(u64::MAX);
        let start = match self.log.range(lo..=key.log_key(from)).next_back() {
            Some(item) => item
                .map_err(failure::sled("reading the queue log"))?
                .0
                .to_vec(),
            None => lo.to_vec(),
        };
        for item in self.log.range(start..=hi.to_vec()) {
            let (k, v) = item.map_err(failure::sled("reading the queue log"))?;
            let first = offset_of(&k)?;
            if first >= end || out.len() >= max {
                break;
            }
            let room = max - out.len();
            let mut taken = 0usize;
            let msgs = decode_record(topic, key.queue, first, &v, |o| {
                let ok = o >= from && o < end && taken < room;
                taken += ok as usize;
                ok
            })?;
            out.extend(msgs);
        }
        Ok(out)
    }

    /// How many messages a queue holds (counts records, decodes nothing).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn count(&self, key: QueueKey) -> Result<u64, StorageError> {
        self.count_here(key)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn count_here(&self, key: QueueKey) -> Result<u64, StorageError> {
        let mut n = 0;
        for item in self.log.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (_, v) = item.map_err(failure::sled("reading the queue log"))?;
            n += record_count(&v)? as u64;
        }
        Ok(n)
    }

    /// The DLQ offsets of `group`'s dead letters already resent.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn resent(&self, group: &str) -> Result<HashSet<u64>, StorageError> {
        self.resent_here(group)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn resent_here(&self, group: &str) -> Result<HashSet<u64>, StorageError> {
        let prefix = crate::delay::resent_prefix(group);
        let mut out = HashSet::new();
        for item in self.delay.scan_prefix(&prefix) {
            let (k, _) = item.map_err(failure::sled("reading the delay index"))?;
            let off = k
                .get(prefix.len()..prefix.len() + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StorageError::msg("a resent mark is corrupt"))?;
            out.insert(off);
        }
        Ok(out)
    }

    /// The first offset in `[start, end)` of a queue whose message was
    /// published at or after `ms` (Unix milliseconds), or `end` if none:
    /// a binary search over publish times (monotonic per queue to the
    /// millisecond).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn offset_at_time(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        start: u64,
        end: u64,
        ms: u64,
    ) -> Result<u64, StorageError> {
        self.offset_at_time_here(topic, key, start, end, ms)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn offset_at_time_here(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        start: u64,
        end: u64,
        ms: u64,
    ) -> Result<u64, StorageError> {
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let born = self
                .read_range(topic, key, mid, mid + 1, 1)?
                .first()
                .map(|m| {
                    m.born_at()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                });
            match born {
                Some(b) if b >= ms => hi = mid,
                Some(_) => lo = mid + 1,
                // A hole (purged range): look after it.
                None => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// The first offset a queue still holds: 0 for a queue that never lost
    /// messages; after retention or a purge, the first kept offset (the
    /// queue's end if it holds nothing).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn queue_start(&self, key: QueueKey) -> Result<u64, StorageError> {
        self.queue_start_here(key)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn queue_start_here(&self, key: QueueKey) -> Result<u64, StorageError> {
        let recorded = start_of(&self.meta, key)?;
        match self
            .log
            .range(key.log_key(0)..=key.log_key(u64::MAX))
            .next()
        {
            None => Ok(recorded),
            Some(item) => Ok(
                offset_of(&item.map_err(failure::sled("reading the queue log"))?.0)?.max(recorded),
            ),
        }
    }

    /// Finds the message with `id` in the given queues (`(topic name, key,
    /// queue count)`): reads record summaries and decodes only the records
    /// whose filter matches.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn find_id(
        &self,
        topics: &[(Arc<str>, u32, u32)],
        id: MessageId,
    ) -> Result<Option<Arc<Message>>, StorageError> {
        self.find_id_here(topics, id)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn find_id_here(
        &self,
        topics: &[(Arc<str>, u32, u32)],
        id: MessageId,
    ) -> Result<Option<Arc<Message>>, StorageError> {
        for (name, topic_id, queues) in topics {
            for queue in 0..*queues {
                let key = QueueKey {
                    topic_id: *topic_id,
                    queue,
                };
                let mut found = None;
                self.scan_matching(name, key, Probe::Id(id), |m| {
                    if m.id() == id {
                        found = Some(m.clone());
                    }
                    found.is_none()
                })?;
                if found.is_some() {
                    return Ok(found);
                }
            }
        }
        Ok(None)
    }

    /// Up to `max` messages of a topic's queues carrying `key`, oldest first.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn find_key(
        &self,
        topic: &Arc<str>,
        topic_id: u32,
        queues: u32,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, StorageError> {
        self.find_key_here(topic, topic_id, queues, key, max)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn find_key_here(
        &self,
        topic: &Arc<str>,
        topic_id: u32,
        queues: u32,
        key: &str,
        max: usize,
    ) -> Result<Vec<Arc<Message>>, StorageError> {
        let mut out = Vec::new();
        for queue in 0..queues {
            let qk = QueueKey { topic_id, queue };
            self.scan_matching(topic, qk, Probe::Key(key), |m| {
                if m.keys().iter().any(|k| k == key) {
                    out.push(m.clone());
                }
                true
            })?;
        }
        out.sort_by_key(|m| (m.born_at(), m.queue(), m.offset()));
        out.truncate(max);
        Ok(out)
    }

    /// Calls `f` on every message of the spans whose summary may contain
    /// `probe`, and of the queue's tail not summarised yet, until `f`
    /// returns false.
    fn scan_matching(
        &self,
        topic: &Arc<str>,
        key: QueueKey,
        probe: Probe<'_>,
        mut f: impl FnMut(&Arc<Message>) -> bool,
    ) -> Result<(), StorageError> {
        let mut visit = |from: u64, to: u64| -> Result<bool, StorageError> {
            for item in self.log.range(key.log_key(from)..key.log_key(to)) {
                let (k, record) = item.map_err(failure::sled("reading the queue log"))?;
                let first = offset_of(&k)?;
                for m in decode_record(topic, key.queue, first, &record, |_| true)? {
                    if !f(&m) {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        };
        let mut tail = 0;
        for item in self.index.range(key.log_key(0)..=key.log_key(u64::MAX)) {
            let (k, v) = item.map_err(failure::sled("reading the index"))?;
            let first = offset_of(&k)?;
            let summary = Summary::decode(&v)?;
            let end = first + summary.count as u64;
            tail = end;
            if summary.may_contain(probe) && !visit(first, end)? {
                return Ok(());
            }
        }
        visit(tail, u64::MAX)?;
        Ok(())
    }

    /// The trace events of the message at `offset` of a queue, in the order
    /// recorded.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn trace_of(&self, key: QueueKey, offset: u64) -> Result<Vec<TraceEvent>, StorageError> {
        self.trace_of_here(key, offset)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn trace_of_here(&self, key: QueueKey, offset: u64) -> Result<Vec<TraceEvent>, StorageError> {
        self.trace
            .range(key.trace_key(offset, 0)..=key.trace_key(offset, u64::MAX))
            .values()
            .map(|v| decode_trace(&v.map_err(failure::sled("reading the trace"))?))
            .collect()
    }

    /// One key of the application's state.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.state_get_here(key)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn state_get_here(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .state
            .get(key)
            .map_err(failure::sled("reading application state"))?
            .map(|v| v.to_vec()))
    }

    /// The application's state under `prefix`, in key order.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn state_scan(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, StorageError> {
        self.state_scan_here(prefix)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn state_scan_here(&self, prefix: &[u8]) -> Result<weirmq_bus::StateEntries, StorageError> {
        self.state
            .scan_prefix(prefix)
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(failure::sled("reading application state"))
            })
            .collect()
    }

    /// Up to `limit` delayed-message entries in due order, after `after`.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn load_schedule(
        &self,
        after: Option<&crate::ScheduleEntry>,
        limit: usize,
    ) -> Result<Vec<crate::ScheduleEntry>, StorageError> {
        self.load_schedule_here(after, limit)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn load_schedule_here(
        &self,
        after: Option<&crate::ScheduleEntry>,
        limit: usize,
    ) -> Result<Vec<crate::ScheduleEntry>, StorageError> {
        crate::delay::load_schedule(&self.delay, after, limit)
    }

    /// The stored schedule entry with `probe`'s seq (at its key, or moved
    /// to a later time), if any.
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn schedule_entry(
        &self,
        probe: &crate::ScheduleEntry,
    ) -> Result<Option<crate::ScheduleEntry>, StorageError> {
        self.schedule_entry_here(probe)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn schedule_entry_here(
        &self,
        probe: &crate::ScheduleEntry,
    ) -> Result<Option<crate::ScheduleEntry>, StorageError> {
        crate::delay::find_schedule(&self.delay, probe)
    }

    /// The retry entries of `group` on topic `topic_id`, in due order.
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or an entry does not decode.
    pub fn load_retries(
        &self,
        group: &str,
        topic_id: u32,
    ) -> Result<Vec<crate::RetryEntry>, StorageError> {
        self.load_retries_here(group, topic_id)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn load_retries_here(
        &self,
        group: &str,
        topic_id: u32,
    ) -> Result<Vec<crate::RetryEntry>, StorageError> {
        crate::delay::load_retries(&self.delay, group, topic_id)
    }

    /// The committed positions of `group` in the queues of topic `topic_id`.
    ///
    /// # Errors
    ///
    /// A storage error if sled fails or an offset record does not decode.
    pub fn load_offsets(
        &self,
        group: &str,
        topic_id: u32,
    ) -> Result<HashMap<u32, OffsetState>, StorageError> {
        self.load_offsets_here(group, topic_id)
            .map_err(|e| e.in_dir(self.dir.as_deref()))
    }

    fn load_offsets_here(
        &self,
        group: &str,
        topic_id: u32,
    ) -> Result<HashMap<u32, OffsetState>, StorageError> {
        let mut prefix = group.as_bytes().to_vec();
        prefix.push(0);
        prefix.extend_from_slice(&topic_id.to_be_bytes());
        let mut out = HashMap::new();
        for item in self.offsets.scan_prefix(&prefix) {
            let (k, v) = item.map_err(failure::sled("reading consumer offsets"))?;
            let queue = k
                .get(prefix.len()..prefix.len() + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| StorageError::msg("consumer offset key is corrupt"))?;
            out.insert(queue, OffsetState::decode(&v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weirmq_bus::OutgoingMessage;

    fn msg(i: usize) -> Message {
        Message::prepare(
            OutgoingMessage::new("t", format!("m{i}").into_bytes()),
            Arc::from("t"),
        )
    }

    #[test]
    fn records_round_trip_through_range_reads() {
        let (mut store, rec) = Store::open(StoreConfig::default()).unwrap();
        assert!(rec.topics.is_empty());
        let id = store
            .create_topic("t", 2, &TopicSettings::default())
            .unwrap();
        let key = QueueKey {
            topic_id: id,
            queue: 1,
        };
        let mut b = RecordBuilder::default();
        let msgs: Vec<Message> = (0..1500).map(msg).collect();
        for (i, m) in msgs.iter().enumerate() {
            b.push(key, i as u64, m);
        }
        let records = b.finish();
        // Records close at MAX_MESSAGES messages or MAX_BYTES bytes.
        let firsts: Vec<u64> = records.closed.iter().map(|c| c.first).collect();
        // ~50-byte messages: the byte limit closes them first.
        assert!(firsts.len() > 1500_usize.div_ceil(512), "{firsts:?}");
        for w in firsts.windows(2) {
            assert!(
                w[1] - w[0] <= RecordBuilder::MAX_MESSAGES as u64,
                "{firsts:?}"
            );
        }
        let index = store.index_records(records.closed);
        store.write(records.log, index, None, None, None).unwrap();
        let r = store.reader();
        let t: Arc<str> = Arc::from("t");
        for (from, end, max) in [
            (0, 1500, 2000),
            (511, 514, 10),
            (700, 1500, 5),
            (1499, 1500, 1),
        ] {
            let got = r.read_range(&t, key, from, end, max).unwrap();
            let want: Vec<u64> = (from..end).take(max).collect();
            assert_eq!(got.iter().map(|m| m.offset()).collect::<Vec<_>>(), want);
            for m in &got {
                assert_eq!(m.body(), msgs[m.offset() as usize].body());
            }
        }
        assert_eq!(store.queue_end(key).unwrap(), 1500);
    }

    use proptest::prelude::*;

    /// One commit: (queue, bodies) appends.
    fn commits() -> impl Strategy<Value = Vec<Vec<(u32, Vec<usize>)>>> {
        let body = prop_oneof![8 => 0usize..600, 1 => 20_000usize..70_000];
        let append = (0u32..3, proptest::collection::vec(body, 1..40));
        proptest::collection::vec(proptest::collection::vec(append, 1..6), 1..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The queue logs behave like a map (queue, offset) -> message, across
        /// record boundaries and a reopen.
        #[test]
        fn queue_logs_match_a_btreemap_model(
            commits in commits(),
            reads in proptest::collection::vec((0u32..3, 0u64..800, 0u64..800, 1usize..300), 1..20),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let cfg = StoreConfig { path: Some(dir.path().to_path_buf()), ..Default::default() };
            let t: Arc<str> = Arc::from("t");
            let mut model: BTreeMap<(u32, u64), Message> = BTreeMap::new();
            let mut ends = [0u64; 3];
            {
                let (mut store, _) = Store::open(cfg.clone()).unwrap();
                let id = store.create_topic("t", 3, &TopicSettings::default()).unwrap();
                prop_assert_eq!(id, 0);
                for commit in &commits {
                    let mut b = RecordBuilder::default();
                    for (q, bodies) in commit {
                        for len in bodies {
                            let m = Message::prepare(
                                OutgoingMessage::new("t", vec![(*len % 251) as u8; *len]),
                                t.clone(),
                            )
                            .with_position(*q, ends[*q as usize]);
                            b.push(QueueKey { topic_id: 0, queue: *q }, m.offset(), &m);
                            model.insert((*q, m.offset()), m);
                            ends[*q as usize] += 1;
                        }
                    }
                    let r = b.finish();
                    let index = store.index_records(r.closed);
                    store.write(r.log, index, None, None, None).unwrap();
                }
                store.sync().unwrap();
            }
            let (store, recovery) = Store::open(cfg).unwrap();
            prop_assert_eq!(&recovery.topics[0].ends, &ends.to_vec());
            let r = store.reader();
            for (q, from, end, max) in reads {
                let key = QueueKey { topic_id: 0, queue: q };
                let got = r.read_range(&t, key, from, end, max).unwrap();
                let want: Vec<&Message> = model
                    .range((q, from)..(q, end.max(from)))
                    .take(max)
                    .map(|(_, m)| m)
                    .collect();
                prop_assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want) {
                    prop_assert_eq!(&**g, w);
                }
            }
        }
    }

    #[test]
    fn missing_index_summaries_are_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            path: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let msgs: Vec<Message> = (0..3000)
            .map(|i| {
                Message::prepare(
                    OutgoingMessage::new("t", vec![1; 8]).key(format!("k{i}")),
                    Arc::from("t"),
                )
                .with_position(0, i)
            })
            .collect();
        let key = QueueKey {
            topic_id: 0,
            queue: 0,
        };
        {
            let (mut store, _) = Store::open(cfg.clone()).unwrap();
            store
                .create_topic("t", 1, &TopicSettings::default())
                .unwrap();
            // A store written before summaries existed (or a crash between
            // the log and the index): records without summaries.
            let mut b = RecordBuilder::default();
            for m in &msgs {
                b.push(key, m.offset(), m);
            }
            store.write(b.finish().log, None, None, None, None).unwrap();
            store.sync().unwrap();
        }
        let (store, recovery) = Store::open(cfg).unwrap();
        assert_eq!(recovery.topics[0].ends, vec![3000]);
        let r = store.reader();
        let t: Arc<str> = Arc::from("t");
        // Two full spans written at open, the rest is the open span's tail.
        assert_eq!(r.index.len(), 2);
        for i in [0usize, 511, 512, 1023, 1024, 2047, 2048, 2999] {
            let found = r.find_id(&[(t.clone(), 0, 1)], msgs[i].id()).unwrap();
            assert_eq!(found.map(|m| m.offset()), Some(i as u64));
            assert_eq!(r.find_key(&t, 0, 1, &format!("k{i}"), 10).unwrap().len(), 1);
        }
    }

    #[test]
    fn offsets_round_trip() {
        let s = OffsetState {
            committed: 7,
            acked_above: vec![9, 12, 13, 14, 20],
        };
        assert_eq!(s.encode().len(), 12 + 3 * 12, "three runs");
        assert_eq!(OffsetState::decode(&s.encode()).unwrap(), s);
        assert!(OffsetState::decode(&[1, 2, 3]).is_err());
    }
}
