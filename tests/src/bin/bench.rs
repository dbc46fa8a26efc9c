//! `sluice-bench`: what Sluice costs on the wire, run by `cargo xtask bench`.
//!
//! `sluice-bench tunnel` builds two nodes with an enrolled pod each, measures
//! throughput (iperf3, 1 and 4 streams), 1-byte request/response latency and
//! new connections per second first directly (no agents) and then through
//! two `sluice run` agents, and prints a markdown table: direct, sluice, the
//! ratio (or added microseconds), the target and PASS/MISS. The same goes to
//! target/bench/tunnel.json. A missed target is reported, not an error.
//! Needs root; build in release mode for figures that mean anything.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use sluice_tests::bench::{report, tunnel};

#[derive(Parser)]
#[command(name = "sluice-bench", about = "Sluice benchmarks (run by `cargo xtask bench`)")]
struct Cli {
    /// Which benchmark: `tunnel`.
    what: String,
    /// Where the JSON goes (default: <target>/bench/<what>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Short runs, to try the bench out; the figures are rough.
    #[arg(long)]
    quick: bool,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("sluice-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.what != "tunnel" {
        bail!("unknown benchmark {:?}; known: tunnel", cli.what);
    }
    let cfg = if cli.quick { tunnel::Config::quick() } else { tunnel::Config::full() };
    let r = tunnel::run(&cfg)?;
    let out = match cli.out {
        Some(p) => p,
        None => default_out(&cli.what)?,
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&r)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "## sluice-bench tunnel: node1/client -> node2/server, {} CPUs, kernel {}{}\n",
        r.cpus,
        r.kernel,
        if cli.quick { " (--quick)" } else { "" }
    );
    print!("{}", report::markdown(&r.rows));
    println!(
        "\nagents: iptables capture, HBONE over mTLS between nodes; {:.0} s in all; JSON: {}",
        r.elapsed_s,
        out.display()
    );
    Ok(())
}

/// `<target>/bench/<what>.json`, `<target>` being two levels above this
/// binary (target/release/sluice-bench).
fn default_out(what: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let target =
        exe.parent().and_then(|p| p.parent()).context("sluice-bench is not inside a target dir; pass --out")?;
    Ok(target.join("bench").join(format!("{what}.json")))
}
