//! `cargo xtask bench <what>`: set up, build the agent and the harness in
//! release mode, then run `target/release/sluice-bench <what>`, which prints
//! a table and writes target/bench/<what>.json. Needs root: the bench builds
//! network namespaces and runs real agents. Missed targets are printed as
//! MISS; they do not fail the task.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{build_bins, exec, setup, step, target_dir, workspace};

const KNOWN: &[&str] = &["tunnel", "redirect", "discovery"];

pub fn run(what: &str, extra: &[String]) -> Result<()> {
    if !KNOWN.contains(&what) {
        bail!("bench: unknown benchmark {what:?}; known: {}", KNOWN.join(", "));
    }
    if !setup::nix_is_root() {
        bail!(
            "bench: must run as root (it creates network namespaces, cgroups and iptables rules, and runs agents); try `sudo -E cargo xtask bench {what}`"
        );
    }
    setup::run()?;
    step("building sluice and the harness in release mode");
    let release = build_bins(true)?;
    step(&format!("running the {what} benchmark"));
    exec(
        "bench",
        Command::new(release.join("sluice-bench"))
            .current_dir(workspace())
            .arg(what)
            .arg("--out")
            .arg(target_dir().join("bench").join(format!("{what}.json")))
            .args(extra)
            .env("SLUICE_BIN", release.join("sluice"))
            .env("SLUICE_PEER_BIN", release.join("sluice-peer")),
    )
}
