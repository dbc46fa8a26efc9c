//! `cargo xtask <task>`: the project's own automation, in Rust so it runs
//! wherever cargo does. Every task says what it is doing and fails with a
//! message that names the step.

mod bench;
mod fuzz;
mod setup;
mod soak;
mod test;
mod vm;

#[path = "../../agent/build/ebpf.rs"]
mod ebpf;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (Debian packages, bpf-linker, bpffs).
    Setup,
    /// Build the eBPF object alone, into target/ebpf/bpfel-unknown-none/release/.
    BuildEbpf,
    /// Set up, build, then run the whole test suite (root tests must run as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the demo on a simulated node.
    Demo,
    /// Build in release mode and run a benchmark (as root), e.g. `tunnel`:
    /// direct vs through Sluice, printed as a table with targets.
    Bench {
        /// Which benchmark: tunnel (HBONE vs direct), redirect (iptables vs eBPF vs direct) or discovery (Kubernetes discovery at scale).
        what: String,
        /// Extra arguments for sluice-bench (after `--`), e.g. `--quick`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Load and leaks (as root): 10,000 connections held through one agent
    /// and 200,000 short ones, every byte checked; fails unless the agents'
    /// fds, RSS and eBPF map entries come back within 10%.
    Soak {
        /// CI size: 1,000 held and 10,000 short connections.
        #[arg(long)]
        short: bool,
        /// Capture mode: iptables, ebpf or both.
        #[arg(long, default_value = "both")]
        mode: String,
        /// cross (node1 -> node2 over HBONE), same (one node; the splice in eBPF mode) or both.
        #[arg(long, default_value = "both")]
        path: String,
        /// Use debug binaries (as `cargo xtask test` builds them) instead of a release build.
        #[arg(long)]
        debug: bool,
        /// Extra arguments for sluice-soak run (after `--`), e.g. `--concurrent 5000`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run each cargo-fuzz target in fuzz/ for N seconds (stable toolchain,
    /// RUSTC_BOOTSTRAP=1); fails on any crash, hang or leak.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only this target (repeatable); default: every target in fuzz/.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// address (ASan, the default) or none.
        #[arg(long, default_value = "address")]
        sanitizer: String,
    },
    /// Boot pinned Debian kernels under qemu and run the checks on each (the kernel matrix).
    VmTest {
        /// Which kernels: 5.10, 6.1, 6.12 (comma-separated) or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Seconds each kernel gets from boot to power-off before it counts as
        /// hung. A kernel takes 3–5 minutes under TCG, most of it the tunnel
        /// checks (two nodes, both capture modes, debug builds).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Kernels booted at the same time (each is one single-threaded TCG vCPU).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Do not run: print the last run's table (target/vm-test/matrix.md), e.g. for the README.
        #[arg(long)]
        print: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf().map(|p| println!("eBPF object: {}", p.display())),
        Task::Test { args } => test::run(&args),
        Task::Demo => demo(),
        Task::Bench { what, args } => bench::run(&what, &args),
        Task::Soak { short, mode, path, debug, args } => {
            soak::run(&soak::Options { short, mode, path, debug, extra: args })
        }
        Task::Fuzz { seconds, targets, sanitizer } => fuzz::run(&fuzz::Options { seconds, targets, sanitizer }),
        Task::VmTest { kernel, timeout, jobs, print } => vm::run(&vm::Options { kernel, timeout, jobs, print }),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ has a parent").to_owned()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

fn build_ebpf() -> Result<PathBuf> {
    step("building the eBPF object");
    ebpf::build(&workspace(), &target_dir()).map_err(anyhow::Error::msg)
}

/// Prints a progress line, so a long run shows where it is.
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Runs a command to completion; the error names the step and the command.
pub fn exec(step_name: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("{step_name}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{step_name}: {cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the agent and the harness binaries (demo, peer, bench); returns
/// the directory they are in.
pub fn build_bins(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace()).args([
        "build",
        "--quiet",
        "-p",
        "sluice",
        "-p",
        "sluice-cni",
        "-p",
        "sluice-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    exec("build", &mut cmd)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

fn demo() -> Result<()> {
    setup::run()?;
    step("building sluice and the demo");
    build_bins(false)?;
    step("running the demo");
    exec("demo", Command::new(target_dir().join("debug/sluice-demo")).current_dir(workspace()))
}
