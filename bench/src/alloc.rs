//! The harness's allocator: jemalloc, or the system's (glibc malloc) with
//! `WEIRMQ_BENCH_ALLOCATOR=system`, chosen once at the first allocation
//! and reported in every result line (`"allocator"`).
//!
//! Why it matters (BENCHMARKS.md, "The allocator"): a message bus
//! allocates on one thread (the publisher's) and frees on another (the
//! consumer's); glibc's malloc then takes the owning arena's lock on every
//! such free, and the in-memory end-to-end scenarios spent ~15% of their
//! samples waking and waiting on those locks. The allocator is the
//! application's choice (a library cannot set it), so the harness measures
//! what a service that picks one gets, and either can be measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const JEMALLOC: u8 = 1;
const SYSTEM: u8 = 2;

static CHOICE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// jemalloc's options, read by jemalloc at its start (its `malloc_conf`;
/// `_RJEM_MALLOC_CONF` in the environment still overrides them): unused
/// pages go back to the system after ~1 s instead of 10 s. With the
/// default, `peak_shaving/drain_rss` peaked at 136-140 MiB against its
/// 141 MiB bound (the freed write-phase pages were still held); with this,
/// 102-116 MiB, at 0.94-1.03x the throughput in alternating runs
/// (BENCHMARKS.md, "The allocator").
#[repr(transparent)]
pub(super) struct MallocConf(*const std::ffi::c_char);

// SAFETY: a pointer to a constant string, never written.
unsafe impl Sync for MallocConf {}

#[unsafe(export_name = "_rjem_malloc_conf")]
pub(super) static MALLOC_CONF: MallocConf =
    MallocConf(c"dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// jemalloc unless `WEIRMQ_BENCH_ALLOCATOR=system`; fixed for the process.
pub(super) struct Switch;

#[inline]
fn choice() -> u8 {
    let c = CHOICE.load(Ordering::Relaxed);
    if c != UNKNOWN {
        return c;
    }
    // Read without allocating (we are inside the allocator): getenv hands
    // back a pointer into the environment. Threads racing here read the
    // same environment and store the same value.
    let name = c"WEIRMQ_BENCH_ALLOCATOR";
    // SAFETY: `name` is NUL-terminated; the result is NULL or a
    // NUL-terminated string in the environment, read before any thread of
    // the harness changes it (none does).
    let system = unsafe {
        let v = libc::getenv(name.as_ptr());
        !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"system"
    };
    let c = if system { SYSTEM } else { JEMALLOC };
    CHOICE.store(c, Ordering::Relaxed);
    c
}

/// The allocator this process uses, as reported in the result lines.
pub(super) fn name() -> &'static str {
    match choice() {
        SYSTEM => "system",
        _ => "jemalloc",
    }
}

/// The allocator chosen for this process.
#[inline]
fn chosen() -> &'static dyn GlobalAlloc {
    static JE: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
    if choice() == SYSTEM {
        &System
    } else {
        &JE
    }
}

// SAFETY: every call goes to the allocator chosen at the first call, which
// never changes afterwards, so each block is freed by the allocator that
// made it; both delegates uphold `GlobalAlloc`'s contract.
unsafe impl GlobalAlloc for Switch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { chosen().alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { chosen().alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { chosen().dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { chosen().realloc(ptr, layout, new_size) }
    }
}
