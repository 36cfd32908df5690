//! The Cloister node. See ARCHITECTURE.md for the map of its modules.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod consensus;
pub mod gov;
pub mod kv;
pub mod ledger;
pub mod node;
pub mod txid;
pub mod wasm;

/// Contracts built from this workspace by the build script.
pub mod bundled {
    /// The data reconciliation app, installed by `cloister sandbox`.
    pub const RECONCILE: &[u8] = include_bytes!(env!("CLOISTER_WASM_RECONCILE"));
    /// The default constitution, installed at genesis unless the configuration names another.
    pub const CONSTITUTION: &[u8] = include_bytes!(env!("CLOISTER_WASM_CONSTITUTION"));
    /// Path of the misbehaving test contract (sandbox-limit tests and benchmarks only).
    pub const MISBEHAVE_PATH: &str = env!("CLOISTER_WASM_MISBEHAVE");
}
