//! Builds the kernel programs (agent-ebpf) whenever the agent is built, so
//! nobody ever copies an object by hand. aya-build assumes rustup nightly with
//! `-Z build-std`, which cannot work here (no rust-src); instead we run the
//! eBPF crate's own cargo build with its own .cargo/config.toml, which points
//! at Debian's rustc-web and its prebuilt `core` for bpfel-unknown-none.

#[path = "build/ebpf.rs"]
mod ebpf;

use std::{env, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("agent/ has a parent").to_owned();
    let ebpf_dir = workspace.join("agent-ebpf");
    for watched in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", workspace.join("agent-common/src").display());
    println!("cargo:rerun-if-changed=build/ebpf.rs");
    println!("cargo:rerun-if-changed=proto");

    // Istio's certificate API, compiled in pure Rust (protox) so that no
    // protoc has to be installed; well-known types map to prost-types.
    if let Err(msg) = compile_protos(&manifest_dir) {
        println!("cargo:warning={msg}");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }

    let target_dir = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    match ebpf::build(&workspace, &target_dir) {
        Ok(object) => println!("cargo:rustc-env=SLUICE_EBPF_OBJECT={}", object.display()),
        Err(msg) => {
            println!("cargo:warning={msg}");
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}

fn compile_protos(manifest_dir: &std::path::Path) -> Result<(), String> {
    let proto_dir = manifest_dir.join("proto");
    let fds = protox::compile([proto_dir.join("ca.proto")], [&proto_dir])
        .map_err(|e| format!("compiling {}: {e}", proto_dir.join("ca.proto").display()))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .map_err(|e| format!("generating Rust from {}: {e}", proto_dir.display()))
}
