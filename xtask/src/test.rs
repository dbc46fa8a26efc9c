//! `cargo xtask test`: the README's test command. Sets the machine up, builds
//! everything (the agent build also builds the eBPF object), then runs the
//! whole suite. As root, tests that need root must run: SLUICE_REQUIRE_ROOT=1
//! turns a would-be skip into a failure, and any skip the tests still log
//! (`$SLUICE_SKIP_LOG`, tests/src/skip.rs) fails the run.

use std::process::Command;

use anyhow::{bail, Result};

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
    // Root must run every root test; so must anyone who asked for it.
    let must_run_all = setup::nix_is_root() || std::env::var("SLUICE_REQUIRE_ROOT").as_deref() == Ok("1");
    if setup::nix_is_root() {
        cmd.env("SLUICE_REQUIRE_ROOT", "1");
    } else if must_run_all {
        eprintln!("==> not root and SLUICE_REQUIRE_ROOT=1: every test that needs root will fail");
    } else {
        eprintln!("==> not root: tests that need root will report SKIPPED (SLUICE_REQUIRE_ROOT=1 fails them instead)");
    }
    let result = exec("test", &mut cmd);
    // libtest has no "skipped" outcome; the harness logs each skip instead.
    let skipped = std::fs::read_to_string(&skip_log).unwrap_or_default();
    verdict(result, &skipped, must_run_all)
}

/// The run's outcome: the tests' own, and a failure for any logged skip
/// when every test had to run (a skip that got past the panic of
/// `require_root!`, e.g. a test with a root check of its own).
fn verdict(tests: Result<()>, skipped: &str, must_run_all: bool) -> Result<()> {
    let count = skipped.lines().filter(|l| !l.trim().is_empty()).count();
    if count > 0 {
        eprintln!("{skipped}==> {count} test(s) SKIPPED: they need root; they did not run and did not pass");
    }
    tests?;
    if count > 0 && must_run_all {
        bail!(
            "{count} test(s) were skipped although every test must run here (root, or SLUICE_REQUIRE_ROOT=1): \
             the suite proved less than it claims"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::verdict;

    const SKIP: &str = "SKIPPED: iptables_redirect::capture_works_v4 needs root (CAP_NET_ADMIN, bpf)\n";

    #[test]
    fn a_skip_fails_the_run_when_every_test_must_run() {
        assert!(verdict(Ok(()), SKIP, true).is_err());
        assert!(verdict(Ok(()), "", true).is_ok());
        // Not root and not asked to run everything: a skip is reported, not failed.
        assert!(verdict(Ok(()), SKIP, false).is_ok());
        assert!(verdict(Err(anyhow::anyhow!("a test failed")), "", false).is_err());
    }
}
