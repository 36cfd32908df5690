//! `cloister-test-support`: what the property tests of Cloister's parsers share.
//!
//! Every parser of untrusted bytes has a property test beside it (`fuzz` modules) that holds: any
//! input is refused with an error, never a panic, and never makes the parser allocate beyond its
//! limit. [`TrackingAllocator`] measures the last part. The quick pass runs with the unit tests
//! ([`cases`] each); `just fuzz` runs 1,000,000 cases per target (`CLOISTER_FUZZ_CASES`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub use proptest;

/// Cases per property when `CLOISTER_FUZZ_CASES` is not set: the quick pass CI runs.
pub const CASES_DEFAULT: u32 = 256;

/// How many cases each property runs: `CLOISTER_FUZZ_CASES`, or [`CASES_DEFAULT`].
pub fn cases() -> u32 {
    std::env::var("CLOISTER_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(CASES_DEFAULT)
}

/// A proptest configuration with [`cases`] cases and no persisted failure files.
pub fn config() -> proptest::test_runner::Config {
    proptest::test_runner::Config { cases: cases(), failure_persistence: None, ..Default::default() }
}

thread_local! {
    // Const-initialised and destructor-free, so the allocator can touch it without allocating.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, recording on each thread the largest single allocation it makes.
/// Install it in a test binary with `#[global_allocator]`.
pub struct TrackingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping touches only
// a const-initialised thread-local cell, which neither allocates nor can fail.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which `System::alloc` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: the caller upholds `realloc`'s contract, which `System::realloc` shares.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn record(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

/// Runs `f` and returns its result with the largest single allocation this thread made meanwhile
/// (0 unless [`TrackingAllocator`] is the global allocator).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LARGEST.with(|l| l.replace(0));
    let result = f();
    let largest = LARGEST.with(|l| l.replace(before.max(l.get())));
    (result, largest)
}
