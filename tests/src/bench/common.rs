//! What every `sluice-bench` benchmark shares: the preflight checks, the
//! progress lines, the host description, stopping agents and charging the
//! agents' CPU to one phase of a run.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use super::procstat::{self, Cpu, Mem};
use crate::Agent;

/// Root (netns, cgroups, agents) and iperf3 are both needed.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("sluice-bench builds network namespaces and starts agents: run it as root");
    }
    if std::process::Command::new("iperf3").arg("--version").output().is_err() {
        bail!("iperf3 not found: `cargo xtask setup` installs it");
    }
    Ok(())
}

/// A progress line on stderr, stamped with the time since `start`.
pub fn progress(start: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
}

impl Host {
    pub fn this() -> Host {
        Host {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into(),
        }
    }
}

/// SIGTERM and wait; a failure is printed, not returned, so the remaining
/// cleanup still runs.
pub fn stop(agent: Agent, node: &str) {
    if let Err(e) = agent.stop() {
        eprintln!("sluice-bench: agent on {node} did not stop cleanly: {e:#}");
    }
}

pub fn mems(pids: [u32; 2]) -> Result<[Mem; 2]> {
    Ok([procstat::mem(pids[0])?, procstat::mem(pids[1])?])
}

pub fn cpus(pids: [u32; 2]) -> Result<[Cpu; 2]> {
    Ok([procstat::cpu(pids[0])?, procstat::cpu(pids[1])?])
}

/// CPU of both agents together over one phase of a run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseCpu {
    pub phase: String,
    pub wall_s: f64,
    pub cpu: Cpu,
    /// Per agent (node1, node2).
    pub per_agent: [Cpu; 2],
}

impl PhaseCpu {
    /// Agent CPU seconds per GB moved (decimal GB).
    pub fn per_gb(&self, bytes: u64) -> f64 {
        self.cpu.total() / gb(bytes)
    }

    /// "total (usr U sys S)", in s/GB.
    pub fn per_gb_text(&self, bytes: u64) -> String {
        let gb = gb(bytes);
        format!("{:.2} (usr {:.2} sys {:.2})", self.cpu.total() / gb, self.cpu.user_s / gb, self.cpu.sys_s / gb)
    }
}

fn gb(bytes: u64) -> f64 {
    (bytes as f64 / 1e9).max(1e-9)
}

/// Runs `f` and returns what it returned with the CPU the agents `pids`
/// used meanwhile.
pub fn charged<T>(pids: [u32; 2], name: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, PhaseCpu)> {
    let (t0, c0) = (Instant::now(), cpus(pids)?);
    let out = f()?;
    let c1 = cpus(pids)?;
    let per_agent = [c1[0].since(&c0[0]), c1[1].since(&c0[1])];
    let phase = PhaseCpu {
        phase: name.into(),
        wall_s: t0.elapsed().as_secs_f64(),
        cpu: per_agent[0].add(&per_agent[1]),
        per_agent,
    };
    Ok((out, phase))
}
