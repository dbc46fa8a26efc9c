//! `sluice`: the node agent binary. Subcommands dispatch into the library;
//! nothing here but argument parsing and process setup.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use sluice::bpf::{self, PinRoot};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice node agent: eBPF-steered mTLS/HBONE for Kubernetes pods"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the kernel programs and run the agent until SIGTERM or SIGINT.
    Run {
        /// cgroup v2 directory whose sockets get the in-kernel bypass (repeatable).
        #[arg(long = "cgroup")]
        cgroups: Vec<PathBuf>,
        /// Directory on bpffs for Sluice's pinned maps.
        #[arg(long, default_value = agent_common::PIN_ROOT)]
        pin_root: PathBuf,
        /// Leave the pinned maps in place on exit, for a restarted agent to adopt.
        #[arg(long)]
        keep_pins: bool,
    },
    /// Print the kernel programs' counters from the pinned maps.
    Inspect {
        #[arg(long, default_value = agent_common::PIN_ROOT)]
        pin_root: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run {
            cgroups,
            pin_root,
            keep_pins,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(sluice::run::run_bypass(
                PinRoot::new(pin_root),
                &cgroups,
                keep_pins,
            ))
        }
        Cmd::Inspect { pin_root, json } => {
            let counters = bpf::read_counters(&PinRoot::new(pin_root))?;
            if json {
                println!("{}", serde_json::to_string(&counters)?);
            } else {
                print!("{counters}");
            }
            Ok(())
        }
        Cmd::Version => {
            println!("sluice {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
