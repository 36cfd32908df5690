//! `cloister-test-artifacts`: contracts that exist only to be tested against, kept out of the
//! production node's build (as wasmtime keeps its test programs in a crate of their own).

/// Path of the misbehaving contract: it traps, loops, exhausts memory and floods the host on
/// request, to test the runtime's limits (sandbox-limit tests and benchmarks only).
pub const MISBEHAVE_PATH: &str = env!("CLOISTER_WASM_MISBEHAVE");
