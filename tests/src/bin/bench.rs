//! `sluice-bench`: what Sluice costs on the wire, run by `cargo xtask bench`.
//!
//! `sluice-bench tunnel` builds two nodes with an enrolled pod each, measures
//! throughput (iperf3, 1 and 4 streams), 1-byte request/response latency and
//! new connections per second first directly (no agents) and then through
//! two `sluice run` agents, and prints a markdown table: direct, sluice, the
//! ratio (or added microseconds), the target and PASS/MISS. The same goes to
//! target/bench/tunnel.json. A missed target is reported, not an error.
//!
//! `sluice-bench redirect` measures same-node and cross-node throughput and
//! 1-byte RR four ways: direct, iptables capture, eBPF capture with the
//! splice off (HBONE on both paths), and eBPF with the same-node splice on
//! (shown for same-node only), each as a ratio to direct, with the agents'
//! CPU per GB; the JSON goes to target/bench/redirect.json.
//! Needs root; build in release mode for figures that mean anything.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use sluice_tests::bench::{discovery, redirect, report, tunnel};

#[derive(Parser)]
#[command(name = "sluice-bench", about = "Sluice benchmarks (run by `cargo xtask bench`)")]
struct Cli {
    /// Which benchmark: `tunnel`, `redirect` or `discovery`.
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
    let out = match &cli.out {
        Some(p) => p.clone(),
        None => default_out(&cli.what)?,
    };
    let quick = if cli.quick { " (--quick)" } else { "" };
    match cli.what.as_str() {
        "tunnel" => {
            let cfg = if cli.quick { tunnel::Config::quick() } else { tunnel::Config::full() };
            let r = tunnel::run(&cfg)?;
            write_json(&out, &r)?;
            println!(
                "## sluice-bench tunnel: node1/client -> node2/server, {} CPUs, kernel {}{quick}\n",
                r.host.cpus, r.host.kernel
            );
            print!("{}", report::markdown(&r.rows));
            println!(
                "\nagents: iptables capture, HBONE over mTLS between nodes; {:.0} s in all; JSON: {}",
                r.elapsed_s,
                out.display()
            );
        }
        "redirect" => {
            let cfg = if cli.quick { redirect::Config::quick() } else { redirect::Config::full() };
            let r = redirect::run(&cfg)?;
            write_json(&out, &r)?;
            println!(
                "## sluice-bench redirect: capture modes, {} CPUs, kernel {}{quick}\n",
                r.host.cpus, r.host.kernel
            );
            print!("{}", redirect::markdown(&r.rows));
            println!(
                "\nsame-node: node1/client -> node1/local (one agent); cross-node: node1/client -> node2/remote \
                 (two agents, HBONE over mTLS). One iperf3 stream of {} s; RR: {} 1-byte round trips. \
                 Each figure is the median of {} round(s), the ways alternating; (N.NNx) is the ratio to \
                 direct. Agent CPU is both agents' user+sys over the iperf3 run, per GB received. \
                 eBPF: --redirect ebpf --splice off; eBPF splice: --redirect ebpf --splice on, shown for \
                 same-node only (cross-node it takes the eBPF path). {:.0} s in all; JSON: {}",
                cfg.iperf_secs,
                cfg.rr_count,
                cfg.rounds,
                r.elapsed_s,
                out.display()
            );
        }
        "discovery" => {
            let cfg = if cli.quick { discovery::Config::quick() } else { discovery::Config::full() };
            let r = discovery::run(&cfg)?;
            write_json(&out, &r)?;
            println!(
                "## sluice-bench discovery: Kubernetes discovery at scale, {} CPUs, kernel {}{quick}\n",
                r.host.cpus, r.host.kernel
            );
            print!("{}", discovery::markdown(&r.sizes));
            println!(
                "\nOne agent (--kubeconfig, --redirect iptables) against the fake API server; N pods on other \
                 nodes, N/2 services with one EndpointSlice each, {} namespaces. RSS is VmRSS 1 s after READY; \
                 KiB per 1,000 objects is above the empty cluster's RSS, measured in the same run; a change is \
                 one new Service until the agent's state changed. Median of {} round(s), sizes alternating. \
                 {:.0} s in all; JSON: {}",
                20,
                cfg.rounds,
                r.elapsed_s,
                out.display()
            );
        }
        other => bail!("unknown benchmark {other:?}; known: tunnel, redirect, discovery"),
    }
    Ok(())
}

fn write_json(out: &Path, report: &impl Serialize) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", out.display()))
}

/// `<target>/bench/<what>.json`, `<target>` being two levels above this
/// binary (target/release/sluice-bench).
fn default_out(what: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let target =
        exe.parent().and_then(|p| p.parent()).context("sluice-bench is not inside a target dir; pass --out")?;
    Ok(target.join("bench").join(format!("{what}.json")))
}
