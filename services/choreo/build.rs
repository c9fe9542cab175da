//! Compiles the platform's own protos (the event envelope and the
//! dead-letter API every service serves) with protox, so no machine needs
//! `protoc`, and writes their descriptor set for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/choreo");
    let mut compiler = protox::Compiler::new(["../../proto"])?;
    compiler
        .include_imports(true)
        .open_files(["choreo/v1/envelope.proto", "choreo/v1/dead_letters.proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("choreo_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
