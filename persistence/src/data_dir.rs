//! The data directory: whether the store may use it, its marker, and the
//! queue ends recorded at each clean shutdown.
//!
//! # The rules
//!
//! * A missing or empty directory becomes a new store. The marker file
//!   `weirmq.store` is written first (`initialising`), then sled's files, and
//!   the marker is rewritten to the store format only once the store is
//!   initialised and synced; an interrupted initialisation is finished on
//!   the next open.
//! * A non-empty directory without the marker is never written to: it is
//!   someone else's (a file named `db` of the user's is not sled's).
//! * A directory whose marker says "initialised" but whose data file `db`
//!   is missing, or whose sled data come back without weirmq's format key,
//!   is a *damaged* store: the bus refuses it and says to restore a backup,
//!   never starts empty over it.
//! * At every clean shutdown the store writes `weirmq.ends`, each queue's
//!   end offset. Ends never go down (retention and purges keep them), so
//!   at open a queue that comes back shorter than recorded means sled lost
//!   committed data while recovering (a damaged data file): refused too.
//!
//! Nothing here writes into a directory it refuses.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use weirmq_bus::{Error, StorageError};

use crate::failure::{self, DAMAGED};

/// The marker file beside sled's.
pub(crate) const MARKER_FILE: &str = "weirmq.store";
/// The marker's content while a new store is being set up.
const INITIALISING: &[u8] = b"initialising";
/// Each queue's end at the last clean shutdown.
const ENDS_FILE: &str = "weirmq.ends";
const ENDS_HEADER: &str = "weirmq-ends-v1";

/// What the directory holds, as far as the files tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirState {
    /// Missing or empty: a new store starts here.
    Fresh,
    /// A new store's set-up was interrupted: finish it.
    Initialising,
    /// A store (the marker names its format).
    Initialised,
}

pub(crate) fn refuse(path: &Path, reason: impl Into<String>) -> Error {
    Error::DataDir {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Decides whether the store may open `path`; creates it if missing.
pub(crate) fn inspect(path: &Path, format: &[u8]) -> Result<DirState, Error> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => Err(refuse(path, "it is a file, not a directory")),
        Ok(_) => {
            let mut entries = std::fs::read_dir(path)
                .map_err(|e| refuse(path, format!("cannot list it: {e}")))?;
            if entries.next().is_none() {
                return Ok(DirState::Fresh);
            }
            let marker = match std::fs::read(path.join(MARKER_FILE)) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(refuse(
                        path,
                        format!(
                            "it is not empty and has no `{MARKER_FILE}` marker, so it is not a \
                             weirmq store; the bus never writes into a directory holding other \
                             files: point it at an empty or new directory"
                        ),
                    ))
                }
                Err(e) => return Err(refuse(path, format!("cannot read `{MARKER_FILE}`: {e}"))),
            };
            if marker == INITIALISING {
                return Ok(DirState::Initialising);
            }
            if marker != format {
                return Err(refuse(
                    path,
                    format!(
                        "its marker `{MARKER_FILE}` names store format `{}`, this build reads \
                         `{}`",
                        String::from_utf8_lossy(&marker),
                        String::from_utf8_lossy(format)
                    ),
                ));
            }
            if !path.join("db").exists() {
                return Err(refuse(
                    path,
                    format!(
                        "the store is damaged: its marker `{MARKER_FILE}` is there but its data \
                         file `db` is missing; restore the directory from a backup (an empty \
                         store started over it would lose every message it held)"
                    ),
                ));
            }
            Ok(DirState::Initialised)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path)
                .map_err(|e| refuse(path, format!("cannot create it: {e}")))?;
            Ok(DirState::Fresh)
        }
        Err(e) => Err(refuse(path, format!("cannot read it: {e}"))),
    }
}

/// Writes `content` to `dir/name` durably and atomically (a temporary
/// file, synced, renamed over the old one, then the directory synced).
fn write_durably(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Marks a fresh directory as a store being set up (before sled writes).
pub(crate) fn begin_init(path: &Path) -> Result<(), Error> {
    write_durably(path, MARKER_FILE, INITIALISING)
        .map_err(|e| refuse(path, format!("cannot write `{MARKER_FILE}`: {e}")))
}

/// Marks the store initialised (its format key is written and synced).
pub(crate) fn finish_init(path: &Path, format: &[u8]) -> Result<(), Error> {
    write_durably(path, MARKER_FILE, format)
        .map_err(|e| refuse(path, format!("cannot write `{MARKER_FILE}`: {e}")))
}

/// Each queue's end by (topic id, queue).
pub(crate) type Ends = BTreeMap<(u32, u32), u64>;

/// The queue ends recorded at the last clean shutdown, if any.
pub(crate) fn read_ends(path: &Path) -> Result<Option<Ends>, Error> {
    let text = match std::fs::read_to_string(path.join(ENDS_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refuse(path, format!("cannot read `{ENDS_FILE}`: {e}"))),
    };
    let bad = || {
        refuse(
            path,
            format!(
                "`{ENDS_FILE}` is damaged; if the store itself is intact, delete that file (it \
                 is rewritten at the next clean shutdown)"
            ),
        )
    };
    let mut lines = text.lines();
    if lines.next() != Some(ENDS_HEADER) {
        return Err(bad());
    }
    let mut ends = BTreeMap::new();
    for line in lines {
        let mut parts = line.split(' ').map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(t)), Some(Ok(q)), Some(Ok(end)), None) => {
                let key = (
                    u32::try_from(t).map_err(|_| bad())?,
                    u32::try_from(q).map_err(|_| bad())?,
                );
                ends.insert(key, end);
            }
            _ => return Err(bad()),
        }
    }
    Ok(Some(ends))
}

/// Records the queue ends at a clean shutdown.
pub(crate) fn write_ends(path: &Path, ends: &Ends) -> Result<(), StorageError> {
    let mut text = format!("{ENDS_HEADER}\n");
    for ((t, q), end) in ends {
        text.push_str(&format!("{t} {q} {end}\n"));
    }
    write_durably(path, ENDS_FILE, text.as_bytes())
        .map_err(failure::io("recording the queue ends at shutdown"))
}

/// Refuses a store whose queues came back shorter than recorded.
pub(crate) fn check_ends(
    path: &Path,
    recorded: &Ends,
    recovered: &Ends,
    name_of: impl Fn(u32) -> Option<String>,
) -> Result<(), Error> {
    for (&(t, q), &want) in recorded {
        let got = recovered.get(&(t, q)).copied();
        if got.is_none_or(|g| g < want) {
            let topic = name_of(t).unwrap_or_else(|| format!("#{t} (its metadata is gone)"));
            return Err(refuse(
                path,
                format!(
                    "the store is damaged: queue {q} of topic `{topic}` held {want} messages at \
                     the last clean shutdown but sled recovered {} (its data file lost committed \
                     data); {DAMAGED}",
                    got.unwrap_or(0)
                ),
            ));
        }
    }
    Ok(())
}

/// A sled error at open, as a refusal of the directory.
pub(crate) fn open_error(path: &Path, e: sled::Error) -> Error {
    match e {
        sled::Error::Io(io) if io.to_string().contains("lock") => refuse(
            path,
            "it is locked: another process (or another open Bus in this process) is using it; \
             shut that one down first",
        ),
        sled::Error::Corruption { .. } => refuse(
            path,
            format!("the store is damaged: its data file `db` holds a damaged entry; {DAMAGED}"),
        ),
        other => refuse(
            path,
            failure::sled_error("opening the store", other).to_string(),
        ),
    }
}
