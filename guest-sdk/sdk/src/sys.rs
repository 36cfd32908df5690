//! The host interface: wasm imports on `wasm32`, a pluggable [`Backend`] everywhere else.
//!
//! Everything above this module is target-independent, so a contract's native unit tests run the
//! very same code as the wasm build.

use std::ops::Bound;

#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;

#[cfg(not(target_arch = "wasm32"))]
pub use native::Backend;

/// The bounds of a scan, as byte strings.
pub(crate) struct ScanBounds {
    pub lower: Bound<Vec<u8>>,
    pub upper: Bound<Vec<u8>>,
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::ScanBounds;
    use crate::abi;
    use std::ops::Bound;

    #[link(wasm_import_module = "cloister")]
    unsafe extern "C" {
        fn kv_get(map: *const u8, map_len: usize, key: *const u8, key_len: usize) -> i64;
        fn kv_put(map: *const u8, map_len: usize, key: *const u8, key_len: usize, val: *const u8, val_len: usize);
        fn kv_remove(map: *const u8, map_len: usize, key: *const u8, key_len: usize) -> i32;
        fn kv_scan(
            map: *const u8,
            map_len: usize,
            lower: *const u8,
            lower_len: usize,
            upper: *const u8,
            upper_len: usize,
            flags: i32,
        ) -> i32;
        fn kv_next(scan: i32) -> i64;
        fn take(dst: *mut u8, len: usize);
        fn caller() -> i64;
        fn log(level: i32, msg: *const u8, len: usize);
        fn abort(msg: *const u8, len: usize) -> !;
    }

    /// Copies the host's register into a fresh buffer of the announced length.
    fn take_register(len: i64) -> Vec<u8> {
        let len = len as usize;
        let mut buf = Vec::<u8>::with_capacity(len);
        // SAFETY: `buf` has capacity for `len` bytes; `take` writes exactly `len` bytes (the
        // register's length, which the host announced) or traps, so they are initialised after.
        unsafe {
            take(buf.as_mut_ptr(), len);
            buf.set_len(len);
        }
        buf
    }

    pub(crate) fn get(map: &str, key: &[u8]) -> Option<Vec<u8>> {
        // SAFETY: both slices are valid for reads of their lengths for the call's duration.
        let len = unsafe { kv_get(map.as_ptr(), map.len(), key.as_ptr(), key.len()) };
        (len != abi::NONE).then(|| take_register(len))
    }

    pub(crate) fn put(map: &str, key: &[u8], value: &[u8]) {
        // SAFETY: all three slices are valid for reads of their lengths for the call's duration.
        unsafe { kv_put(map.as_ptr(), map.len(), key.as_ptr(), key.len(), value.as_ptr(), value.len()) }
    }

    pub(crate) fn remove(map: &str, key: &[u8]) -> bool {
        // SAFETY: both slices are valid for reads of their lengths for the call's duration.
        unsafe { kv_remove(map.as_ptr(), map.len(), key.as_ptr(), key.len()) == 1 }
    }

    /// An open scan; the host keeps its cursor.
    pub(crate) struct Scan(i32);

    pub(crate) fn scan(map: &str, bounds: ScanBounds) -> Scan {
        let mut flags = 0;
        let lower: &[u8] = match &bounds.lower {
            Bound::Included(k) => {
                flags |= abi::SCAN_LOWER;
                k
            }
            Bound::Excluded(k) => {
                flags |= abi::SCAN_LOWER | abi::SCAN_LOWER_EXCLUSIVE;
                k
            }
            Bound::Unbounded => &[],
        };
        let upper: &[u8] = match &bounds.upper {
            Bound::Included(k) => {
                flags |= abi::SCAN_UPPER | abi::SCAN_UPPER_INCLUSIVE;
                k
            }
            Bound::Excluded(k) => {
                flags |= abi::SCAN_UPPER;
                k
            }
            Bound::Unbounded => &[],
        };
        // SAFETY: all slices are valid for reads of their lengths for the call's duration.
        let handle = unsafe {
            kv_scan(map.as_ptr(), map.len(), lower.as_ptr(), lower.len(), upper.as_ptr(), upper.len(), flags)
        };
        Scan(handle)
    }

