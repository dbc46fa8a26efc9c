//! `cargo xtask setup`: brings a fresh machine of this kind to where the
//! build and the tests can run. Each step checks first and does only what is
//! still missing.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{ebpf, exec, step};

/// Debian packages: the BPF compiler and its core, LLVM 22 for bpf-linker,
/// and the tools the tests drive (bpftool, iptables, iproute2, tcpdump, iperf3).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "tcpdump",
    "iperf3",
    "curl",
    // The reference CNI plugins (bridge, host-local, loopback) the CNI chain tests run with.
    "containernetworking-plugins",
    // cargo xtask vm-test: the kernel matrix under qemu, with a busybox initramfs
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    apt_packages()?;
    bpf_linker()?;
    bpffs()?;
    eprintln!("==> setup: everything is in place");
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("setup: packages {} are missing and installing them needs root", missing.join(" "));
    }
    step(&format!("setup: installing Debian packages {}", missing.join(" ")));
    exec("setup: apt-get update", Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        "setup: apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker() -> Result<()> {
    let bin = ebpf::cargo_bin_dir().join("bpf-linker");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    step(&format!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 75 s)"));
    // /usr/bin/llvm-config is LLVM 14; LLVM 22's must come first on PATH.
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    exec(
        "setup: cargo install bpf-linker",
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path),
    )
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        bail!("setup: /sys/fs/bpf does not exist; is sysfs mounted?");
    }
    if !nix_is_root() {
        eprintln!(
            "==> setup: bpffs is not mounted at /sys/fs/bpf and mounting it needs root; root tests will be skipped"
        );
        return Ok(());
    }
    step("setup: mounting bpffs at /sys/fs/bpf");
    exec("setup: mount bpffs", Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

pub fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
