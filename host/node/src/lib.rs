//! `cloister-node`: the Cloister node. It is the only crate that wires the others together: it
//! opens the store, the ledger and the Raft log, runs the governance engine and the write
//! sequencer, attests joining nodes, signs the ledger, and serves REST and gRPC. See
//! ARCHITECTURE.md for the map.

pub mod api;
pub mod attest;
pub mod config;
pub mod endorsed;
pub mod gov;
pub mod metrics;
pub mod node;
mod recovery;
mod signer;

pub use node::Node;

/// The state database in a node's data folder.
pub fn state_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("state.redb")
}

/// Whether a data folder already holds a node's state: its Raft log, or a state database that
/// has applied an entry.
pub fn holds_state(data_dir: &std::path::Path) -> bool {
    // A log or a state that cannot be read counts as state: nothing is started over it.
    cloister_consensus::log_begun(data_dir).unwrap_or(true)
        || cloister_consensus::state_begun(&state_file(data_dir)).unwrap_or(true)
}
