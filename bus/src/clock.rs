//! [`Clock`]: the one source of time for every time-driven part of the
//! embedded backend — retries, delayed messages, transaction checks,
//! consume timeouts, rate limits, retention, the times it stores.
//!
//! In production it is the system clock (`SystemTime` for stored times,
//! tokio timers for waits). A **manual** clock ([`Clock::manual`]) stands
//! still until it is moved ([`Clock::jump_to`]): its waits are kept in
//! deadline order and become ready only when the clock passes them, so a
//! test drives hours of schedule in milliseconds, the same way every run.
//! `weirmq::testing` builds its `TestBus` on one.
//!
//! A manual clock also counts *activity*: the broker's actors call
//! [`Clock::touch`] as they handle work, so a test harness can tell a bus
//! that has settled (no touch across several scheduler passes) from one
//! that is still busy. On the system clock `touch` does nothing.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the bus reads the time and waits for it. Cheap to clone; clones of
/// a manual clock share its time.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use weirmq_bus::Clock;
///
/// let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
/// let t0 = clock.now_ms();
/// clock.jump_to(clock.now() + Duration::from_secs(90));
/// assert_eq!(clock.now_ms() - t0, 90_000);
/// assert!(Clock::system().now_ms() > 1_700_000_000_000);
/// ```
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

/// Two clocks are equal when both are the system clock or both are the
/// same manual clock.
impl PartialEq for Clock {
    fn eq(&self, other: &Clock) -> bool {
        match (&self.manual, &other.manual) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::System"),
            Some(m) => f
                .debug_struct("Clock::Manual")
                .field("now_ms", &crate::unix_ms(m.now()))
                .field("timers", &m.lock().timers.len())
                .finish(),
        }
    }
}

struct Manual {
    state: Mutex<State>,
    activity: AtomicU64,
}

struct State {
    /// Since the Unix epoch.
    now: Duration,
    /// Waiting sleeps by (deadline, registration order).
    timers: BTreeMap<(Duration, u64), Waker>,
    next_id: u64,
}

impl Manual {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> SystemTime {
        UNIX_EPOCH + self.lock().now
    }
}

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A manual clock reading `start` until it is moved.
    pub fn manual(start: SystemTime) -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                state: Mutex::new(State {
                    now: start.duration_since(UNIX_EPOCH).unwrap_or_default(),
                    timers: BTreeMap::new(),
                    next_id: 0,
                }),
                activity: AtomicU64::new(0),
            })),
        }
    }

    /// Whether this is a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// Now.
    pub fn now(&self) -> SystemTime {
        match &self.manual {
            None => SystemTime::now(),
            Some(m) => m.now(),
        }
    }

    /// Now, in Unix milliseconds (how the bus stores times).
    pub fn now_ms(&self) -> u64 {
        crate::unix_ms(self.now())
    }

    /// A future ready `d` from now (on a manual clock: once the clock has
    /// been moved that far).
    pub fn sleep(&self, d: Duration) -> Sleep {
        match &self.manual {
            None => Sleep(SleepInner::System(Box::pin(tokio::time::sleep(d)))),
            Some(m) => {
                let deadline = m.lock().now + d;
                Sleep(SleepInner::Manual {
                    clock: m.clone(),
                    deadline,
                    id: None,
                    polled: false,
                })
            }
        }
    }

    /// Records that the bus did some work (manual clocks only; see the
    /// module's documentation). Cheap.
    pub fn touch(&self) {
        if let Some(m) = &self.manual {
            m.activity.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many times [`touch`](Self::touch) and the clock's own timers
    /// recorded work (0 on the system clock).
    pub fn activity(&self) -> u64 {
        self.manual
            .as_ref()
            .map_or(0, |m| m.activity.load(Ordering::Relaxed))
    }

    /// A manual clock's earliest waiting deadline (`None` on the system
    /// clock or when nothing waits).
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let m = self.manual.as_ref()?;
        let s = m.lock();
        s.timers.keys().next().map(|(d, _)| UNIX_EPOCH + *d)
    }

    /// How many sleeps wait on a manual clock (0 on the system clock).
    pub fn waiting(&self) -> usize {
        self.manual.as_ref().map_or(0, |m| m.lock().timers.len())
    }

    /// Moves a manual clock to `t` (never back: an earlier `t` leaves it
    /// where it is) and wakes every sleep due by then, in deadline order.
    /// Does nothing on the system clock.
    pub fn jump_to(&self, t: SystemTime) {
        let Some(m) = &self.manual else {
            return;
        };
        let t = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let due: Vec<Waker> = {
            let mut s = m.lock();
            if t > s.now {
                s.now = t;
            }
            let now = s.now;
            let later = s.timers.split_off(&(now + Duration::from_nanos(1), 0));
            std::mem::replace(&mut s.timers, later)
                .into_values()
                .collect()
        };
        if !due.is_empty() {
            m.activity.fetch_add(1, Ordering::Relaxed);
        }
        for w in due {
            w.wake();
        }
    }
}

