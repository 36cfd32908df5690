//! Compiles `cloister/*.proto` with protox (pure Rust, no protoc) and generates tonic code. The
//! encoded descriptor set is written for gRPC server reflection.
//!
//! The `Reconcile` server is generated a second time, into `bounded/`, with `IngestRequest`
//! mapped to `EncodedRecords` (see `src/encoded_records.rs`): the node serves that one, so a
//! request is held as its bytes until the node has bounded what it turns them into. Clients
//! keep prost's own types.

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

    let bounded = out_dir.join("bounded");
    std::fs::create_dir_all(&bounded)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&bounded)
        .extern_path(".cloister.reconcile.v1.IngestRequest", "crate::reconcile::EncodedRecords")
        .extern_path(".cloister.reconcile.v1", "crate::reconcile::v1")
        .compile_fds(protox::compile(["cloister/reconcile.proto"], ["."])?)?;
    Ok(())
}