    pub(crate) fn next(scan: &mut Scan) -> Option<(Vec<u8>, Vec<u8>)> {
        // SAFETY: `kv_next` takes a plain handle.
        let len = unsafe { kv_next(scan.0) };
        if len == abi::NONE {
            return None;
        }
        let mut buf = take_register(len);
        let key_len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        let value = buf.split_off(4 + key_len);
        buf.drain(..4);
        Some((buf, value))
    }

    pub(crate) fn caller_json() -> Vec<u8> {
        // SAFETY: `caller` takes no arguments.
        let len = unsafe { caller() };
        take_register(len)
    }

    pub(crate) fn log_message(level: i32, msg: &str) {
        // SAFETY: `msg` is valid for reads of its length for the call's duration.
        unsafe { log(level, msg.as_ptr(), msg.len()) }
    }

    pub(crate) fn abort_with(msg: &str) -> ! {
        // SAFETY: `msg` is valid for reads of its length; `abort` never returns.
        unsafe { abort(msg.as_ptr(), msg.len()) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use super::ScanBounds;
    use std::cell::RefCell;
    use std::ops::Bound;
    use std::rc::Rc;

    /// What a native build of a contract talks to instead of the wasm imports.
    ///
    /// [`crate::testing::MemoryHost`] implements it for unit tests; the node implements it over
    /// its own KV transactions to benchmark contracts compiled natively.
    pub trait Backend {
        fn get(&self, map: &str, key: &[u8]) -> Option<Vec<u8>>;
        fn put(&self, map: &str, key: &[u8], value: &[u8]);
        fn remove(&self, map: &str, key: &[u8]) -> bool;
        /// The first entry of `map` within the bounds, in key order.
        fn first_in(&self, map: &str, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> Option<(Vec<u8>, Vec<u8>)>;
        fn caller_json(&self) -> Vec<u8>;
        fn log(&self, level: i32, msg: &str);
    }

    thread_local! {
        static BACKEND: RefCell<Option<Rc<dyn Backend>>> = const { RefCell::new(None) };
    }

    /// Runs `f` with `backend` serving the contract's host calls on this thread.
    pub(crate) fn with_backend<R>(backend: Rc<dyn Backend>, f: impl FnOnce() -> R) -> R {
        struct Reset(Option<Rc<dyn Backend>>);
        impl Drop for Reset {
            fn drop(&mut self) {
                BACKEND.with(|b| *b.borrow_mut() = self.0.take());
            }
        }
        let previous = BACKEND.with(|b| b.borrow_mut().replace(backend));
        let _reset = Reset(previous);
        f()
    }

    fn backend() -> Rc<dyn Backend> {
        BACKEND
            .with(|b| b.borrow().clone())
            .expect("a contract's host call ran outside a host: use cloister_sdk::testing::MemoryHost")
    }

    pub(crate) fn get(map: &str, key: &[u8]) -> Option<Vec<u8>> {
        backend().get(map, key)
    }

    pub(crate) fn put(map: &str, key: &[u8], value: &[u8]) {
        backend().put(map, key, value)
    }

    pub(crate) fn remove(map: &str, key: &[u8]) -> bool {
        backend().remove(map, key)
    }

    /// An open scan; natively the SDK keeps the cursor itself.
    pub(crate) struct Scan {
        map: String,
        bounds: ScanBounds,
    }

    pub(crate) fn scan(map: &str, bounds: ScanBounds) -> Scan {
        Scan { map: map.to_owned(), bounds }
    }

    pub(crate) fn next(scan: &mut Scan) -> Option<(Vec<u8>, Vec<u8>)> {
        let (key, value) = backend().first_in(
            &scan.map,
            scan.bounds.lower.as_ref().map(Vec::as_slice),
            scan.bounds.upper.as_ref().map(Vec::as_slice),
        )?;
        scan.bounds.lower = Bound::Excluded(key.clone());
        Some((key, value))
    }

    pub(crate) fn caller_json() -> Vec<u8> {
        backend().caller_json()
    }

    pub(crate) fn log_message(level: i32, msg: &str) {
        backend().log(level, msg)
    }
}
