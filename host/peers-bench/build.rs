//! Compiles the benchmark's slice of etcd's v3 API with protox (pure Rust, no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.open_files(["etcd.proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
