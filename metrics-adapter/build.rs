//! Generates the KEDA external scaler's prost messages and tonic server/client from the vendored
//! `proto/externalscaler.proto`, with the `protoc` binary shipped in the protoc-bin-vendored crate (no system protoc
//! needed). The client has no transport code: tests bring their own channel.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/externalscaler.proto";
    println!("cargo:rerun-if-changed={proto}");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_with_config(config, &[proto], &["proto"])?;
    Ok(())
}
