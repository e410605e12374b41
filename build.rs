//! Compiles proto/keel.proto with protox (a protobuf compiler in pure Rust), so a fresh machine
//! needs no protoc binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/keel.proto");
    let fds = protox::compile(["keel.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
