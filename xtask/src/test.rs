//! `cargo xtask test`: the README's test command. Sets the machine up, builds
//! everything (the agent build also builds the eBPF object), then runs the
//! whole suite. As root, tests that need root must run: SLUICE_REQUIRE_ROOT=1
//! turns a would-be skip into a failure.

use std::process::Command;

use anyhow::Result;

use crate::{exec, setup, step, workspace};

pub fn run(extra: &[String]) -> Result<()> {
    setup::run()?;
    step("building the workspace (the agent build also builds the eBPF object)");
    exec("build", Command::new("cargo").current_dir(workspace()).args(["build", "--workspace", "--all-targets"]))?;
    step("running the test suite");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace()).args(["test", "--workspace"]);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    let skip_log = workspace().join("target/skipped-tests.log");
    let _ = std::fs::remove_file(&skip_log);
    cmd.env("SLUICE_SKIP_LOG", &skip_log);
    if setup::nix_is_root() {
        cmd.env("SLUICE_REQUIRE_ROOT", "1");
    } else {
        eprintln!("==> not root: tests that need root will report SKIPPED");
    }
    let result = exec("test", &mut cmd);
    // libtest has no "skipped" outcome; the harness logs each skip instead.
    let skipped = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let count = skipped.lines().count();
    if count > 0 {
        eprintln!("{skipped}==> {count} test(s) SKIPPED: they need root; they did not run and did not pass");
    }
    result
}
