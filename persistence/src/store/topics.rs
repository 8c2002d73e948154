//! The `meta` tree: topics (id, queue count, retention, trace) and each
//! queue's first kept offset.

use super::*;

/// A topic's settings as the store keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicSettings {
    /// How long its messages are kept.
    pub retention: Retention,
    /// Whether its messages' lifecycles are traced.
    pub trace: bool,
    /// How long an idempotency key is remembered, as configured (`None`:
    /// the default, see `TopicConfig::dedupe_window`).
    pub dedupe_window: Option<std::time::Duration>,
}

/// id u32 · queues u32 · max age ms u64 (0: none) · max bytes u64 (0: none)
/// · trace u8 · dedupe window ms u64 (0: the default). Stores written
/// before retention existed hold only the first eight bytes (default
/// settings), before dedupe windows the first 25.
pub(super) fn encode_topic(id: u32, queues: u32, settings: &TopicSettings) -> Vec<u8> {
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
    let window = settings
        .dedupe_window
        .map_or(0, |w| (w.as_millis() as u64).max(1));
    v.extend_from_slice(&window.to_be_bytes());
    v
}

pub(super) fn decode_topic(
    name: &str,
    v: &[u8],
) -> Result<(u32, u32, TopicSettings), StorageError> {
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
        25 | 33 => {
            let mut retention = Retention::forever();
            let age = u64_at(8)?;
            if age > 0 {
                retention = retention.max_age(std::time::Duration::from_millis(age));
            }
            let bytes = u64_at(16)?;
            if bytes > 0 {
                retention = retention.max_bytes(bytes);
            }
            let window = if v.len() == 33 { u64_at(25)? } else { 0 };
            TopicSettings {
                retention,
                trace: v[24] == 1,
                dedupe_window: (window > 0).then(|| std::time::Duration::from_millis(window)),
            }
        }
        _ => return Err(bad()),
    };
    Ok((id, queues, settings))
}

/// A queue's first kept offset as retention or a purge recorded it (0 if
/// never).
pub(super) fn start_of(meta: &crate::kv::Tree, key: QueueKey) -> Result<u64, StorageError> {
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

impl Store {
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

    /// Every queue of a topic with a retention limit, with the limit.
    pub(crate) fn retention_plan(&self) -> Vec<(QueueKey, Retention)> {
        let mut out = Vec::new();
        for (&topic_id, (queues, settings)) in &self.topics {
            let r = settings.retention;
            if r.age().is_none() && r.bytes().is_none() {
                continue;
            }
            out.extend(
                (0..weirmq_bus::queues_with_lanes(*queues))
                    .map(|queue| (QueueKey { topic_id, queue }, r)),
            );
        }
        out
    }
}

impl StoreReader {
    /// The first offset a queue still holds: 0 for a queue that never lost
    /// messages; after retention or a purge, the first kept offset (the
    /// queue's end if it holds nothing).
    ///
    /// # Errors
    ///
    /// A storage error.
    pub fn queue_start(&self, key: QueueKey) -> Result<u64, StorageError> {
        self.located(|| {
            let recorded = start_of(&self.meta, key)?;
            match self
                .log
                .range(key.log_key(0)..=key.log_key(u64::MAX))
                .next()
            {
                None => Ok(recorded),
                Some(item) => Ok(offset_of(
                    &item.map_err(failure::sled("reading the queue log"))?.0,
                )?
                .max(recorded)),
            }
        })
    }
}
