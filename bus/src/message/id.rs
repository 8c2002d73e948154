//! [`MessageId`]: unique, time-ordered message ids.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::time::now_ms;

/// A message id: unique and time-ordered.
///
/// 128 bits: 48 bits of Unix milliseconds, 32 random bits chosen once per
/// process, and a 48-bit per-process counter. Ids from one process sort in
/// publish order; ids from different processes sort by millisecond. Shown as
/// 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub(super) u128);

static ID_COUNTER: AtomicU64 = AtomicU64::new(0);
static ID_PROCESS: OnceLock<u32> = OnceLock::new();

impl MessageId {
    /// A fresh id.
    pub fn generate() -> MessageId {
        let process = *ID_PROCESS.get_or_init(|| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(now_ms() as u128);
            h.write_u32(std::process::id());
            h.finish() as u32
        });
        let seq = ID_COUNTER.fetch_add(1, Ordering::Relaxed) & ((1 << 48) - 1);
        let ms = now_ms() & ((1 << 48) - 1);
        MessageId(((ms as u128) << 80) | ((process as u128) << 48) | seq as u128)
    }

    /// The id as a number.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// An id from its numeric form.
    pub fn from_u128(v: u128) -> MessageId {
        MessageId(v)
    }

    /// The millisecond (Unix time) the id was generated in.
    pub fn timestamp_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(MessageId)
    }
}
