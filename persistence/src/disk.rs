//! [`DiskGuard`]: the store never fills its disk.
//!
//! The store keeps a *reserve* of free space on the filesystem holding its
//! data directory (default: 5% of the filesystem, at most 256 MiB;
//! [`DiskPolicy`]). The persistence actor measures the free space every
//! 100 ms; in between, each admitted publish lowers the estimate by twice
//! its bytes (what sled writes for it, with room to spare).
//!
//! * Below **twice the reserve**, retention runs in *pressure* mode: it
//!   removes the oldest messages that every consumer group of the topic
//!   has acked, a queue at a time, until there is room again (topics no
//!   group has ever read, dead-letter queues and staged delayed and half
//!   messages are never removed this way: nothing unconsumed goes).
//! * Below **the reserve**, publishes are refused before anything is
//!   stored, with [`Error::StoreFull`] — a typed error the publisher can
//!   shed load on — instead of letting the disk fill and the store fail.
//!   The bus's own writes (positions, retries, dead letters, delayed
//!   messages falling due) go on into the reserve.
//!
//! sled never gives space back to the filesystem; it reuses the space that
//! removed messages leave in its file. So what retention frees counts as
//! room too (half of it, to be safe) until new writes have used it up.
//!
//! An in-memory store has a *memory budget* instead
//! ([`DiskGuard::memory`], `BusBuilder::memory_budget`, default 1 GiB): the
//! same guard, counting the bytes its trees hold instead of the free space
//! of a filesystem. Above three quarters of the budget, pressure retention
//! removes what every group consumed; a publish that would take the store
//! past the budget is refused with [`Error::MemoryFull`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use weirmq_bus::Error;

/// The default reserve: this share of the filesystem...
const DEFAULT_SHARE: f64 = 0.05;
/// ...but at most this much.
const DEFAULT_MAX: u64 = 256 * 1024 * 1024;
/// What a publish of `n` bytes is assumed to take on disk.
const AMPLIFICATION: u64 = 2;

/// How much free space the store keeps on its filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskPolicy {
    /// 5% of the filesystem's size, at most 256 MiB.
    #[default]
    Default,
    /// This many bytes.
    Reserve(u64),
    /// No guard: the store writes until the disk is full, then stops
    /// ([`Error::StoreFailed`]).
    Off,
}

/// What the guard keeps room in.
#[derive(Debug)]
enum Room {
    /// The filesystem holding the data directory.
    Disk(PathBuf),
    /// An in-memory store's budget, and the bytes its trees hold.
    Memory { budget: u64, held: Arc<AtomicU64> },
}

#[derive(Debug)]
struct State {
    room: Room,
    reserve: u64,
    /// Below this much room, retention runs in pressure mode.
    pressure_below: u64,
    /// What a publish of `n` bytes is assumed to take until the next
    /// measurement: `n` times this.
    amplification: u64,
    /// Free bytes on the filesystem (last measurement, lowered by what
    /// was admitted since), plus the room retention freed in the store.
    available: AtomicU64,
    /// Room retention freed inside the store's files, not yet reused.
    slack: AtomicU64,
}

/// The disk guard shared by the broker (admission) and the persistence
/// actor (measurement, pressure). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DiskGuard {
    state: Option<Arc<State>>,
}

impl DiskGuard {
    /// A guard for the store in `dir` (`None`: in memory, or `policy` is
    /// off: no guard).
    pub(crate) fn new(dir: Option<&Path>, policy: DiskPolicy) -> DiskGuard {
        let Some(dir) = dir else {
            return DiskGuard::default();
        };
        let reserve = match policy {
            DiskPolicy::Off => return DiskGuard::default(),
            DiskPolicy::Reserve(n) => n,
            DiskPolicy::Default => {
                let total = fs2::total_space(dir).unwrap_or(0);
                ((total as f64 * DEFAULT_SHARE) as u64).min(DEFAULT_MAX)
            }
        };
        let guard = DiskGuard {
            state: Some(Arc::new(State {
                room: Room::Disk(dir.to_path_buf()),
                reserve,
                pressure_below: reserve.saturating_mul(2),
                amplification: AMPLIFICATION,
                available: AtomicU64::new(u64::MAX),
                slack: AtomicU64::new(0),
            })),
        };
        guard.measure();
        guard
    }

    /// The guard of an in-memory store whose trees count what they hold
    /// in `held`: room is `budget` minus that; pressure below a quarter of
    /// the budget; a publish that does not fit is refused.
    pub(crate) fn memory(budget: u64, held: Arc<AtomicU64>) -> DiskGuard {
        let guard = DiskGuard {
            state: Some(Arc::new(State {
                room: Room::Memory { budget, held },
                reserve: 0,
                pressure_below: budget / 4,
                // The trees hold what was published, plus the overhead
                // the admission already adds per message.
                amplification: 1,
                available: AtomicU64::new(budget),
                slack: AtomicU64::new(0),
            })),
        };
        guard.measure();
        guard
    }

    /// The reserve in bytes, if there is a guard (0 for a memory budget:
    /// its whole budget can be used).
    pub fn reserve(&self) -> Option<u64> {
        self.state.as_ref().map(|s| s.reserve)
    }

    /// The free space the guard counts on (filesystem plus reusable room in
    /// the store), if there is a guard.
    pub fn available(&self) -> Option<u64> {
        self.state
            .as_ref()
            .map(|s| s.available.load(Ordering::Relaxed))
    }

