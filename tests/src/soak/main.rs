//! `sluice-soak`: load and leaks, run by `cargo xtask soak`.
//!
//! `sluice-soak run` builds two nodes with real agents and, per capture
//! mode and per path (cross-node over HBONE; same-node, the splice in eBPF
//! mode), holds 10,000 connections open through one agent at once, then
//! makes 200,000 short connections in a row, every byte checked; then the
//! agents' descriptors, RSS and per-connection eBPF map entries must come
//! back within 10% of where they started. It prints a markdown table (peak
//! RSS, RSS per held connection, connections per second, fds and map
//! entries before / at peak / after) and writes target/soak/soak.json, with
//! each agent's log beside it. `--short` is the CI size: 1,000 held and
//! 10,000 short connections.
//!
//! `echo`, `hold` and `burst` are the load (see [`load`]), which `run`
//! starts inside the pods. Needs root.

mod load;
mod probe;
mod report;
mod run;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "sluice-soak", about = "Sluice load and leak soak (run by `cargo xtask soak`)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    Iptables,
    Ebpf,
    Both,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum PathArg {
    /// node1 -> node2 over HBONE (two agents).
    Cross,
    /// node1 -> node1 (one agent; the splice in eBPF mode).
    Same,
    Both,
}

#[derive(Subcommand)]
enum Cmd {
    /// The soak: topology, agents, both phases, the check, the table.
    Run {
        /// CI size: 1,000 held and 10,000 short connections.
        #[arg(long)]
        short: bool,
        #[arg(long, value_enum, default_value_t = Mode::Both)]
        mode: Mode,
        #[arg(long, value_enum, default_value_t = PathArg::Both)]
        path: PathArg,
        /// Override the number of connections held at once.
        #[arg(long)]
        concurrent: Option<u64>,
        /// Override the number of short connections.
        #[arg(long)]
        conns: Option<u64>,
        /// Run the paths this many times against the same agents, each
        /// round checked against the first baseline: a leak grows round
        /// after round, a high-water mark does not.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Longest wait for the agents to come back after each path.
        #[arg(long)]
        settle_secs: Option<u64>,
        /// When RSS did not come back, call malloc_trim(0) in the agent
        /// (gdb) and measure again: tells a leak from memory glibc kept.
        #[arg(long)]
        trim_probe: bool,
        /// Where the JSON goes (default: <target>/soak/soak.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Echo server (in a pod): echo until EOF on --echo-port; echo
    /// --close-after bytes then close first on --close-port.
    Echo {
        #[arg(long)]
        ip: IpAddr,
        #[arg(long)]
        echo_port: u16,
        #[arg(long)]
        close_port: u16,
        #[arg(long)]
        close_after: usize,
    },
    /// Hold --count connections open at once (see load::hold).
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 256)]
        parallel: usize,
        #[arg(long, default_value_t = 64)]
        bytes: usize,
    },
    /// --count short connections, --parallel in flight (see load::burst).
    Burst {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 16)]
        parallel: usize,
        #[arg(long, default_value_t = 32)]
        bytes: usize,
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
        #[arg(long, default_value_t = 100)]
        max_errors: u64,
    },
}

fn main() {
    if let Err(e) = dispatch(Cli::parse().cmd) {
        eprintln!("sluice-soak: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run { short, mode, path, concurrent, conns, rounds, settle_secs, trim_probe, out } => {
            run::cleanup_on_signal()?;
            let mut cfg = if short { run::Config::short() } else { run::Config::full() };
            cfg.concurrent = concurrent.unwrap_or(cfg.concurrent);
            cfg.short = conns.unwrap_or(cfg.short);
            cfg.settle_secs = settle_secs.unwrap_or(cfg.settle_secs);
            cfg.rounds = rounds.max(1);
            cfg.trim_probe = trim_probe;
            let modes: Vec<String> = match mode {
                Mode::Iptables => vec!["iptables".into()],
                Mode::Ebpf => vec!["ebpf".into()],
                Mode::Both => vec!["iptables".into(), "ebpf".into()],
            };
            let paths = match path {
                PathArg::Cross => vec![run::Path::Cross],
                PathArg::Same => vec![run::Path::Same],
                PathArg::Both => vec![run::Path::Cross, run::Path::Same],
            };
            let out = match out {
                Some(p) => p,
                None => default_out()?,
            };
            cfg.log_dir = out.parent().map(FsPath::to_owned);
            let r = run::run(&cfg, &modes, &paths)?;
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&r)? + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "## sluice-soak{}: {} held at once, {} short connections; {} CPUs, kernel {}\n",
                if short { " --short" } else { "" },
                report::thousands(cfg.concurrent),
                report::thousands(cfg.short),
                r.host.cpus,
                r.host.kernel
            );
            print!("{}", report::markdown(&r));
            println!(
                "\nAgents started with RLIMIT_NOFILE {}/{} (soft/hard). Peak RSS is VmHWM; RSS per held connection is \
                 (peak - VmRSS before) / held. Back: every value after settling <= before + 10% + slack \
                 ({} fds, {} KiB, {} map entries). {:.0} s in all; JSON: {}",
                r.agent_nofile.0,
                r.agent_nofile.1,
                cfg.tolerance.fds,
                cfg.tolerance.rss_kib,
                cfg.tolerance.map_entries,
                r.elapsed_s,
                out.display()
            );
            if !r.paths.iter().all(|p| p.pass) {
                bail!("an agent did not come back to its baseline (see FAIL above)");
            }
            Ok(())
        }
        Cmd::Echo { ip, echo_port, close_port, close_after } => load::echo(ip, echo_port, close_port, close_after),
        Cmd::Hold { connect, count, parallel, bytes } => load::hold(connect, count, parallel, bytes),
        Cmd::Burst { connect, count, parallel, bytes, max_secs, max_errors } => {
            load::burst(connect, count, parallel, bytes, Duration::from_secs(max_secs), max_errors)
        }
    }
}

/// `<target>/soak/soak.json`, `<target>` being two levels above this binary.
fn default_out() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let target: &FsPath =
        exe.parent().and_then(|p| p.parent()).context("sluice-soak is not inside a target dir; pass --out")?;
    Ok(target.join("soak").join("soak.json"))
}
