//! Builds workspace contracts to wasm32-wasip1 from a build script, so `cargo build` and `cargo
//! test` need no manual step. `cloister-bundled` (the contracts the node ships) and
//! `cloister-test-artifacts` (test-only contracts) call [`build`] from their build scripts.
//!
//! The wasm lands in `<target>/contracts/wasm32-wasip1/contract/`, and each path is exported to
//! the calling crate as `CLOISTER_WASM_<NAME>`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `contracts` (package names in the workspace at `workspace`) and exports their paths.
/// Call it from a build script; it panics with the build's own error when the build fails.
pub fn build(workspace: &Path, contracts: &[&str]) {
    for watched in ["contracts", "guest-sdk", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    // A separate target directory: the outer build holds the lock on its own.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("contracts");

    ensure_wasm_target();
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--profile", "contract", "--target", "wasm32-wasip1"])
        .arg("--target-dir")
        .arg(&target_dir);
    for name in contracts {
        cmd.args(["-p", name]);
    }
    // Flags and wrappers meant for the host build (clippy's driver, host rustflags) must not
    // reach the wasm build.
    for var in
        ["RUSTC_WORKSPACE_WRAPPER", "CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"]
    {
        cmd.env_remove(var);
    }
    let output = cmd.output().expect("running cargo to build the contracts");
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("wasm32-wasip1") && stderr.contains("not be installed") {
            "\nThe wasm32-wasip1 target is missing: rust-toolchain.toml normally installs it; \
             otherwise run `rustup target add wasm32-wasip1`."
        } else {
            ""
        };
        panic!("building the contracts for wasm32-wasip1 failed:\n{stderr}{hint}");
    }
    for name in contracts {
        let wasm = target_dir.join("wasm32-wasip1/contract").join(format!("{name}.wasm"));
        assert!(wasm.exists(), "the contract build did not produce {}", wasm.display());
        println!("cargo:rustc-env=CLOISTER_WASM_{}={}", name.to_uppercase(), wasm.display());
    }
}

/// rust-toolchain.toml names the wasm32-wasip1 target, but rustup adds listed targets only when it
/// installs the toolchain itself. On a machine whose stable toolchain predates the checkout, add
/// the target here, once, so `cargo test` needs no manual step.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(&rustc).args(["--print", "sysroot"]).output() else {
        return;
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if sysroot.join("lib/rustlib/wasm32-wasip1").exists() {
        return;
    }
    let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") else {
        return; // Not a rustup toolchain: the build below explains what is missing.
    };
    println!("cargo:warning=installing the wasm32-wasip1 target for {toolchain} (rustup target add)");
    let status = Command::new("rustup").args(["target", "add", "wasm32-wasip1", "--toolchain", &toolchain]).status();
    if !matches!(status, Ok(s) if s.success()) {
        println!("cargo:warning=`rustup target add wasm32-wasip1` failed; the contract build will say why");
    }
}
