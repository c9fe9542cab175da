//! Compiles the event envelope (the only proto the platform library owns) with
//! protox, so no machine needs `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/choreo");
    let fds = protox::compile(["choreo/v1/envelope.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