    /// Takes room for a publish of `bytes`, or refuses it with
    /// [`Error::StoreFull`] when the reserve would be touched.
    ///
    /// # Errors
    ///
    /// [`Error::StoreFull`]; nothing was taken then.
    pub fn admit(&self, bytes: u64) -> Result<(), Error> {
        let Some(s) = &self.state else {
            return Ok(());
        };
        let need = bytes.saturating_mul(s.amplification);
        let mut now = s.available.load(Ordering::Relaxed);
        loop {
            if now < s.reserve.saturating_add(need) {
                return Err(match &s.room {
                    Room::Disk(path) => Error::StoreFull {
                        path: path.clone(),
                        available: now,
                        reserve: s.reserve,
                    },
                    Room::Memory { budget, .. } => Error::MemoryFull {
                        budget: *budget,
                        available: now,
                    },
                });
            }
            match s.available.compare_exchange_weak(
                now,
                now - need,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(v) => now = v,
            }
        }
    }

    /// Measures the filesystem again (the persistence actor, every 100 ms).
    pub(crate) fn measure(&self) {
        let Some(s) = &self.state else {
            return;
        };
        match &s.room {
            Room::Disk(path) => {
                if let Ok(free) = fs2::available_space(path) {
                    let room = free.saturating_add(s.slack.load(Ordering::Relaxed));
                    s.available.store(room, Ordering::Relaxed);
                }
            }
            Room::Memory { budget, held } => {
                let room = budget.saturating_sub(held.load(Ordering::Relaxed));
                s.available.store(room, Ordering::Relaxed);
            }
        }
    }

    /// Whether retention should free room (below twice the reserve).
    pub(crate) fn under_pressure(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.available.load(Ordering::Relaxed) < s.pressure_below)
    }

    /// Retention removed `bytes` of messages: half of it counts as room
    /// (in memory: all of it, as the trees count it).
    pub(crate) fn freed(&self, bytes: u64) {
        if let Some(s) = &self.state {
            if let Room::Memory { .. } = s.room {
                self.measure();
                return;
            }
            let room = bytes / 2;
            s.slack.fetch_add(room, Ordering::Relaxed);
            s.available.fetch_add(room, Ordering::Relaxed);
        }
    }

    /// A commit wrote `bytes` of messages: they used up reusable room first.
    pub(crate) fn wrote(&self, bytes: u64) {
        if let Some(s) = &self.state {
            let _ = s
                .slack
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(bytes))
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guard that believes `available` bytes are free (no measurement).
    fn fixed(available: u64, reserve: u64) -> DiskGuard {
        DiskGuard {
            state: Some(Arc::new(State {
                room: Room::Disk(PathBuf::from("/data")),
                reserve,
                pressure_below: reserve * 2,
                amplification: AMPLIFICATION,
                available: AtomicU64::new(available),
                slack: AtomicU64::new(0),
            })),
        }
    }

    #[test]
    fn admission_refuses_inside_the_reserve_and_takes_nothing_then() {
        // Room for 1,000 bytes (x2) above the reserve.
        let g = fixed(12_000, 10_000);
        assert!(g.admit(1_000).is_ok());
        match g.admit(1_000) {
            Err(Error::StoreFull {
                reserve, available, ..
            }) => assert_eq!((reserve, available), (10_000, 10_000)),
            other => panic!("{other:?}"),
        }
        assert!(g.under_pressure());
        let before = g.available().unwrap();
        assert!(g.admit(10).is_err());
        assert_eq!(g.available().unwrap(), before, "a refusal takes nothing");
        // Freed room counts (half of it).
        g.freed(4_000);
        assert!(g.admit(1_000).is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(DiskGuard::new(None, DiskPolicy::Default)
            .admit(u64::MAX)
            .is_ok());
        assert!(DiskGuard::new(Some(dir.path()), DiskPolicy::Off)
            .admit(u64::MAX)
            .is_ok());
    }

    #[test]
    fn a_memory_budget_refuses_what_does_not_fit_and_counts_what_is_freed() {
        let held = Arc::new(AtomicU64::new(0));
        let g = DiskGuard::memory(10_000, held.clone());
        assert!(!g.under_pressure());
        assert!(g.admit(8_000).is_ok()); // taken until measured
        match g.admit(2_001) {
            Err(Error::MemoryFull { budget, available }) => {
                assert_eq!((budget, available), (10_000, 2_000))
            }
            other => panic!("{other:?}"),
        }
        assert!(g.under_pressure());
        // The store holds less than was assumed: measured, there is room.
        held.store(5_000, Ordering::Relaxed);
        g.measure();
        assert_eq!(g.available(), Some(5_000));
        assert!(!g.under_pressure());
        assert!(g.admit(2_000).is_ok());
        held.store(8_000, Ordering::Relaxed);
        g.measure();
        assert!(g.under_pressure());
        // Retention removed 6,000: the trees count it, all of it is room.
        held.store(2_000, Ordering::Relaxed);
        g.freed(6_000);
        assert_eq!(g.available(), Some(8_000));
    }

    #[test]
    fn the_default_reserve_is_five_percent_at_most_256_mib() {
        let dir = tempfile::tempdir().unwrap();
        let total = fs2::total_space(dir.path()).unwrap();
        let g = DiskGuard::new(Some(dir.path()), DiskPolicy::Default);
        assert_eq!(
            g.reserve(),
            Some(((total as f64 * 0.05) as u64).min(256 * 1024 * 1024))
        );
    }
}
