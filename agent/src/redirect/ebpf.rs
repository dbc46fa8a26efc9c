//! The eBPF capture backend: no iptables in the pod.
//!
//! Per pod: connect4/connect6 + sock_ops on the pod's cgroup (outbound), tc
//! ingress on the pod's eth0 handing SYNs to its 15006 listener (inbound),
//! the pod's netns cookie and addresses in ENROLLED, and the return-path ip
//! rule shared with iptables mode. The agent's own cgroup carries sock_ops
//! and getsockopt. Enrollment writes ENROLLED last and removal clears it
//! first, so capture only ever points at listeners that are up.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use agent_common::{
    identity_index, Config, IpKey, PodInfo, WorkloadInfo, CONFIG_LOOPBACK_BYPASS, CONFIG_SPLICE, POD_HAS_V4,
    POD_HAS_V6, WORKLOAD_LOCAL,
};
use anyhow::{Context, Result};
use tracing::{info, warn};

use super::{route, Family, Mode, PodCapture, Redirect, CONNMARK};
use crate::bpf::{Datapath, Links, PinRoot};

struct Enrolled {
    cookie: u64,
    listeners: Vec<IpKey>,
    _links: Vec<Links>,
}

pub struct EbpfRedirect {
    datapath: Mutex<Datapath>,
    pods: Mutex<HashMap<String, Enrolled>>,
    _agent: Links,
}

impl EbpfRedirect {
    /// Loads the programs (adopting pins a previous agent left) and attaches
    /// the agent-side ones to the agent's own cgroup.
    pub fn new(pins: PinRoot, loopback_bypass: bool, splice: bool) -> Result<EbpfRedirect> {
        let mut datapath = Datapath::load(pins)?;
        let flags = if loopback_bypass { CONFIG_LOOPBACK_BYPASS } else { 0 } | if splice { CONFIG_SPLICE } else { 0 };
        datapath.set_config(Config { flags, ..Default::default() })?;
        let own = own_cgroup()?;
        let agent = datapath.attach_agent_cgroup(&own)?;
        info!(cgroup = %own.display(), "eBPF capture loaded");
        Ok(EbpfRedirect { datapath: Mutex::new(datapath), pods: Mutex::default(), _agent: agent })
    }

