//! Opening the store: the data directory's marker and ends file, sled's
//! trees, the format check, and recovery (topics, queue ends, unsummarised
//! records) — a store that came back shorter than it was is refused as
//! damaged, never started over.

use super::*;
use crate::kv;

/// sled's trees, in the order `Store::open` takes them.
const TREES: [&str; 7] = [
    "log",
    "app-state",
    "index",
    "trace",
    "offsets",
    "meta",
    "delay",
];

/// A topic found in the store at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredTopic {
    /// Its name.
    pub name: String,
    /// Its id in this store.
    pub id: u32,
    /// Its queue count (as configured: without its priority lanes).
    pub queues: u32,
    /// For each queue and then each priority lane
    /// ([`weirmq_bus::queues_with_lanes`]), the next offset to write.
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
            None => (None, DirState::Fresh),
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
        let plain = |context: &str, e: sled::Error| {
            data_dir::refuse(&shown, failure::sled_error(context, e).to_string())
        };
        // In memory: ordered maps, no sled underneath (see `kv`), counting
        // what they hold for the memory budget.
        let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (db, [log, state_tree, index, trace, offsets, meta, delay]) = if dir.is_none() {
            (
                None,
                std::array::from_fn(|_| kv::Tree::memory(held.clone())),
            )
        } else {
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
            let tree = |name: &str| {
                db.open_tree(name)
                    .map_err(|e| plain(&format!("opening its tree `{name}`"), e))
            };
            let mut trees = Vec::new();
            for name in TREES {
                trees.push(kv::Tree::Sled(tree(name)?));
            }
            let trees: [kv::Tree; 7] = trees.try_into().expect("seven trees");
            (Some(db), trees)
        };
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
                if let (Some(d), Some(db)) = (&dir, &db) {
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
            clock: config.clock.clone(),
            // Increasing across restarts (unless 65,536 events per ms).
            trace_seq: weirmq_bus::now_ms() << 16,
            dir,
            data_file,
            synced_blobs: HashSet::new(),
            hook: config.sync_hook,
            guard: match &config.path {
                Some(p) => DiskGuard::new(Some(p), config.disk),
                None => {
                    DiskGuard::memory(config.memory_budget.unwrap_or(DEFAULT_MEMORY_BUDGET), held)
                }
            },
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

    pub(super) fn recover(&mut self) -> Result<Recovery, StorageError> {
        let mut topics = Vec::new();
        for item in self.meta.scan_prefix(TOPIC_PREFIX) {
            let (k, v) = item.map_err(failure::sled("reading topic metadata"))?;
            let name = String::from_utf8(k[TOPIC_PREFIX.len()..].to_vec())
                .map_err(|_| StorageError::msg("topic name in metadata is not UTF-8"))?;
            let (id, queues, settings) = decode_topic(&name, &v)?;
            let all = weirmq_bus::queues_with_lanes(queues);
            let mut ends = Vec::with_capacity(all as usize);
            for queue in 0..all {
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

    pub(super) fn queue_end(&self, key: QueueKey) -> Result<u64, StorageError> {
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

    /// Records each queue's end in the data directory (at a clean
    /// shutdown, after the last sync), so the next open can tell whether
    /// sled lost committed data.
    pub(crate) fn record_ends(&self) -> Result<(), StorageError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let mut ends = BTreeMap::new();
        for (&topic_id, &(queues, _)) in &self.topics {
            for queue in 0..weirmq_bus::queues_with_lanes(queues) {
                let key = QueueKey { topic_id, queue };
                let end = self.queue_end(key)?.max(start_of(&self.meta, key)?);
                ends.insert((topic_id, queue), end);
            }
        }
        data_dir::write_ends(dir, &ends)
    }
}
