//! `cloister-sdk`: write Cloister contracts in Rust.
//!
//! A contract is a `cdylib` built with `cargo build --target wasm32-wasip1 --release`. It declares
//! its endpoints with a [`Router`], keeps its state in typed [`Map`]s, and emits the wasm exports
//! with [`export!`]. The node runs each request in a fresh sandboxed instance; the handler's writes
//! form one transaction, committed only when it answers 2xx. The same crate builds natively, where
//! [`testing::MemoryHost`] stands in for the node. `cloister-abi` (and its `ABI.md`) is the wire-level contract.
//!
//! A complete contract, with its test:
//!
//! ```
//! use cloister_sdk::{export, Error, Map, Request, Response, Router};
//!
//! /// Notes per caller, private to the app (no `public:` prefix, so sealed in the ledger).
//! const NOTES: Map<String, String> = Map::new("notes");
//!
//! fn put_note(req: &Request) -> Result<Response, Error> {
//!     let text = req.text()?;
//!     if text.is_empty() {
//!         return Err(Error::bad_request("a note cannot be empty"));
//!     }
//!     NOTES.insert(&req.caller().id, &text.to_owned());
//!     Ok(Response::status(204))
//! }
//!
//! fn get_note(req: &Request) -> Result<Response, Error> {
//!     let note = NOTES.get(&req.caller().id).ok_or_else(|| Error::not_found("no note yet"))?;
//!     Ok(Response::text(note))
//! }
//!
//! pub fn router() -> Router {
//!     Router::new().post("/note", put_note).get("/note", get_note)
//! }
//!
//! export!(router);
//!
//! // A native unit test through the in-memory host:
//! use cloister_sdk::{testing::MemoryHost, Caller};
//! let mut host = MemoryHost::new(router());
//! let alice = Caller::user("alice");
//! assert_eq!(host.call(&alice, "GET", "/note", "").head.status, 404);
//! assert_eq!(host.call(&alice, "POST", "/note", "hello").head.status, 204);
//! assert_eq!(host.call(&alice, "GET", "/note", "").body, b"hello");
//! assert_eq!(host.call(&Caller::user("bob"), "GET", "/note", "").head.status, 404);
//! ```

mod entry;
mod http;
mod kv;
mod router;
mod sys;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use cloister_abi::{Auth, Caller, CallerKind, Mode, abi, gov};
pub use http::{Error, Request, Response};
pub use kv::{Iter, Key, KeyPart, Map, raw};
pub use router::{Handler, Router};

#[cfg(not(target_arch = "wasm32"))]
pub use entry::call_native;
#[cfg(not(target_arch = "wasm32"))]
pub use sys::Backend;

/// The identity of the current request's caller, as the host reports it.
pub fn caller() -> Caller {
    serde_json::from_slice(&sys::caller_json()).expect("the host reports the caller as JSON")
}

/// Logs a message to the node's log, tagged with the request id.
pub fn log(level: log::Level, message: &str) {
    sys::log_message(level as i32, message)
}

/// Log levels for [`log()`](fn@log).
pub mod log {
    /// How severe a log message is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(i32)]
    pub enum Level {
        Error = crate::abi::LOG_ERROR,
        Warn = crate::abi::LOG_WARN,
        Info = crate::abi::LOG_INFO,
        Debug = crate::abi::LOG_DEBUG,
    }
}

#[cfg(all(target_arch = "wasm32", feature = "allocator"))]
mod arena;

#[cfg(all(target_arch = "wasm32", feature = "allocator"))]
#[global_allocator]
static ALLOCATOR: arena::Arena = arena::Arena::new();

#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::entry::wasm::{alloc, handle, manifest};
}
