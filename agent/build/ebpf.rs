// Shared by agent/build.rs and `cargo xtask build-ebpf` (included with
// `#[path]`), so both build the kernel object the one same way.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Where the object lands: under the workspace target dir, in
/// `ebpf/bpfel-unknown-none/release/`.
pub fn object_path(target_dir: &Path) -> PathBuf {
    target_dir.join("ebpf/bpfel-unknown-none/release/sluice-ebpf")
}

/// What the BPF build needs that this machine lacks, each with its package.
pub fn missing_toolchain() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/rustc").is_file() || !Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").is_dir() {
        missing.push("Debian's rustc-web with the BPF core (packages rustc-web, libstd-rust-web-dev-bpf)");
    }
    let on_path =
        env::var_os("PATH").map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file())).unwrap_or(false);
    if !on_path && !cargo_bin_dir().join("bpf-linker").is_file() {
        missing.push("bpf-linker 0.13 built against LLVM 22");
    }
    missing
}

pub fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default()
        .join("bin")
}

/// Runs the eBPF crate's own cargo build (its .cargo/config.toml selects the
/// target, Debian's rustc and bpf-linker). Returns the object path.
pub fn build(workspace: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let missing = missing_toolchain();
    if !missing.is_empty() {
        return Err(format!("the eBPF toolchain is missing: {}. Run `cargo xtask setup` first.", missing.join("; ")));
    }
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace.join("agent-ebpf"))
        .args(["build", "--release", "--ignore-rust-version", "--target-dir"])
        .arg(target_dir.join("ebpf"));
    // The outer build's target, compiler wrapper and flags must not leak into
    // a build for another target with another compiler.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
        {
            cmd.env_remove(key);
        }
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    dirs.push(cargo_bin_dir());
    cmd.env("PATH", env::join_paths(dirs).map_err(|e| e.to_string())?);
    let status = cmd.status().map_err(|e| format!("could not start cargo for agent-ebpf: {e}"))?;
    if !status.success() {
        return Err("building the eBPF programs in agent-ebpf/ failed (see the errors above)".into());
    }
    Ok(object_path(target_dir))
}
