//! What the soak watches in each agent: open descriptors
//! (`/proc/<pid>/fd`), memory (`VmRSS`, `VmHWM`), threads, and the entries
//! of the pinned eBPF maps that grow with connections (eBPF mode), counted
//! with `bpftool map dump` as an operator would (README "Inspecting a
//! running agent").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use sluice_tests::bench::procstat;

/// The maps with an entry (or two) per connection; the others hold one
/// entry per pod or are arrays.
pub const CONNECTION_MAPS: &[&str] =
    &["orig_dst_by_cookie", "orig_dst_by_tuple", "sock_pairs", "splice_counts", "splice_routes", "splice_written"];

/// One agent at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub fds: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
    /// Entries per map in [`CONNECTION_MAPS`] (eBPF mode only).
    pub maps: BTreeMap<String, u64>,
}

/// Entries in the directory `/proc/<pid>/fd`.
pub fn fds(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?.count() as u64)
}

/// Entries of a pinned map. For a SOCKHASH bpftool cannot print the value
/// (aya's 4-byte value; see the README) and reports an error per entry in
/// its place: the keys still count.
pub fn map_entries(pin: &Path) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool (cargo xtask setup installs it)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("bpftool map dump {}: {} {}", pin.display(), out.status, String::from_utf8_lossy(&out.stderr))
    })?;
    let entries = v.as_array().with_context(|| format!("bpftool map dump {}: not a list", pin.display()))?;
    Ok(entries.len() as u64)
}

pub fn snapshot(pid: u32, pin_root: Option<&Path>) -> Result<Snapshot> {
    let mem = procstat::mem(pid)?;
    let mut maps = BTreeMap::new();
    if let Some(root) = pin_root {
        for name in CONNECTION_MAPS {
            maps.insert(name.to_string(), map_entries(&root.join(name))?);
        }
    }
    Ok(Snapshot { fds: fds(pid)?, rss_kib: mem.rss_kib, hwm_kib: mem.hwm_kib, threads: mem.threads, maps })
}

/// One agent to watch: its pid and, in eBPF mode, its pin root.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    pub pin_root: Option<PathBuf>,
}

/// The highest fd count and VmRSS seen per agent while a phase runs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Peak {
    pub fds: u64,
    pub rss_kib: u64,
}

/// Polls fds and VmRSS of some processes every 200 ms on a thread.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Peak>>,
}

impl Sampler {
    pub fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peaks = vec![Peak::default(); pids.len()];
            // Bounded: at most 20 minutes even if never stopped.
            for _ in 0..6_000 {
                for (p, pid) in peaks.iter_mut().zip(&pids) {
                    if let Ok(n) = fds(*pid) {
                        p.fds = p.fds.max(n);
                    }
                    if let Ok(m) = procstat::mem(*pid) {
                        p.rss_kib = p.rss_kib.max(m.rss_kib);
                    }
                }
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            peaks
        });
        Sampler { stop, handle }
    }

    pub fn finish(self) -> Vec<Peak> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// How far "after" may be above "before" and still count as back.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// Fraction of the baseline (0.10: within 10%).
    pub ratio: f64,
    pub fds: u64,
    pub rss_kib: u64,
    pub map_entries: u64,
}

impl Tolerance {
    pub fn limit(&self, before: u64, slack: u64) -> u64 {
        before + (before as f64 * self.ratio).ceil() as u64 + slack
    }
}

/// Each value of `after` that is above its limit, as text.
pub fn excess(before: &Snapshot, after: &Snapshot, tol: &Tolerance) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, b: u64, a: u64, slack: u64| {
        let limit = tol.limit(b, slack);
        if a > limit {
            out.push(format!("{what} {b} -> {a} (limit {limit})"));
        }
    };
    check("fds", before.fds, after.fds, tol.fds);
    check("VmRSS KiB", before.rss_kib, after.rss_kib, tol.rss_kib);
    for (name, b) in &before.maps {
        check(name, *b, after.maps.get(name).copied().unwrap_or(0), tol.map_entries);
    }
    out
}

/// Fails unless the pin exists (a typo in a map name must not read as 0).
pub fn check_pins(root: &Path) -> Result<()> {
    for name in CONNECTION_MAPS {
        ensure!(root.join(name).exists(), "no pinned map {} (is the agent in eBPF mode?)", root.join(name).display());
    }
    Ok(())
}

/// Calls `malloc_trim(0)` inside `pid` with gdb (attached for a moment) and
/// returns VmRSS afterwards. glibc's `malloc_stats()` before and after goes
/// to the agent's stderr (its log): "in use bytes" tells live allocations
/// from free memory.
pub fn rss_after_malloc_trim(pid: u32) -> Result<u64> {
    let out = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "call (void) malloc_stats()"])
        .args(["-ex", "call (int) malloc_trim(0)", "-ex", "call (void) malloc_stats()"])
        .output()
        .context("running gdb (for --trim-probe)")?;
    ensure!(out.status.success(), "gdb: {}", String::from_utf8_lossy(&out.stderr));
    Ok(procstat::mem(pid)?.rss_kib)
}

/// glibc's `malloc_stats()` inside `pid`, to its stderr (its log).
pub fn malloc_stats(pid: u32) -> Result<()> {
    let out = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "call (void) malloc_stats()"])
        .output()
        .context("running gdb (for --trim-probe)")?;
    ensure!(out.status.success(), "gdb: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
