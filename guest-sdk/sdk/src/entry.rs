//! The glue behind [`crate::export!`]: the wasm exports, and the same dispatch for native hosts.

use crate::abi::{self, RequestHead};
use crate::http::{Error, Request};
use crate::router::Router;

/// Decodes a framed request, runs it through the router and returns the framed response.
fn run(router: &Router, envelope: &[u8]) -> Vec<u8> {
    let response = match abi::unframe::<RequestHead>(envelope) {
        Ok((head, body)) => router.dispatch(&Request::new(head, body.to_vec())),
        Err(e) => Error::bad_request(format!("malformed request envelope: {e}")).into(),
    };
    abi::frame(&response.head, &response.body)
}

#[cfg(target_arch = "wasm32")]
pub mod wasm {
    use super::*;

    /// Hands the host a buffer of exactly `len` bytes; ownership passes to `handle`.
    pub fn alloc(len: u32) -> u32 {
        let buf = Box::<[u8]>::new_uninit_slice(len as usize);
        Box::into_raw(buf) as *mut u8 as u32
    }

    fn leak(bytes: Vec<u8>) -> u64 {
        let buf = bytes.into_boxed_slice();
        let len = buf.len() as u64;
        let ptr = Box::into_raw(buf) as *mut u8 as u64;
        (ptr << 32) | len
    }

    pub fn handle(router: &Router, ptr: u32, len: u32) -> u64 {
        std::panic::set_hook(Box::new(|info| {
            crate::sys::abort_with(&format!("guest panicked: {info}"));
        }));
        let slice = std::ptr::slice_from_raw_parts_mut(ptr as *mut u8, len as usize);
        // SAFETY: `ptr` came from `alloc(len)`, which leaked a boxed slice of exactly `len` bytes,
        // and the host wrote all `len` bytes before calling `handle`, once.
        let envelope = unsafe { Box::from_raw(slice) };
        leak(run(router, &envelope))
    }

    pub fn manifest(router: &Router) -> u64 {
        leak(serde_json::to_vec(&router.manifest()).expect("manifests always serialize"))
    }
}

/// Runs a contract natively against a [`crate::sys::Backend`], as a host would run its wasm.
///
/// A panic in the handler becomes a 500 response naming the panic, as a trap does in wasm.
#[cfg(not(target_arch = "wasm32"))]
pub fn call_native(
    router: &Router,
    backend: std::rc::Rc<dyn crate::sys::Backend>,
    head: &RequestHead,
    body: &[u8],
) -> crate::http::Response {
    let envelope = abi::frame(head, body);
    let outcome = crate::sys::with_backend(backend, || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(router, &envelope)))
    });
    match outcome {
        Ok(framed) => {
            let (head, body) = abi::unframe(&framed).expect("run() frames its response");
            crate::http::Response { head, body: body.to_vec() }
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic payload");
            Error::new(500, "GuestPanic", format!("guest panicked: {msg}")).into()
        }
    }
}

/// Emits the wasm exports of ABI v1 for a function returning the contract's [`Router`].
///
/// On non-wasm targets it emits nothing, so the same crate builds natively for unit tests.
#[macro_export]
macro_rules! export {
    ($router:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            pub extern "C" fn cloister_abi_v1() {}

            #[unsafe(no_mangle)]
            pub extern "C" fn alloc(len: u32) -> u32 {
                $crate::__private::alloc(len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn handle(ptr: u32, len: u32) -> u64 {
                $crate::__private::handle(&$router(), ptr, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn manifest() -> u64 {
                $crate::__private::manifest(&$router())
            }
        };
    };
}
