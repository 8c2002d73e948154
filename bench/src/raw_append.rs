//! The embedded limit: what one file with group commit does on this disk,
//! the bar issue 18 sets the durable bus against. Publishers hand their
//! records to one writer thread; it appends everything waiting
//! (length-prefixed) to one file with one `write`, makes it durable with
//! one `fdatasync`, acknowledges those publishes, and hands the records to
//! a consumer thread (stored before delivered, as the bus's `Flushed`).
//! No index, no offsets, no acks: a floor, not a message bus.
//!
//! The same group commit into sled (`baseline/sled_group_commit/…`): each
//! group one `apply_batch` (a key per record), sled's `flush()`, then an
//! `fdatasync` of sled's data file — the syncs the bus's `Flushed` commit
//! makes — shows what sled costs on that write pattern before any of the
//! bus's own work.

use std::io::Write;

use crate::*;

struct Append {
    records: Vec<Vec<u8>>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Where a group commit writes.
pub(super) enum CommitSink {
    /// One file: append, `fdatasync`.
    File(std::fs::File),
    /// sled: `apply_batch`, `flush()`, `fdatasync` of its data file.
    Sled {
        db: sled::Db,
        tree: sled::Tree,
        data: std::fs::File,
        next: u64,
    },
}

impl CommitSink {
    fn open(sled: bool, dir: &Path) -> Result<CommitSink, String> {
        if sled {
            let db = sled::open(dir).map_err(|e| e.to_string())?;
            let tree = db.open_tree("log").map_err(|e| e.to_string())?;
            let data = std::fs::File::open(dir.join("db")).map_err(|e| e.to_string())?;
            Ok(CommitSink::Sled {
                db,
                tree,
                data,
                next: 0,
            })
        } else {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("log"))
                .map(CommitSink::File)
                .map_err(|e| e.to_string())
        }
    }

    fn commit(&mut self, group: &[Append], buf: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            CommitSink::File(file) => {
                buf.clear();
                for a in group {
                    for r in &a.records {
                        buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
                        buf.extend_from_slice(r);
                    }
                }
                file.write_all(buf)?;
                file.sync_data()
            }
            CommitSink::Sled {
                db,
                tree,
                data,
                next,
            } => {
                let mut batch = sled::Batch::default();
                for a in group {
                    for r in &a.records {
                        batch.insert(&next.to_be_bytes(), r.as_slice());
                        *next += 1;
                    }
                }
                tree.apply_batch(batch).map_err(std::io::Error::other)?;
                // WEIRMQ_SLED_GROUP_COMMIT=flush: sled's flush() without
                // the fdatasync after it; =none: neither (what sled's
                // apply_batch alone costs). Default: both, as the bus.
                let syncs = std::env::var("WEIRMQ_SLED_GROUP_COMMIT").unwrap_or_default();
                if syncs != "none" {
                    db.flush().map_err(std::io::Error::other)?;
                }
                if syncs != "none" && syncs != "flush" {
                    data.sync_data()?;
                }
                Ok(())
            }
        }
    }
}

/// Runs `load` against a group commit: to one file (append +
/// fdatasync), or into sled (`sled`).
pub(super) async fn raw_append(
    name: &str,
    load: Load,
    payload: usize,
    sled: bool,
) -> Result<Res, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sink = CommitSink::open(sled, dir.path())?;
    let (tx, rx) = std::sync::mpsc::channel::<Append>();
    let (to_consumer, delivered) = std::sync::mpsc::channel::<Vec<Vec<u8>>>();
    let tally = Arc::new(Tally::default());
    let writer = std::thread::spawn(move || write_loop(sink, rx, to_consumer));
    let seen = tally.clone();
    let consumer = std::thread::spawn(move || {
        for batch in delivered {
            for r in &batch {
                seen.seen(r);
            }
        }
    });
    let res = drive(name, load, payload, tally, move |records| {
        let tx = tx.clone();
        async move {
            let (done, acked) = tokio::sync::oneshot::channel();
            tx.send(Append { records, done })
                .map_err(|_| "the writer stopped".to_string())?;
            acked.await.map_err(|_| "the writer stopped".to_string())
        }
    })
    .await;
    // The senders go with the driver and its last tasks (which this thread
    // runs: wait without blocking it); then the writer and the consumer end.
    while !(writer.is_finished() && consumer.is_finished()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    writer
        .join()
        .map_err(|_| "the writer panicked".to_string())?
        .map_err(|e| format!("append: {e}"))?;
    consumer
        .join()
        .map_err(|_| "the consumer panicked".to_string())?;
    res.map(Res::baseline)
}

fn write_loop(
    mut sink: CommitSink,
    rx: std::sync::mpsc::Receiver<Append>,
    consumer: std::sync::mpsc::Sender<Vec<Vec<u8>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        sink.commit(&group, &mut buf)?;
        for a in group {
            let _ = a.done.send(());
            let _ = consumer.send(a.records);
        }
    }
    Ok(())
}
