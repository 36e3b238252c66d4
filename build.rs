//! Compiles the protobuf contract under `proto/` with protox (pure Rust, so no system `protoc` is
//! needed) and writes the encoded descriptor set that server reflection serves.

use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(proto_root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptor_set = protox::compile(&files, [proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("cx_gateway_descriptor.bin"),
        descriptor_set.encode_to_vec(),
    )?;

    // The google.rpc error details are described to reflection clients (so grpcurl can decode
    // them) but not generated: tonic-types already provides their Rust types.
    let error_details = Path::new("proto-deps/google/rpc/error_details.proto");
    println!("cargo:rerun-if-changed={}", error_details.display());
    let error_details_set = protox::compile([error_details], [Path::new("proto-deps")])?;
    std::fs::write(
        out_dir.join("google_rpc_error_details_descriptor.bin"),
        error_details_set.encode_to_vec(),
    )?;

    // Which generated messages are requests and which are responses, so the one codec of the
    // generated servers and clients can tell a caller's malformed request (its mistake,
    // INVALID_ARGUMENT) from a reply that does not decode (the server's fault, INTERNAL).
    std::fs::write(
        out_dir.join("cx_gateway_message_roles.rs"),
        message_roles(&descriptor_set),
    )?;

    tonic_prost_build::configure()
        // Decode failures become the gateway's own errors (see `grpc::codec`).
        .codec_path("crate::grpc::codec::GatewayCodec")
        // RPCs that a build does not implement yet answer UNIMPLEMENTED instead of failing to compile.
        .generate_default_stubs(true)
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptor_set)?;
    Ok(())
}

/// `impl MessageRole for X` for the input and output message of every method of the package's
/// services (all in `cx.gateway.v1`, so their Rust names are the plain message names).
fn message_roles(descriptor_set: &prost_types::FileDescriptorSet) -> String {
    let mut roles = std::collections::BTreeMap::new();
    for file in &descriptor_set.file {
        for service in &file.service {
            for method in &service.method {
                for (type_name, role) in [
                    (method.input_type(), "Request"),
                    (method.output_type(), "Response"),
                ] {
                    let name = type_name.rsplit('.').next().unwrap_or(type_name);
                    // A message that one RPC takes and another returns (none today) counts as a
                    // request: a caller's malformed copy of it is then the caller's mistake.
                    let entry = roles.entry(name.to_owned()).or_insert(role);
                    if role == "Request" {
                        *entry = role;
                    }
                }
            }
        }
    }
    roles
        .into_iter()
        .map(|(name, role)| {
            format!(
                "impl crate::grpc::codec::MessageRole for {name} {{\n    \
                 const ROLE: crate::grpc::codec::Role = crate::grpc::codec::Role::{role};\n}}\n"
            )
        })
        .collect()
}

fn collect_protos(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    Ok(())
}