    pub fn datapath(&self) -> std::sync::MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Redirect for EbpfRedirect {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    fn app_mark(&self) -> u32 {
        CONNMARK
    }

    fn assigns_inbound(&self) -> bool {
        true
    }

    fn enroll(&self, pod: &PodCapture<'_>) -> Result<()> {
        if self.pods.lock().unwrap_or_else(|e| e.into_inner()).contains_key(pod.uid) {
            return Ok(());
        }
        let cgroup = pod.cgroup.with_context(|| {
            format!("pod {}: eBPF capture attaches to the pod's cgroup, and the config gives it none", pod.uid)
        })?;
        let cookie = pod.netns.cookie().with_context(|| format!("pod {}", pod.uid))?;
        for family in Family::for_pod(pod.ips) {
            route::install(pod, family)?;
        }
        // The app's accepted socket takes the mark of the agent's SYN, so its
        // replies to the client's (foreign) address follow the ip rule back
        // to the agent instead of leaving the pod.
        // Kernel-made replies (a RST from a closed port) must carry the mark
        // too, or "connection refused" leaves the pod instead of reaching the
        // agent, and the client waits for a timeout instead of getting 503.
        for (sysctl, path) in [
            ("net.ipv4.tcp_fwmark_accept", "/proc/sys/net/ipv4/tcp_fwmark_accept"),
            ("net.ipv4.fwmark_reflect", "/proc/sys/net/ipv4/fwmark_reflect"),
            ("net.ipv6.fwmark_reflect", "/proc/sys/net/ipv6/fwmark_reflect"),
        ] {
            if path.contains("ipv6") && !pod.ips.iter().any(IpAddr::is_ipv6) {
                continue;
            }
            pod.netns
                .run(|| std::fs::write(path, "1"))
                .with_context(|| format!("pod {}: setting {sysctl}", pod.uid))?;
        }
        let mut dp = self.datapath();
        dp.attach_pod_cgroup(cgroup, cookie).with_context(|| format!("pod {}", pod.uid))?;
        // Listeners before tc: the program drops a SYN it finds no
        // listener for (fail closed), so the listener must be there first.
        let mut listeners = Vec::new();
        for fd in pod.inbound_listeners {
            // SAFETY: the caller keeps the listeners open for this call.
            let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
            let v6 = socket2::SockRef::from(&fd).local_addr()?.is_ipv6();
            for ip in pod.ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                let key = ip_key(*ip);
                dp.set_listener(key, fd).with_context(|| format!("pod {}: listener for {ip}", pod.uid))?;
                listeners.push(key);
            }
        }
        let links = vec![dp.attach_tc(pod.netns, "eth0").with_context(|| format!("pod {}", pod.uid))?];
        let workload =
            WorkloadInfo { netns_cookie: cookie, identity: identity_index(pod.identity), flags: WORKLOAD_LOCAL };
        for ip in pod.ips {
            dp.set_workload(ip_key(*ip), workload)
                .with_context(|| format!("pod {}: WORKLOADS entry for {ip}", pod.uid))?;
        }
        dp.enroll_netns(cookie, pod_info(pod.ips)).with_context(|| format!("pod {}", pod.uid))?;
        drop(dp);
        info!(uid = pod.uid, cookie, "eBPF capture enrolled");
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.uid.to_owned(), Enrolled { cookie, listeners, _links: links });
        Ok(())
    }

    fn unenroll(&self, pod: &PodCapture<'_>) -> Result<()> {
        let enrolled = self.pods.lock().unwrap_or_else(|e| e.into_inner()).remove(pod.uid);
        if let Some(e) = enrolled {
            let mut dp = self.datapath();
            dp.unenroll_netns(e.cookie)?;
            dp.detach_pod_cgroup(e.cookie).with_context(|| format!("pod {}", pod.uid))?;
            for ip in pod.ips {
                if let Err(err) = dp.remove_workload(ip_key(*ip)) {
                    warn!(uid = pod.uid, error = %err, "removing a WORKLOADS entry");
                }
            }
            for key in e.listeners {
                if let Err(err) = dp.remove_listener(key) {
                    warn!(uid = pod.uid, error = %err, "removing a listener entry");
                }
            }
            // Dropping the tc link detaches tc.
        }
        for family in Family::present() {
            route::remove(pod, family)?;
        }
        Ok(())
    }
}

fn ip_key(ip: IpAddr) -> IpKey {
    IpKey { ip: crate::bpf::ip_words(ip) }
}

fn pod_info(ips: &[IpAddr]) -> PodInfo {
    let mut info = PodInfo::default();
    for ip in ips {
        match ip {
            IpAddr::V4(v4) if info.flags & POD_HAS_V4 == 0 => {
                info.ip4 = u32::from_ne_bytes(v4.octets());
                info.flags |= POD_HAS_V4;
            }
            IpAddr::V6(_) if info.flags & POD_HAS_V6 == 0 => {
                info.ip6 = ip_key(*ip).ip;
                info.flags |= POD_HAS_V6;
            }
            _ => {}
        }
    }
    info
}

/// The agent's own cgroup v2 directory, from /proc/self/cgroup and the
/// cgroup2 mount point (detected: hybrid hosts mount it at .../unified).
pub fn own_cgroup() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel =
        text.lines().find_map(|l| l.strip_prefix("0::")).context("/proc/self/cgroup has no cgroup v2 entry (0::)")?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup2")).then(|| Path::new(mount_point).to_owned())
        })
        .context("no cgroup2 filesystem is mounted")
}
