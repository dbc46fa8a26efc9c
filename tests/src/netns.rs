//! Named network namespaces, driven through iproute2 so that they show up in
//! `ip netns list` and at `/var/run/netns/<name>` like CNI-created ones.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// Where `ip netns add` puts the namespace files.
pub const NETNS_DIR: &str = "/var/run/netns";

/// `ip netns add` bind-mounts /run/netns onto itself the first time; two of
/// those racing could stack mounts. Serialise add/del within this process.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Path of a named netns.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Run a command to completion, failing with its stderr if it exits non-zero.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{what}: {cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

pub(crate) fn add(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    run(Command::new("ip").args(["netns", "add", name]), &format!("create netns {name}"))?;
    Ok(())
}

/// Delete a named netns. Its devices die with it (veth peers included).
pub(crate) fn del(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    run(Command::new("ip").args(["netns", "del", name]), &format!("delete netns {name}"))?;
    Ok(())
}

/// Names from `ip netns list` (which prints `name (id: N)`).
pub fn list() -> Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]), "list netns")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// One-shot command inside a named netns (`ip netns exec <netns> args...`).
/// Returns the raw output whatever the exit status; it does NOT join a
/// cgroup (use [`crate::spawn_in`] for processes that must be in a pod).
pub fn exec_in(netns: &str, args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("ip netns exec {netns} {args:?}"))
}

/// Like [`exec_in`] but fails (with stderr) on a non-zero exit; returns stdout.
pub fn exec_in_ok(netns: &str, args: &[&str]) -> Result<String> {
    let out = run(Command::new("ip").args(["netns", "exec", netns]).args(args), &format!("in netns {netns}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feed `lines` to `ip -n <netns> -batch -`: one process per configuration
/// step instead of one per command; stops at the first failing line.
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("ip -n {netns} -batch: could not start"))?;
    let script = lines.join("\n") + "\n";
    child
        .stdin
        .take()
        .context("ip -batch stdin")?
        .write_all(script.as_bytes())
        .with_context(|| format!("ip -n {netns} -batch: writing commands"))?;
    let out = child.wait_with_output().with_context(|| format!("ip -n {netns} -batch: waiting"))?;
    if !out.status.success() {
        bail!("ip -n {netns} -batch failed: {}\ncommands:\n{script}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Set sysctls (`key=value`) inside a netns only; /proc/sys/net is per-netns.
pub(crate) fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    exec_in_ok(netns, &args).with_context(|| format!("sysctl in netns {netns}"))?;
    Ok(())
}

/// A TCP listener bound inside the named netns (on a short-lived thread
/// that joins it, so this process's own netns is untouched): how a test
/// serves something, such as the fake API server, where only the agents'
/// namespaces can reach it.
pub fn listen_in(netns: &str, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    let path = netns_path(netns);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<std::net::TcpListener> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering netns {netns}"))?;
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr} in netns {netns}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread binding {addr} in netns {netns} panicked"))?
    })
}
