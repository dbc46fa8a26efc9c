//! Traffic capture: how an enrolled pod's connections reach the agent's
//! listeners in that pod's netns. Every backend (iptables now, eBPF later)
//! sits behind [`Redirect`], so the listeners and the engine behind them are
//! the same whichever one steers the packets.

use std::{fmt, net::IpAddr, path::Path};

use serde::Serialize;

use crate::netns::Netns;

pub mod ebpf;
mod exec;
pub mod iptables;
pub mod probe;
mod route;

/// Agent listener for captured outbound connections (in the pod netns).
pub const OUTBOUND_PORT: u16 = agent_common::OUTBOUND_PORT;
/// Agent listener for captured inbound plaintext connections.
pub const INBOUND_PLAINTEXT_PORT: u16 = agent_common::INBOUND_PLAINTEXT_PORT;
/// Agent listener for inbound HBONE; never captured, it *is* the tunnel.
pub const HBONE_PORT: u16 = agent_common::HBONE_PORT;
/// Mark on the agent's own sockets, so capture never loops them back.
pub const AGENT_MARK: u32 = agent_common::AGENT_MARK;
/// Connmark set on connections the agent opens with a foreign (client) source,
/// so their replies can be routed back to the agent rather than off-pod.
pub const CONNMARK: u32 = 0x111;
/// Mask for [`AGENT_MARK`] and [`CONNMARK`]: only the low 12 bits are ours, so
/// the rest of the mark stays free for the primary CNI (Calico, Cilium).
pub const MARK_MASK: u32 = 0xfff;
/// Policy routing table that delivers connmarked replies locally.
pub const ROUTE_TABLE: u32 = 133;
/// Priority of the ip rule into [`ROUTE_TABLE`]; below `main` (32766).
pub const RULE_PRIORITY: u32 = 32764;

/// Which capture backend is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        })
    }
}

/// An IP address family; capture is installed per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// "v4" or "v6", as in dumps and logs.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// The `ip` flag selecting this family.
    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// The default route's prefix.
    fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }

    /// The loopback address as iptables prints it.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The families to capture for `ips`. A pod with no v6 address can only
    /// use v6 on loopback, which is never captured, so it needs no v6 rules.
    /// With no IPs known, both (v6 only where the kernel has IPv6 at all).
    pub(crate) fn for_pod(ips: &[IpAddr]) -> Vec<Family> {
        if ips.is_empty() {
            return Family::present();
        }
        let mut out: Vec<Family> = Vec::new();
        for f in ips.iter().map(Family::of) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out.sort_by_key(|f| *f as u8);
        out
    }

    /// Every family the kernel supports: what unenroll must clean.
    pub(crate) fn present() -> Vec<Family> {
        // IPv6 support is kernel-wide (built in, or a module loaded or not),
        // so the agent's own view answers for every netns.
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

/// What a backend needs to know about one pod.
#[derive(Clone, Copy, Debug)]
pub struct PodCapture<'a> {
    /// Kubernetes pod uid; used in errors and logs.
    pub uid: &'a str,
    /// The pod's netns, already open (so it outlives an unmounted path).
    pub netns: &'a Netns,
    /// The pod's IPs; decide which address families get capture.
    pub ips: &'a [IpAddr],
    /// The pod's SPIFFE identity, for backends that mirror it in the kernel.
    pub identity: &'a str,
    /// The pod's cgroup v2 directory, for backends that attach there.
    pub cgroup: Option<&'a Path>,
    /// The agent's 15006 listeners in the pod (one per address family), for
    /// backends that hand inbound connections to them directly.
    pub inbound_listeners: &'a [std::os::fd::RawFd],
}

/// A capture backend. Calls block (they may run processes or load
/// programs), so async callers should use `spawn_blocking`.
pub trait Redirect: Send + Sync {
    fn mode(&self) -> Mode;
    /// Installs capture for the pod; idempotent (calling twice leaves one copy of each rule).
    /// On error the pod may be partly enrolled: the caller decides between
    /// retrying and `unenroll` (failing open is a policy choice, not ours).
    fn enroll(&self, pod: &PodCapture<'_>) -> anyhow::Result<()>;
    /// Removes every trace of capture from the pod netns; idempotent; fine if the netns is already gone.
    fn unenroll(&self, pod: &PodCapture<'_>) -> anyhow::Result<()>;
    /// Mark for the agent's client-IP-preserving connections to the app:
    /// the mark the pod's return-path rule matches (connmark restores it in
    /// iptables mode; in eBPF mode the app's accepted socket inherits it).
    fn app_mark(&self) -> u32 {
        AGENT_MARK
    }
    /// Whether inbound plaintext reaches the agent by socket assignment
    /// (eBPF) rather than by port redirect: then each pod also gets a
    /// listener on an ephemeral port, without SO_REUSEPORT, for the kernel
    /// to hand connections to.
    fn assigns_inbound(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names() {
        assert_eq!(Mode::Ebpf.to_string(), "ebpf");
        assert_eq!(serde_json::to_string(&Mode::Iptables).unwrap(), "\"iptables\"");
    }

    #[test]
    fn object_safe() {
        fn _takes(_: &dyn Redirect) {}
    }
}
