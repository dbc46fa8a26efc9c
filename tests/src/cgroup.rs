//! cgroup v2 directories for nodes and pods.
//!
//! The cgroup2 mount point is detected from /proc/self/mountinfo, never
//! assumed: hybrid hosts mount it at /sys/fs/cgroup/unified, pure v2 hosts at
//! /sys/fs/cgroup.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The first cgroup2 mount point of this mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf> {
    static MOUNT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    MOUNT.get_or_init(|| find_cgroup2().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

fn find_cgroup2() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_mountinfo(&info).context("no cgroup2 mount in /proc/self/mountinfo")
}

/// mountinfo: `id parent maj:min root mountpoint opts [optional...] - fstype src superopts`.
fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(|m| PathBuf::from(unescape(m)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Create one cgroup directory; fails if it exists (used to claim names).
pub(crate) fn create(path: &Path) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("mkdir cgroup {}", path.display()))
}

/// SIGKILL every process in the subtree at `path` and wait until it is
/// empty. Only harness-created cgroups are passed here, and only processes
/// the harness spawned can be in them.
pub(crate) fn kill_all(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill_file = path.join("cgroup.kill");
    if kill_file.exists() {
        std::fs::write(&kill_file, "1").with_context(|| format!("write {}", kill_file.display()))?;
    } else {
        // Kernels before 5.14: signal the listed pids of the subtree.
        for dir in subtree(path)? {
            for pid in procs(&dir)? {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while populated(path)? {
        if Instant::now() > deadline {
            bail!("cgroup {} still has processes 5s after SIGKILL", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Remove the cgroup at `path` and all its descendants (deepest first).
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut dirs = subtree(path)?;
    dirs.reverse(); // children were pushed after parents
    for dir in dirs {
        // A just-killed task can keep the cgroup busy for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir cgroup {}", dir.display())),
            }
        }
    }
    Ok(())
}

/// `path` and every cgroup below it, parents before children.
fn subtree(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![path.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let dir = out[i].clone();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("list {}", dir.display()))?;
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(entry.path());
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Pids in one cgroup (not its children).
pub fn procs(path: &Path) -> Result<Vec<i32>> {
    let file = path.join("cgroup.procs");
    let text = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn populated(path: &Path) -> Result<bool> {
    let file = path.join("cgroup.events");
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok(text.lines().any(|l| l == "populated 1")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("read {}", file.display())),
    }
}

/// The cgroup v2 path (relative to the cgroup2 mount) of a process, from the
/// `0::` line of /proc/<pid>/cgroup.
pub fn cgroup_of(pid: u32) -> Result<String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).with_context(|| format!("read {file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .with_context(|| format!("no cgroup v2 (0::) line in {file}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_escaped_mounts() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(info), Some(PathBuf::from("/sys/fs/cgroup/uni fied")));
        assert_eq!(parse_mountinfo("1 2 0:1 / /x rw - tmpfs t rw"), None);
    }
}
