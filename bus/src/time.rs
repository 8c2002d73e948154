//! Wall-clock time as the bus stores it: Unix milliseconds.
//!
//! Every stored time (birth, due, failure, dead-lettering, trace events) is
//! Unix ms in a `u64`; these are the only conversions, shared by every
//! backend.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// `t` in Unix milliseconds (0 for a time before 1970).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `t` in Unix milliseconds, rounded up: a due time computed with it is
/// never early.
pub fn unix_ms_ceil(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros().div_ceil(1000) as u64)
}

/// The instant `ms` Unix milliseconds name.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_to_the_millisecond() {
        let t = from_unix_ms(1_796_220_189_123);
        assert_eq!(unix_ms(t), 1_796_220_189_123);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        let t = UNIX_EPOCH + Duration::from_micros(1_001);
        assert_eq!((unix_ms(t), unix_ms_ceil(t)), (1, 2));
        assert!(now_ms() > 1_700_000_000_000);
    }
}