/// The future of [`Clock::sleep`].
pub struct Sleep(SleepInner);

enum SleepInner {
    System(Pin<Box<tokio::time::Sleep>>),
    Manual {
        clock: Arc<Manual>,
        deadline: Duration,
        /// Its entry among the clock's timers, while it waits.
        id: Option<u64>,
        /// Whether it was polled before.
        polled: bool,
    },
}

impl std::fmt::Debug for Sleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            SleepInner::System(_) => f.write_str("Sleep::System"),
            SleepInner::Manual { deadline, .. } => f
                .debug_struct("Sleep::Manual")
                .field("deadline", deadline)
                .finish(),
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            SleepInner::System(s) => s.as_mut().poll(cx),
            SleepInner::Manual {
                clock,
                deadline,
                id,
                polled,
            } => {
                let first = !std::mem::replace(polled, true);
                let mut s = clock.lock();
                if let Some(i) = id.take() {
                    s.timers.remove(&(*deadline, i));
                }
                if s.now >= *deadline {
                    if first {
                        // Due at once (a zero wait): yield once, as a
                        // runtime timer does, so a loop of zero waits
                        // cannot starve its thread.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    // Work the clock caused: a harness waiting for idle sees it.
                    clock.activity.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(());
                }
                let i = s.next_id;
                s.next_id += 1;
                s.timers.insert((*deadline, i), cx.waker().clone());
                *id = Some(i);
                Poll::Pending
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let SleepInner::Manual {
            clock,
            deadline,
            id: Some(i),
            ..
        } = &self.0
        {
            clock.lock().timers.remove(&(*deadline, *i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(s: &mut Sleep, w: &Arc<Count>) -> bool {
        let waker = Waker::from(w.clone());
        Pin::new(s)
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
    }

    #[test]
    fn a_manual_sleep_is_ready_only_when_the_clock_passes_its_deadline() {
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(100));
        let w = Arc::new(Count(AtomicUsize::new(0)));
        let mut a = clock.sleep(Duration::from_secs(10));
        let mut b = clock.sleep(Duration::from_secs(5));
        assert!(!poll(&mut a, &w) && !poll(&mut b, &w));
        assert_eq!(clock.waiting(), 2);
        assert_eq!(
            clock.next_deadline(),
            Some(UNIX_EPOCH + Duration::from_secs(105))
        );
        clock.jump_to(UNIX_EPOCH + Duration::from_secs(104));
        assert_eq!(w.0.load(Ordering::SeqCst), 0);
        clock.jump_to(UNIX_EPOCH + Duration::from_secs(105));
        assert_eq!(w.0.load(Ordering::SeqCst), 1);
        assert!(poll(&mut b, &w) && !poll(&mut a, &w));
        // Never back.
        clock.jump_to(UNIX_EPOCH);
        assert_eq!(clock.now_ms(), 105_000);
        drop(a);
        assert_eq!(clock.waiting(), 0, "a dropped sleep leaves no timer");
    }

    #[test]
    fn a_zero_sleep_is_ready_at_once_and_touch_counts() {
        let clock = Clock::manual(UNIX_EPOCH);
        let w = Arc::new(Count(AtomicUsize::new(0)));
        let mut zero = clock.sleep(Duration::ZERO);
        assert!(!poll(&mut zero, &w), "yields once");
        assert_eq!(w.0.load(Ordering::SeqCst), 1, "and wakes itself");
        assert!(poll(&mut zero, &w));
        let before = clock.activity();
        clock.touch();
        assert_eq!(clock.activity(), before + 1);
        Clock::system().touch();
        assert_eq!(Clock::system().activity(), 0);
    }
}
