//! `cloister-bundled`: the contracts built from this workspace that the node and the CLI ship.

/// The data reconciliation app, installed by `cloister sandbox`.
pub const RECONCILE: &[u8] = include_bytes!(env!("CLOISTER_WASM_RECONCILE"));
/// The bank-consortium sample app, installed by `cloister sandbox --app banking`.
pub const BANKING: &[u8] = include_bytes!(env!("CLOISTER_WASM_BANKING"));
/// The minimal key-value store, installed by `cloister sandbox --app kv`, for benchmarks against etcd.
pub const KV: &[u8] = include_bytes!(env!("CLOISTER_WASM_KV"));
/// The default constitution, installed at genesis unless the configuration names another.
pub const CONSTITUTION: &[u8] = include_bytes!(env!("CLOISTER_WASM_CONSTITUTION"));
