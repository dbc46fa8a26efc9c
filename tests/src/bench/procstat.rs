//! What a process costs, from /proc: CPU time (utime + stime of the whole
//! thread group) and memory (VmRSS, VmHWM).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

/// CPU seconds a process has used so far.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
}

impl Cpu {
    pub fn total(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// `self - before`, field by field.
    pub fn since(&self, before: &Cpu) -> Cpu {
        Cpu { user_s: self.user_s - before.user_s, sys_s: self.sys_s - before.sys_s }
    }

    pub fn add(&self, other: &Cpu) -> Cpu {
        Cpu { user_s: self.user_s + other.user_s, sys_s: self.sys_s + other.sys_s }
    }
}

/// utime and stime (fields 14 and 15) of /proc/<pid>/stat.
pub fn cpu(pid: u32) -> Result<Cpu> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // comm (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = text.rsplit_once(')').with_context(|| format!("{path}: no ')'"))?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field n is fields[n - 3].
    let tick = |n: usize| -> Result<f64> {
        let v: u64 = fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?
            .parse()
            .with_context(|| format!("{path}: field {n}"))?;
        Ok(v as f64 / clock_ticks())
    };
    Ok(Cpu { user_s: tick(14)?, sys_s: tick(15)? })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Memory of a process, in KiB, from /proc/<pid>/status.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Mem {
    pub rss_kib: u64,
    /// The peak RSS since the process started.
    pub hwm_kib: u64,
    pub threads: u64,
}

pub fn mem(pid: u32) -> Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(Mem { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:"), threads: field("Threads:") })
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Polls VmRSS of some processes every 50 ms on a thread and keeps the
/// highest value seen per process (a cross-check of VmHWM).
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<u64>>,
}

impl RssSampler {
    pub fn start(pids: &[u32]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, pids) = (stop.clone(), pids.to_vec());
        let handle = std::thread::spawn(move || {
            let mut max = vec![0u64; pids.len()];
            // Bounded: at most 10 minutes of samples even if never stopped.
            for _ in 0..12_000 {
                for (m, pid) in max.iter_mut().zip(&pids) {
                    if let Ok(mem) = mem(*pid) {
                        *m = (*m).max(mem.rss_kib);
                    }
                }
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        RssSampler { stop, handle }
    }

    /// The highest VmRSS (KiB) seen per process, in the order given.
    pub fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}
