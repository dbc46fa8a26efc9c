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
///
/// The agent gets a cgroup of its own beside the pods' (as a DaemonSet pod
/// has), never an ancestor of them: programs attached to the agent's cgroup
/// must not also fire for the pods' sockets.
pub struct Agent {
    child: Option<ChildGuard>,
    cgroup: PathBuf,
    pub pin_root: PathBuf,
    /// The CNI socket this agent serves (`--cni-socket`); one per agent,
    /// never the node default, so tests leave /var/run/sluice alone.
    pub cni_socket: Option<PathBuf>,
    /// The harness chose `cni_socket` (so it removes it).
    cni_socket_ours: bool,
}

struct AgentPlace {
    netns: String,
    cgroup: PathBuf,
}

impl Place for AgentPlace {
    fn netns_name(&self) -> &str {
        &self.netns
    }
    fn cgroup_path(&self) -> PathBuf {
        self.cgroup.clone()
    }
}

/// The kernel programs' counters (eBPF mode) from the pins at `pin_root`,
/// by name, summed over CPUs: what `sluice inspect --json` prints.
pub fn kernel_counters(pin_root: &Path) -> Result<serde_json::Value> {
    let out = Command::new(agent_bin()).args(["inspect", "--json", "--pin-root"]).arg(pin_root).output()?;
    anyhow::ensure!(out.status.success(), "sluice inspect: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
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
    /// Starts `sluice <args>` in `place`'s netns (usually a node), in a new
    /// cgroup under `place`'s, and waits until it prints READY.
    pub fn start(place: &(impl Place + ?Sized), pin_root: &Path, args: &[&str]) -> Result<Agent> {
        Self::start_env(place, pin_root, args, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_env(
        place: &(impl Place + ?Sized),
        pin_root: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cgroup = place.cgroup_path().join(format!("agent-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating the agent cgroup {}", cgroup.display()))?;
        let here = AgentPlace { netns: place.netns_name().to_owned(), cgroup: cgroup.clone() };
        let mut cmd = Command::new(agent_bin());
        cmd.args(args).arg("--pin-root").arg(pin_root);
        let serves_cni = args.first() == Some(&"run") && !args.contains(&"--cgroup");
        let (cni_socket, cni_socket_ours) = match args.iter().position(|a| *a == "--cni-socket") {
            Some(i) => (args.get(i + 1).map(PathBuf::from), false),
            None if serves_cni => {
                let path = std::env::temp_dir().join(format!("sluice-cni-{}-{n}.sock", std::process::id()));
                cmd.arg("--cni-socket").arg(&path);
                (Some(path), true)
            }
            None => (None, false),
        };
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        cmd.envs(env.iter().copied());
        let mut agent = Agent {
            child: Some(crate::spawn_in(&here, cmd)?),
            cgroup,
            pin_root: pin_root.to_owned(),
            cni_socket,
            cni_socket_ours,
        };
        let child = agent.child.as_mut().expect("just set");
        if let Err(e) = child.wait_for_line("READY", Duration::from_secs(20)) {
            bail!("agent did not become ready: {e:#}\nstderr:\n{}", child.stderr_text());
        }
        Ok(agent)
    }

    fn child(&self) -> &ChildGuard {
        self.child.as_ref().expect("the agent process is present until stop or drop")
    }

    pub fn pid(&self) -> u32 {
        self.child().pid()
    }

    /// This agent's kernel counters; see [`kernel_counters`].
    pub fn counters(&self) -> Result<serde_json::Value> {
        kernel_counters(&self.pin_root)
    }

    pub fn stderr(&self) -> String {
        self.child().stderr_text()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> Result<String> {
        let child = self.child.take().expect("the agent process is present until stop or drop");
        let pid = nix::unistd::Pid::from_raw(child.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("sending SIGTERM to the agent")?;
        let out = child.finish(Duration::from_secs(15))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!("agent exited with {} after SIGTERM:\n{stderr}", out.status);
        }
        Ok(stderr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
        // A killed agent leaves its socket file behind.
        if let (Some(path), true) = (&self.cni_socket, self.cni_socket_ours) {
            let _ = std::fs::remove_file(path);
        }
        // The cgroup can only go once its last process is reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Writes test evidence straight to fd 2, past libtest's capture, so CI logs
/// show what each test measured even when it passes.
pub fn evidence(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(format!("EVIDENCE: {text}\n").as_bytes());
}
