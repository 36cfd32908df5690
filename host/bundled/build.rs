//! Builds the contracts this crate embeds (see `cloister-wasm-build`).

fn main() {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest_dir.ancestors().nth(2).expect("this crate sits in host/ of the workspace");
    cloister_wasm_build::build(workspace, &["reconcile", "banking", "kv", "constitution"]);
}
