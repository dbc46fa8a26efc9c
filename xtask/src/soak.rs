//! `cargo xtask soak`: set up, build the agent and the harness (release by
//! default), then run `sluice-soak run`, which holds 10,000 connections
//! through one agent, makes 200,000 short ones, checks every byte, and
//! fails unless the agents' descriptors, RSS and eBPF map entries come back
//! within 10%. Prints a table and writes target/soak/soak.json. Needs root.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{build_bins, exec, setup, step, workspace};

pub struct Options {
    /// CI size: 1,000 held and 10,000 short connections.
    pub short: bool,
    /// iptables, ebpf or both.
    pub mode: String,
    /// cross, same or both.
    pub path: String,
    /// Debug binaries (what `cargo xtask test` already built) instead of a
    /// release build: slower, but no second build in CI.
    pub debug: bool,
    pub extra: Vec<String>,
}

pub fn run(o: &Options) -> Result<()> {
    if !setup::nix_is_root() {
        bail!(
            "soak: must run as root (it creates network namespaces, cgroups and iptables rules, and runs agents); try `sudo -E cargo xtask soak`"
        );
    }
    setup::run()?;
    step(&format!("building sluice and the harness ({})", if o.debug { "debug" } else { "release" }));
    let bins = build_bins(!o.debug)?;
    step(&format!("running the soak ({} mode, {} path{})", o.mode, o.path, if o.short { ", --short" } else { "" }));
    let mut cmd = Command::new(bins.join("sluice-soak"));
    cmd.current_dir(workspace())
        .args(["run", "--mode", &o.mode, "--path", &o.path])
        .args(&o.extra)
        .env("SLUICE_BIN", bins.join("sluice"));
    if o.short {
        cmd.arg("--short");
    }
    exec("soak", &mut cmd)
}
