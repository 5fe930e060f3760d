//! Compiles proto/switchyard/v1/*.proto with protox (no system protoc) and
//! writes the encoded descriptor set that gRPC reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "switchyard/v1/common.proto",
    "switchyard/v1/device.proto",
    "switchyard/v1/action.proto",
    "switchyard/v1/errors.proto",
    "switchyard/v1/admin.proto",
    "switchyard/v1/event.proto",
    "switchyard/v1/webhook.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=switchyard");
    let fds = protox::compile(PROTOS, ["."])?;

    // prost-build does not write the descriptor set when given one, and
    // reflection needs it: write it ourselves.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("switchyard_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    let mut config = tonic_prost_build::Config::new();
    // Type URLs must be type.googleapis.com/switchyard.v1.X, or clients in
    // other languages cannot resolve our error details.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    // Deterministic encoding of map fields: idempotency compares request
    // bytes.
    config.btree_map(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::Codec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
