//! The guest's global allocator: an arena that lives exactly as long as the instance.
//!
//! The node runs every request in a fresh instance and throws the instance away afterwards, so
//! freeing memory one allocation at a time is wasted work: a general-purpose allocator (dlmalloc,
//! talc) spent about a fifth of the reconcile contract's run time in its bookkeeping. The arena
//! hands out memory by bumping a pointer, grows linear memory in chunks, reuses space only when
//! the most recent allocation is freed or resized (the common `Vec` growth pattern), and returns
//! null when the node's memory cap is reached, which the node reports as `MemoryLimitExceeded`.
//!
//! Its first chunk is a zeroed static in the module's own memory (bss: no bytes in the module
//! file, no page touched until used), so a request that stays within it never grows memory. A
//! grown instance costs the node an `mprotect` on the way up, and another with a TLB shootdown
//! across every core when its slot is shrunk back for the next request.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::{Cell, UnsafeCell};

const PAGE_BYTES: usize = 64 << 10;
/// Linear memory is grown at least this many pages at a time.
const GROW_PAGES_MIN: usize = 16;
/// The arena's first chunk, part of the module's initial memory.
const FIRST_CHUNK_BYTES: usize = GROW_PAGES_MIN * PAGE_BYTES;

#[repr(align(16))]
struct FirstChunk(UnsafeCell<[u8; FIRST_CHUNK_BYTES]>);

// SAFETY: as for `Arena`: contracts run single-threaded, and only the arena hands out its bytes.
unsafe impl Sync for FirstChunk {}

static FIRST_CHUNK: FirstChunk = FirstChunk(UnsafeCell::new([0; FIRST_CHUNK_BYTES]));

pub struct Arena {
    next: Cell<usize>,
    end: Cell<usize>,
}

// SAFETY: contracts run single-threaded (the node disables wasm threads), so the cells are never
// accessed concurrently.
unsafe impl Sync for Arena {}

impl Arena {
    pub const fn new() -> Self {
        Arena { next: Cell::new(0), end: Cell::new(0) }
    }

    /// Makes room for `bytes` more at `align`, growing memory; returns the start, or `None`.
    fn reserve(&self, bytes: usize, align: usize) -> Option<usize> {
        let start = self.next.get().checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(bytes)?;
        if end <= self.end.get() && self.end.get() != 0 {
            return Some(start);
        }
        if self.end.get() == 0 {
            let first = FIRST_CHUNK.0.get() as usize;
            self.next.set(first);
            self.end.set(first + FIRST_CHUNK_BYTES);
            return self.reserve(bytes, align);
        }
        let pages = bytes.checked_add(align)?.div_ceil(PAGE_BYTES).max(GROW_PAGES_MIN);
        let previous = core::arch::wasm32::memory_grow(0, pages);
        if previous == usize::MAX {
            return None;
        }
        let fresh = previous * PAGE_BYTES;
        if fresh != self.end.get() {
            // Memory grew elsewhere (or this is the first chunk): start over in the new region.
            self.next.set(fresh);
        }
        self.end.set(fresh + pages * PAGE_BYTES);
        self.reserve(bytes, align)
    }
}

impl Default for Arena {
    fn default() -> Self {
        Arena::new()
    }
}

// SAFETY: every pointer returned lies in the first chunk or in linear memory the arena obtained
// from memory.grow, and is never handed out twice; alignment is honoured by `reserve`.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.reserve(layout.size(), layout.align()) {
            Some(start) => {
                self.next.set(start + layout.size());
                start as *mut u8
            }
            None => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ptr as usize + layout.size() == self.next.get() {
            self.next.set(ptr as usize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let start = ptr as usize;
        let is_last = start + layout.size() == self.next.get();
        if is_last && start + new_size <= self.end.get() {
            self.next.set(start + new_size);
            return ptr;
        }
        if new_size <= layout.size() {
            return ptr;
        }
        // SAFETY: the caller guarantees `layout.align()` is valid and `new_size` non-zero.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as for `alloc`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both regions are valid for `layout.size()` bytes and do not overlap: the
            // new one lies beyond the arena's previous end of allocations.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size()) };
        }
        new
    }
}
