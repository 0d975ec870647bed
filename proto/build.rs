//! Compiles `proto/freshet.proto` with a pure-Rust protobuf compiler, so building needs no
//! `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/freshet.proto");
    let fds = protox::compile(["freshet.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
