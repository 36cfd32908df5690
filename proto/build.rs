//! Compiles `cloister/*.proto` with protox (pure Rust, no protoc) and generates tonic code. The
//! encoded descriptor set is written for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] =
    &["cloister/app.proto", "cloister/reconcile.proto", "cloister/raft.proto", "cloister/gov.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=cloister");
    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    std::fs::write(out_dir.join("cloister_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
