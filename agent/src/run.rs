//! The agent's main loop: bring the datapath up, wait for a stop signal, take
//! it down again.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::bpf::{Datapath, PinRoot};

/// Loads the kernel programs, enrolls `cgroups`, and runs until SIGTERM or
/// SIGINT. On exit the programs are detached and, unless `keep_pins`, the
/// pins are removed.
pub async fn run_bypass(pins: PinRoot, cgroups: &[PathBuf], keep_pins: bool) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut datapath = Datapath::load(pins)?;
    let result = (|| {
        for cg in cgroups {
            datapath.enroll_cgroup(cg)?;
        }
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(e) = result {
        datapath.shutdown(!keep_pins)?;
        return Err(e);
    }
    // Tests and the demo wait for this line before sending traffic.
    println!("READY");
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = sig, "stopping");
    datapath.shutdown(!keep_pins)
}
