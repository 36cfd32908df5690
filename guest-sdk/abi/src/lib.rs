//! `cloister-abi`: the wire-level contract between a Cloister node and the contracts it runs.
//!
//! Both sides import this crate and nothing else of each other: the guest through `cloister-sdk`,
//! the node directly. `ABI.md` is the prose; [`abi`] holds every export and import name, the
//! request envelope, the manifest and the map rules; [`gov`] holds the governance records the
//! constitution writes and the node reads.

/// Property tests measure their allocations (see `cloister-test-support`).
#[cfg(test)]
#[global_allocator]
static ALLOC: cloister_test_support::TrackingAllocator = cloister_test_support::TrackingAllocator;

pub mod abi;
pub mod gov;

pub use abi::{Auth, Caller, CallerKind, Mode};
