//! Retry policies: how long a failed delivery waits, and when to give up.
//!
//! A policy lives above the `Broker` seam: the subscriber applies it to each
//! failure and tells the backend either `Nack { delay }` or `DeadLetter`.
//! Backends never decide it, so every backend retries the same way.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How the wait before each retry grows.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Backoff {
    /// The n-th retry waits `delays[n - 1]`; retries past the end reuse the
    /// last delay.
    Schedule(Vec<Duration>),
    /// The n-th retry waits `initial × multiplier^(n-1)`, at most `max`.
    Exponential {
        /// The first wait.
        initial: Duration,
        /// Growth per retry (≥ 1).
        multiplier: f64,
        /// The longest wait.
        max: Duration,
    },
    /// Every retry waits the same.
    Fixed(Duration),
}

/// When and how often a failed delivery is tried again.
///
/// `max_attempts` counts deliveries: a message is delivered at most that many
/// times, then dead-lettered. The default is RocketMQ's: 16 retries (17
/// deliveries) after 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use weirmq_bus::RetryPolicy;
///
/// let p = RetryPolicy::default();
/// assert_eq!(p.max_attempts(), 17);
/// assert_eq!(p.delay_after(1), Some(Duration::from_secs(10)));
/// assert_eq!(p.delay_after(16), Some(Duration::from_secs(7200)));
/// assert_eq!(p.delay_after(17), None); // dead-letter
///
/// let fast = RetryPolicy::exponential(Duration::from_millis(100), 2.0, Duration::from_secs(1))
///     .with_max_attempts(5);
/// assert_eq!(fast.delay_after(3), Some(Duration::from_millis(400)));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_attempts: u32,
    jitter: f64,
}

const MINUTE: u64 = 60;

impl Default for RetryPolicy {
    fn default() -> Self {
        let secs = [
            10,
            30,
            MINUTE,
            2 * MINUTE,
            3 * MINUTE,
            4 * MINUTE,
            5 * MINUTE,
            6 * MINUTE,
            7 * MINUTE,
            8 * MINUTE,
            9 * MINUTE,
            10 * MINUTE,
            20 * MINUTE,
            30 * MINUTE,
            60 * MINUTE,
            120 * MINUTE,
        ];
        RetryPolicy::schedule(secs.iter().map(|s| Duration::from_secs(*s)).collect())
    }
}

impl RetryPolicy {
    /// Retries after each delay of `delays` in turn: `delays.len()` retries,
    /// so `delays.len() + 1` deliveries at most.
    pub fn schedule(delays: Vec<Duration>) -> Self {
        let max_attempts = delays.len() as u32 + 1;
        RetryPolicy {
            backoff: Backoff::Schedule(delays),
            max_attempts,
            jitter: 0.0,
        }
    }

    /// Retries after the same `delay` each time; `max_attempts` deliveries.
    pub fn fixed(delay: Duration, max_attempts: u32) -> Self {
        RetryPolicy {
            backoff: Backoff::Fixed(delay),
            max_attempts,
            jitter: 0.0,
        }
    }

    /// Retries after `initial`, then `multiplier` times longer each time, at
    /// most `max`; 17 deliveries unless changed with
    /// [`RetryPolicy::with_max_attempts`].
    pub fn exponential(initial: Duration, multiplier: f64, max: Duration) -> Self {
        RetryPolicy {
            backoff: Backoff::Exponential {
                initial,
                multiplier: if multiplier.is_finite() {
                    multiplier.max(1.0)
                } else {
                    1.0
                },
                max,
            },
            max_attempts: 17,
            jitter: 0.0,
        }
    }

    /// Never retries: the first failure dead-letters.
    pub fn none() -> Self {
        RetryPolicy::fixed(Duration::ZERO, 1)
    }

    /// Sets the most deliveries (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Spreads each wait by up to ±`fraction` (0 to 1) at random, so messages
    /// that failed together do not all come back together.
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The most deliveries of one message.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// How long to wait after delivery `attempt` (1-based) failed, or `None`
    /// when that was the last attempt and the message goes to the
    /// dead-letter queue.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let n = attempt.max(1);
        let base = match &self.backoff {
            Backoff::Fixed(d) => *d,
            Backoff::Schedule(delays) => match delays.len() {
                0 => Duration::ZERO,
                len => delays[(n as usize - 1).min(len - 1)],
            },
            Backoff::Exponential {
                initial,
                multiplier,
                max,
            } => {
                let factor = multiplier.powi((n - 1).min(1024) as i32);
                let secs = (initial.as_secs_f64() * factor).min(max.as_secs_f64());
                Duration::from_secs_f64(secs.max(0.0))
            }
        };
        if self.jitter == 0.0 || base.is_zero() {
            return Some(base);
        }
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(attempt);
        let u = (h.finish() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        let factor = 1.0 + self.jitter * (2.0 * u - 1.0);
        Some(base.mul_f64(factor.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_rocketmq_schedule() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=16)
            .map(|a| p.delay_after(a).unwrap().as_secs())
            .collect();
        assert_eq!(
            waits,
            vec![10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200]
        );
        assert_eq!(p.delay_after(17), None);
    }

    #[test]
    fn fixed_exponential_and_jitter() {
        let f = RetryPolicy::fixed(Duration::from_millis(50), 3);
        assert_eq!(f.delay_after(1), Some(Duration::from_millis(50)));
        assert_eq!(f.delay_after(2), Some(Duration::from_millis(50)));
        assert_eq!(f.delay_after(3), None);
        let e =
            RetryPolicy::exponential(Duration::from_millis(100), 2.0, Duration::from_millis(500));
        let waits: Vec<u128> = (1..=5)
            .map(|a| e.delay_after(a).unwrap().as_millis())
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        let j = RetryPolicy::fixed(Duration::from_millis(1000), 100).with_jitter(0.2);
        for a in 1..50 {
            let d = j.delay_after(a).unwrap().as_millis();
            assert!((800..=1200).contains(&d), "{d}");
        }
        assert_eq!(RetryPolicy::none().delay_after(1), None);
    }
}
