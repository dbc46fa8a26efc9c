//! Builds the kernel programs (agent-ebpf) whenever the agent is built, so
//! nobody ever copies an object by hand. aya-build assumes rustup nightly with
//! `-Z build-std`, which cannot work here (no rust-src); instead we run the
//! eBPF crate's own cargo build with its own .cargo/config.toml, which points
//! at Debian's rustc-web and its prebuilt `core` for bpfel-unknown-none.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().expect("agent/ has a parent");
    let ebpf_dir = workspace.join("agent-ebpf");
    for watched in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            ebpf_dir.join(watched).display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("agent-common/src").display()
    );

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("ebpf");
    let object = target_dir.join("bpfel-unknown-none/release/sluice-ebpf");
    check_toolchain();

    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--ignore-rust-version",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's settings (target, rustc wrapper, flags) must not leak
    // into a build for another target with another compiler.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("could not start cargo for agent-ebpf: {e}")));
    if !status.success() {
        fail("building the eBPF programs in agent-ebpf/ failed (see the errors above)");
    }
    println!("cargo:rustc-env=SLUICE_EBPF_OBJECT={}", object.display());
}

/// Fails early, with the fix, when the machine lacks what the BPF build needs.
fn check_toolchain() {
    let core = Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib");
    let linker = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false)
        || home_cargo_bin("bpf-linker").is_file();
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/rustc").is_file() || !core.is_dir() {
        missing.push("Debian's rustc-web with the BPF core (libstd-rust-web-dev-bpf)");
    }
    if !linker {
        missing.push("bpf-linker 0.13 built against LLVM 22");
    }
    if !missing.is_empty() {
        fail(&format!(
            "the eBPF toolchain is missing: {}. Run `cargo xtask setup` first.",
            missing.join(", ")
        ));
    }
}

fn home_cargo_bin(name: &str) -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default()
        .join("bin")
        .join(name)
}

fn fail(msg: &str) -> ! {
    println!("cargo:warning={msg}");
    eprintln!("error: {msg}");
    std::process::exit(1);
}
