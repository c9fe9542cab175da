//! Compiles every business contract under proto/ (event payloads and the four
//! gRPC APIs) with protox, so no machine needs `protoc`, and writes the
//! descriptor set that gRPC reflection serves.
use std::path::PathBuf;

const PROTOS: [&str; 5] = [
    "events/v1/events.proto",
    "order/v1/order.proto",
    "inventory/v1/inventory.proto",
    "shipping/v1/shipping.proto",
    "notification/v1/notification.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let mut compiler = protox::Compiler::new(["../../proto"])?;
    compiler.include_imports(true).open_files(PROTOS)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
