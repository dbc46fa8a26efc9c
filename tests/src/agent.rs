//! Runs a real `sluice` agent process for a test, and stops it by PID.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{peer::target_bin, process::ChildGuard, Place};

/// The `sluice` binary cargo built beside the test (`SLUICE_BIN` overrides).
pub fn agent_bin() -> PathBuf {
    target_bin("sluice", "SLUICE_BIN")
}

/// A running agent. Dropping it SIGKILLs the process; [`Agent::stop`] sends
/// SIGTERM and waits, which is how the agent is meant to be stopped.
pub struct Agent {
    child: ChildGuard,
    pub pin_root: PathBuf,
}

/// A unique pin directory on bpffs for one test's agent; removed on drop so
/// a failed test leaves nothing in /sys/fs/bpf.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(prefix: &str) -> PinDir {
        PinDir(Path::new("/sys/fs/bpf").join(prefix))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    /// Starts `sluice <args>` in `place` (usually a node) and waits until it
    /// prints READY.
    pub fn start(place: &(impl Place + ?Sized), pin_root: &Path, args: &[&str]) -> Result<Agent> {
        let mut cmd = Command::new(agent_bin());
        cmd.args(args).arg("--pin-root").arg(pin_root);
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let mut child = crate::spawn_in(place, cmd)?;
        if let Err(e) = child.wait_for_line("READY", Duration::from_secs(20)) {
            bail!("agent did not become ready: {e:#}\nstderr:\n{}", child.stderr_text());
        }
        Ok(Agent { child, pin_root: pin_root.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn stderr(&self) -> String {
        self.child.stderr_text()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(self) -> Result<String> {
        let pid = nix::unistd::Pid::from_raw(self.child.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("sending SIGTERM to the agent")?;
        let out = self.child.finish(Duration::from_secs(15))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!("agent exited with {} after SIGTERM:\n{stderr}", out.status);
        }
        Ok(stderr)
    }
}

/// Writes test evidence straight to fd 2, past libtest's capture, so CI logs
/// show what each test measured even when it passes.
pub fn evidence(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("EVIDENCE: {text}\n").as_bytes());
}
