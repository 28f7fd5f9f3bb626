//! Proto codegen with pure-Rust `protox`: no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/agenthub/v1/hub.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_file(proto)?
        .file_descriptor_set();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("agenthub_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Messages and the client, as usual.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds.clone())?;
    // The server, reusing those messages, except that the watch stream sends
    // events already encoded once (shared by every watcher): `EventBytes`.
    let server_dir = out.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_dir)
        .extern_path(".agenthub.v1.TaskEvent", "crate::pb::wire::EventBytes")
        .extern_path(".agenthub.v1", "crate::pb")
        .compile_fds(fds)?;
    Ok(())
}
