//! Can this kernel run eBPF capture? Each program type, map type, helper and
//! attach point Sluice needs is asked for separately (aya's feature probes,
//! the way libbpf probes), then Sluice's real programs are loaded, so the
//! verifier has the last word. The answer names every missing piece, so
//! "traffic is not captured" never has to be guessed at.

use std::fmt;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

use crate::bpf::{ensure_bpffs, Datapath, PinRoot};

/// Test-only: names of checks to report as missing, comma separated, so the
/// fallback path can be exercised on a kernel that has everything.
pub const FORCE_MISSING_ENV: &str = "SLUICE_TEST_PROBE_MISSING";

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub kind: &'static str,
    pub name: &'static str,
    pub needed_for: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub kernel: String,
    pub checks: Vec<Check>,
}

impl Probe {
    pub fn ebpf_possible(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// One line naming each missing piece and the kernel, for logs and errors.
    pub fn missing_summary(&self) -> String {
        let missing: Vec<String> =
            self.checks.iter().filter(|c| !c.ok).map(|c| format!("{} {} ({})", c.kind, c.name, c.detail)).collect();
        format!("kernel {} lacks: {}", self.kernel, missing.join("; "))
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {}", self.kernel)?;
        writeln!(f, "{:<10} {:<42} {:<4} {:<28} detail", "kind", "name", "ok", "needed for")?;
        for c in &self.checks {
            writeln!(
                f,
                "{:<10} {:<42} {:<4} {:<28} {}",
                c.kind,
                c.name,
                if c.ok { "yes" } else { "NO" },
                c.needed_for,
                c.detail
            )?;
        }
        let mode = if self.ebpf_possible() { "ebpf" } else { "iptables" };
        writeln!(f, "--redirect auto would choose: {mode}")
    }
}

/// Runs every check. `pins` is a scratch pin directory for the load test;
/// it is removed again (an agent already running keeps its own).
pub fn run(pins: &PinRoot) -> Probe {
    let forced: Vec<String> = std::env::var(FORCE_MISSING_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let mut checks = Vec::new();
    let mut add = |kind, name: &'static str, needed_for, result: Result<bool, String>| {
        let (mut ok, mut detail) = match result {
            Ok(true) => (true, String::new()),
            Ok(false) => (false, "not supported".to_owned()),
            Err(e) => (false, e),
        };
        if forced.iter().any(|f| f == name) {
            (ok, detail) = (false, format!("forced missing by {FORCE_MISSING_ENV}"));
        }
        checks.push(Check { kind, name, needed_for, ok, detail });
    };
    let prog = |t| is_program_supported(t).map_err(|e| e.to_string());
    add("program", "sock_ops", "socket bypass, orig. dst", prog(ProgramType::SockOps));
    add("program", "sk_msg", "same-node splice", prog(ProgramType::SkMsg));
    add("program", "cgroup_sock_addr", "outbound capture", prog(ProgramType::CgroupSockAddr));
    add("program", "cgroup_sockopt", "SO_ORIGINAL_DST", prog(ProgramType::CgroupSockopt));
    add("program", "sched_cls", "inbound capture", prog(ProgramType::SchedClassifier));
    let map = |t| is_map_supported(t).map_err(|e| e.to_string());
    add("map", "sockhash", "socket bypass, listeners", map(MapType::SockHash));
    add("map", "hash", "enrolled pods", map(MapType::Hash));
    add("map", "lru_hash", "original destinations", map(MapType::LruHash));
    add("map", "percpu_array", "counters", map(MapType::PerCpuArray));
    let helper = |t, h| is_helper_supported(t, h).map_err(|e| e.to_string());
    add(
        "helper",
        "get_netns_cookie@cgroup_sock_addr",
        "outbound capture",
        helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
    );
    add(
        "helper",
        "get_netns_cookie@sock_ops",
        "socket bypass",
        helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    );
    add(
        "helper",
        "get_netns_cookie@sk_msg",
        "same-node splice",
        helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_get_netns_cookie),
    );
    add(
        "helper",
        "get_socket_cookie@sock_ops",
        "orig. dst",
        helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    );
    add(
        "helper",
        "msg_redirect_hash@sk_msg",
        "same-node splice",
        helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    );
    add(
        "helper",
        "sk_assign@sched_cls",
        "inbound capture",
        helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_sk_assign),
    );
    add(
        "attach",
        "bpffs at /sys/fs/bpf",
        "pins survive restarts",
        ensure_bpffs(std::path::Path::new("/sys/fs/bpf")).map(|_| true).map_err(|e| format!("{e:#}")),
    );
    add(
        "attach",
        "cgroup v2",
        "connect hooks, sock_ops",
        super::ebpf::cgroup2_mount().map(|_| true).map_err(|e| format!("{e:#}")),
    );
    add("attach", "SO_NETNS_COOKIE", "telling pods apart", netns_cookie_supported());
    // The verifier has the last word: load the real programs.
    let loaded = Datapath::load(pins.clone()).and_then(|d| d.shutdown(true));
    add(
        "load",
        "sluice programs (verifier)",
        "everything",
        loaded.map(|_| true).map_err(|e| format!("{e:#}").lines().next().unwrap_or_default().to_owned()),
    );
    Probe { kernel: kernel_release(), checks }
}

fn netns_cookie_supported() -> Result<bool, String> {
    let ns = crate::netns::Netns::open(std::path::Path::new("/proc/self/ns/net")).map_err(|e| format!("{e:#}"))?;
    ns.cookie().map(|_| true).map_err(|e| format!("{e:#}"))
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
}
