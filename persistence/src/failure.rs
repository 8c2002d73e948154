//! Storage failures in plain words.
//!
//! sled's own `Display` shows the `Debug` form of what is inside it (`IO
//! error: Os { code: 28, kind: StorageFull, .. }`, `Read corrupted data at
//! file offset Some(Inline(520)) backtrace ()`). Every sled and I/O error
//! the store reports goes through [`sled`] or [`io`] here, which keep the
//! cause (an I/O error stays reachable through `source()`), describe it in
//! words, and add what to do when the cause tells.

use std::fmt;

use weirmq_bus::StorageError;

/// A sled failure, described in words.
#[derive(Debug)]
pub(crate) struct SledFailure {
    text: String,
    io: Option<std::io::Error>,
}

impl fmt::Display for SledFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for SledFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// An I/O error in words. sled sometimes wraps an OS error in a new
/// `io::Error` whose message is the OS error's `Debug` (`Os { code: 28, ..
/// }`): the OS error is found again and described by the OS.
fn io_words(io: &std::io::Error) -> String {
    if let Some(code) = io.raw_os_error() {
        return std::io::Error::from_raw_os_error(code).to_string();
    }
    let text = io.to_string();
    if let Some(at) = text.find("code: ") {
        let digits: String = text[at + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(code) = digits.parse() {
            return std::io::Error::from_raw_os_error(code).to_string();
        }
    }
    if text.contains("kind: ") || text.contains(" { ") {
        return io.kind().to_string();
    }
    text
}

/// What to tell a user whose store met this I/O error.
pub(crate) fn io_advice(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::StorageFull | K::QuotaExceeded => {
            "the disk is full: free space on the filesystem holding the data directory"
        }
        K::PermissionDenied | K::ReadOnlyFilesystem => {
            "the data directory cannot be written: check its permissions and that its \
             filesystem is mounted read-write"
        }
        K::NotFound => {
            "a file of the store is missing: was the data directory moved or cleaned while \
             the bus ran? Restore it from a backup"
        }
        _ => return None,
    })
}

/// The advice for a damaged store.
pub(crate) const DAMAGED: &str = "restore the data directory from a backup, or move it aside \
     to start with an empty store";

/// Maps a sled error met while doing `context` to a plain [`StorageError`].
pub(crate) fn sled(context: &str) -> impl FnOnce(sled::Error) -> StorageError + '_ {
    move |e| sled_error(context, e)
}

/// A sled error met while doing `context`, in plain words.
pub(crate) fn sled_error(context: &str, e: sled::Error) -> StorageError {
    let (text, io, advice) = match e {
        sled::Error::Io(io) => {
            let advice = io_advice(io.kind()).map(str::to_string).unwrap_or_else(|| {
                "check the disk and the system log (dmesg) for I/O errors".to_string()
            });
            (io_words(&io), Some(io), advice)
        }
        sled::Error::Corruption { .. } => (
            "the data file holds a damaged entry".to_string(),
            None,
            DAMAGED.to_string(),
        ),
        sled::Error::CollectionNotFound(name) => (
            format!("the store has no tree `{}`", String::from_utf8_lossy(&name)),
            None,
            DAMAGED.to_string(),
        ),
        sled::Error::Unsupported(what) => (
            format!("sled does not support this: {what}"),
            None,
            "report it to the weirmq developers".to_string(),
        ),
        sled::Error::ReportableBug(what) => (
            format!("sled hit an internal bug: {what}"),
            None,
            "report it to the weirmq developers, with the log".to_string(),
        ),
    };
    StorageError::new(context.to_string(), SledFailure { text, io }).with_advice(advice)
}

/// Maps an I/O error met while doing `context` to a [`StorageError`].
pub(crate) fn io(context: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| {
        let advice = io_advice(e.kind());
        let err = StorageError::new(context.to_string(), e);
        match advice {
            Some(a) => err.with_advice(a),
            None => err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_errors_read_plainly() {
        let full = std::io::Error::from_raw_os_error(28);
        let e = sled_error("flushing the store", sled::Error::Io(full));
        let text = e.to_string();
        assert_eq!(
            text,
            "flushing the store: No space left on device (os error 28); the disk is full: \
             free space on the filesystem holding the data directory"
        );
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::StorageFull));
        // sled's own wrapping: an io::Error whose message is Debug of the OS one.
        let wrapped = std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("{:?}", std::io::Error::from_raw_os_error(28)),
        );
        let text = sled_error("flushing the store", sled::Error::Io(wrapped)).to_string();
        assert!(
            text.starts_with("flushing the store: No space left on device (os error 28);"),
            "{text}"
        );
        let e = sled_error(
            "reading the queue log",
            sled::Error::Corruption { at: None, bt: () },
        );
        let text = e.to_string();
        assert!(
            text.contains("damaged entry") && text.contains("backup"),
            "{text}"
        );
        assert!(!text.contains("backtrace"), "{text}");
    }
}
