//! # weirmq-persistence: the embedded store
//!
//! The store of the embedded broker — sled on disk, ordered maps in
//! memory (`kv.rs`; the same store code on both) — queue logs, consumer
//! offsets, topic metadata, the delay index (retry entries), record
//! summaries (queries by id and key) and message traces, written by
//! one [`PersistenceActor`] with group commit, read concurrently through
//! [`StoreReader`]s.
//!
//! It knows messages, queues, offsets and due times, and nothing of
//! consumer-group logic, filters or the retry policy: those live in
//! `weirmq-actors` and `weirmq-bus`.
//!
//! # Files
//!
//! `kv.rs` holds the trees the store is written against (sled's, or
//! in-memory maps counting their bytes for the memory budget). `store/` is
//! split along the trees: `open.rs` (open and recovery),
//! `topics.rs` (`meta`), `log.rs`, `spans.rs` (`index`), `offsets.rs`,
//! `delays.rs`, `trace.rs`, `app_state.rs`, `retention.rs`; `store/mod.rs`
//! holds the handles, the named commit batch and the real sync. `actor/`
//! holds the writer: `messages.rs` (what it takes), `mailbox.rs` (how it
//! handles each), `commit.rs` (one commit in named steps), `fail_stop.rs`
//! (the store or the failure that stopped it), `retention.rs`.
//!
//! # Layout (one sled database)
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `format` | `weirmq-store-v1` |
//! | `meta` | `topic/<name>` | topic id (u32) + queue count (u32) + retention (max age ms, max bytes: u64 each) + trace (u8) |
//! | `meta` | `start/` · topic id · queue | the queue's first kept offset, after retention or a purge |
//! | `log` | topic id (u32) · queue (u32) · first offset (u64), big-endian | a *record*: the envelopes of consecutive messages of one commit batch |
//! | `index` | the record's key | the record's summary: count, bytes, publish times, a Bloom filter over ids and keys (queries, retention) |
//! | `trace` | topic id · queue · offset · seq | one trace event of the message at that offset |
//! | `delay` | `r` · group · `0` · topic id (u32) · due ms (u64) · seq (u64) | a retry entry: queue, offset, next attempt, first failure, last error |
//! | `delay` | `x` · group · `0` · DLQ offset (u64) | a dead letter's "resent" mark |
//! | `delay` | `d` · due ms (u64) · seq (u64) | a delayed message: topic id, queue and offset of its copy in the schedule topic |
//! | `offsets` | group · `0` · topic id (u32) · queue (u32) | committed offset (u64) + runs of offsets acked above it |
//!
//! One record per queue per commit batch (capped at 512 messages / 8 KiB,
//! a larger message alone) keeps sled at a few keys per commit instead of
//! one per message; a read finds an offset with a range lookup to the record
//! at or before it.
//!
//! # Durability
//!
//! sled 0.34's `flush()` is only `sync_file_range` on Linux and sled never
//! syncs its blob files (`blobs/`, where items over ~128 KiB go). So a
//! [`Durability::Flushed`](weirmq_bus::Durability) commit is
//! `flush()` + `fdatasync(db)` + `fdatasync` of every blob file not synced
//! before + `fsync(blobs/)` when there are new ones, and only then are the
//! waiting publishers answered. [`SyncEvent`]s report each step to an
//! optional hook.
#![warn(
    unreachable_pub,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

mod actor;
mod data_dir;
mod delay;
mod disk;
mod failure;
mod index;
mod kv;
mod store;
pub mod timers;

pub use actor::{
    Append, AppendDone, CommitOffsets, ConfigureTopic, CreateTopic, PersistenceActor, PurgeQueue,
    RecordTrace, RunRetention, Scheduled, SetScheduler, ShutdownStore, UpdateRetries,
};
pub use delay::{next_seq, RetryEntry, RetryKey, ScheduleEntry};
pub use disk::{DiskGuard, DiskPolicy};
pub use store::{
    DedupeEntry, OffsetState, QueueKey, RecoveredTopic, Recovery, Store, StoreConfig, StoreReader,
    SyncEvent, SyncHook, TopicSettings, TraceRecord, DEFAULT_MEMORY_BUDGET,
};
