//! Nodes and pods of a [`crate::Topology`]: accessors, and adding pods.

use crate::cgroup;
use crate::netns::{self, ip_batch};
use crate::process::{lock, ChildGuard, Place, Registry};
use crate::topology::Inner;
use anyhow::{bail, Context, Result};
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_PODS: usize = 250;

pub(crate) struct NodeInfo {
    pub(crate) name: String,
    pub(crate) index: u8,
    pub(crate) netns: String,
    pub(crate) cgroup: PathBuf,
    pub(crate) lan_veth: String,
    pub(crate) pods: Mutex<Vec<Arc<PodInfo>>>,
}

pub(crate) struct PodInfo {
    name: String,
    uid: String,
    node: String,
    node_netns: String,
    index: u8,
    netns: String,
    cgroup: PathBuf,
    host_veth: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    mac: String,
    host_mac: String,
}

pub(crate) fn node_ipv4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 10, n)
}
pub(crate) fn node_ipv6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, n.into())
}

/// A UUID-shaped pod UID (version 4 layout, lowercase, with dashes), as the
/// API server would assign, derived from the topology prefix (unique per run),
/// node, pod name and our pid, so it differs between pods and between runs.
fn pod_uid(prefix: &str, node: &str, pod: &str) -> String {
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (salt, prefix, node, pod, std::process::id()).hash(&mut h);
        h.finish()
    };
    let (hi, lo) = (half(1), half(2));
    // Version 4 in the third group, RFC 4122 variant in the fourth.
    let hi = (hi & !0xf000) | 0x4000;
    let lo = (lo & !(0xc000 << 48)) | (0x8000 << 48);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// Inherent accessors (no trait import needed) plus the [`Place`] impl.
macro_rules! place_methods {
    ($t:ty, $registry:expr) => {
        impl $t {
            /// Name of the netns (as in `ip netns list`).
            pub fn netns_name(&self) -> &str {
                &self.info.netns
            }
            /// `/var/run/netns/<name>`.
            pub fn netns_path(&self) -> PathBuf {
                netns::netns_path(&self.info.netns)
            }
            /// Node: `<cgroup2>/<prefix>/<node>`; pod: `<cgroup2>/<prefix>/<node>/pod<uid>`
            /// (kubelet's cgroupfs naming, see [`Pod::uid`]).
            pub fn cgroup_path(&self) -> PathBuf {
                self.info.cgroup.clone()
            }
            /// [`crate::spawn_in`] here.
            pub fn spawn(&self, cmd: Command) -> Result<ChildGuard> {
                crate::spawn_in(self, cmd)
            }
            /// [`crate::output_in`] here.
            pub fn output(&self, cmd: Command, timeout: Duration) -> Result<Output> {
                crate::output_in(self, cmd, timeout)
            }
            /// One-shot `ip netns exec` (netns only, not the cgroup).
            pub fn exec(&self, args: &[&str]) -> Result<Output> {
                netns::exec_in(&self.info.netns, args)
            }
            /// Like [`Self::exec`], failing on non-zero exit; returns stdout.
            pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
                netns::exec_in_ok(&self.info.netns, args)
            }
        }
        impl Place for $t {
            fn netns_name(&self) -> &str {
                &self.info.netns
            }
            fn cgroup_path(&self) -> PathBuf {
                self.info.cgroup.clone()
            }
            fn registry(&self) -> Option<Arc<Registry>> {
                let get = $registry;
                Some(get(self))
            }
        }
    };
}

/// A simulated node (its own netns and cgroup). Cheap to clone.
#[derive(Clone)]
pub struct Node {
    pub(crate) info: Arc<NodeInfo>,
    pub(crate) topo: Arc<Inner>,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// 1-based position in the topology; selects all of the node's addresses.
    pub fn index(&self) -> u8 {
        self.info.index
    }
    /// The node IP on the lan (eth0).
    pub fn ip(&self) -> Ipv4Addr {
        node_ipv4(self.info.index)
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        node_ipv6(self.info.index)
    }
    /// This node's veth end inside the lan netns (attached to the bridge):
    /// capture here to see what goes over the wire between nodes.
    pub fn lan_veth(&self) -> &str {
        &self.info.lan_veth
    }
    /// Pod CIDRs, e.g. ("10.10.1.0/24", "fd10:1::/64").
    pub fn pod_cidrs(&self) -> (String, String) {
        let i = self.info.index;
        (format!("10.10.{i}.0/24"), format!("fd10:{i:x}::/64"))
    }
    pub fn pods(&self) -> Vec<Pod> {
        let pods = lock(&self.info.pods).clone();
        pods.into_iter().map(|info| Pod { info, registry: self.topo.registry.clone() }).collect()
    }

    /// The pod called `name` on this node, if any.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.pods().into_iter().find(|p| p.name() == name)
    }

    /// Add a pod: netns `<prefix>-<node>-<name>`, eth0 with 10.10.<i>.<k>/32
    /// and fd10:<i>::<k>/128 (k = 1, 2, ... per node), veth `veth-p<k>` in
    /// the node netns, a UID ([`Pod::uid`]), and cgroup
    /// `<prefix>/<node>/pod<uid>`, named as kubelet's cgroupfs driver does.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        crate::names::validate("pod", name, 24)?;
        let topo = &self.topo;
        let node = &self.info;
        if lock(&topo.state).torn_down {
            bail!("topology {} was torn down", topo.prefix);
        }
        let mut pods = lock(&node.pods);
        if pods.iter().any(|p| p.name == name) {
            bail!("node {} already has pod {name}", node.name);
        }
        if pods.len() >= MAX_PODS {
            bail!("at most {MAX_PODS} pods per node");
        }
        let k = (pods.len() + 1) as u8;
        let i = node.index;
        let ns = format!("{}-{}-{name}", topo.prefix, node.name);
        topo.add_netns(&ns)?;
        let uid = pod_uid(&topo.prefix, &node.name, name);
        let cg = node.cgroup.join(format!("pod{uid}"));
        cgroup::create(&cg)?;

        let info = PodInfo {
            name: name.into(),
            uid,
            node: node.name.clone(),
            node_netns: node.netns.clone(),
            index: k,
            netns: ns.clone(),
            cgroup: cg,
            host_veth: format!("veth-p{k}"),
            ipv4: Ipv4Addr::new(10, 10, i, k),
            ipv6: Ipv6Addr::new(0xfd10, i.into(), 0, 0, 0, 0, 0, k.into()),
            mac: format!("02:5e:0a:{i:02x}:{k:02x}:02"),
            host_mac: format!("02:5e:0a:{i:02x}:{k:02x}:01"),
        };
        let (veth, mac, hmac, v4, v6) = (&info.host_veth, &info.mac, &info.host_mac, info.ipv4, info.ipv6);
        ip_batch(
            &node.netns,
            &[
                format!("link add {veth} address {hmac} type veth peer name eth0 address {mac} netns {ns}"),
                format!("link set {veth} up"),
            ],
        )
        .with_context(|| format!("veth for pod {name} on node {}", node.name))?;
        ip_batch(
            &ns,
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("addr add {v4}/32 dev eth0"),
                format!("addr add {v6}/128 dev eth0 nodad"),
                "route add 169.254.1.1/32 dev eth0 scope link".into(),
                "route add 0.0.0.0/0 via 169.254.1.1 dev eth0".into(),
                format!("neigh add 169.254.1.1 lladdr {hmac} dev eth0 nud permanent"),
                "route add ::/0 via fe80::1 dev eth0".into(),
                format!("neigh add fe80::1 lladdr {hmac} dev eth0 nud permanent"),
            ],
        )
        .with_context(|| format!("addresses of pod {name} in netns {ns}"))?;
        ip_batch(
            &node.netns,
            &[
                format!("addr add fe80::1/64 dev {veth} nodad"),
                format!("route add {v4}/32 dev {veth}"),
                format!("route add {v6}/128 dev {veth}"),
                format!("neigh add {v4} lladdr {mac} dev {veth} nud permanent"),
                format!("neigh add {v6} lladdr {mac} dev {veth} nud permanent"),
            ],
        )
        .with_context(|| format!("routes to pod {name} on node {}", node.name))?;
        let info = Arc::new(info);
        pods.push(info.clone());
        Ok(Pod { info, registry: topo.registry.clone() })
    }
}

impl Node {
    /// A pod as kubelet hands it to the CNI chain: netns
    /// `<prefix>-<node>-<name>` with nothing in it yet, a UID, and cgroup
    /// `<node cg>/pod<uid>` (kubelet creates it before calling the runtime).
    /// Its interface and address come from the chain; the netns and cgroup
    /// are removed with the topology.
    pub fn add_cni_pod(&self, name: &str) -> Result<CniPod> {
        crate::names::validate("pod", name, 24)?;
        let topo = &self.topo;
        if lock(&topo.state).torn_down {
            bail!("topology {} was torn down", topo.prefix);
        }
        let ns = format!("{}-{}-{name}", topo.prefix, self.info.name);
        topo.add_netns(&ns)?;
        netns::exec_in_ok(&ns, &["ip", "link", "set", "lo", "up"])?;
        let uid = pod_uid(&topo.prefix, &self.info.name, name);
        let cgroup = self.info.cgroup.join(format!("pod{uid}"));
        cgroup::create(&cgroup)?;
        let info = CniPodInfo { name: name.into(), node: self.info.name.clone(), uid, netns: ns, cgroup };
        Ok(CniPod { info: Arc::new(info), registry: topo.registry.clone() })
    }
}

struct CniPodInfo {
    name: String,
    node: String,
    uid: String,
    netns: String,
    cgroup: PathBuf,
}

/// A pod whose network the CNI chain sets up ([`Node::add_cni_pod`]).
#[derive(Clone)]
pub struct CniPod {
    info: Arc<CniPodInfo>,
    registry: Arc<Registry>,
}

impl CniPod {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn node_name(&self) -> &str {
        &self.info.node
    }
    pub fn uid(&self) -> &str {
        &self.info.uid
    }
}

place_methods!(CniPod, |p: &CniPod| p.registry.clone());

place_methods!(Node, |n: &Node| n.topo.registry.clone());

/// A simulated pod (its own netns and cgroup). Cheap to clone.
#[derive(Clone)]
pub struct Pod {
    info: Arc<PodInfo>,
    registry: Arc<Registry>,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// The pod's UID: UUID-shaped, unique per pod and run; its cgroup
    /// directory is `pod<uid>` under the node's.
    pub fn uid(&self) -> &str {
        &self.info.uid
    }
    pub fn node_name(&self) -> &str {
        &self.info.node
    }
    pub fn node_netns(&self) -> &str {
        &self.info.node_netns
    }
    /// 1-based position on its node.
    pub fn index(&self) -> u8 {
        self.info.index
    }
    pub fn ipv4(&self) -> Ipv4Addr {
        self.info.ipv4
    }
    pub fn ipv6(&self) -> Ipv6Addr {
        self.info.ipv6
    }
    /// The pod's veth end in the node netns (the pod's eth0 is its peer).
    pub fn host_veth(&self) -> &str {
        &self.info.host_veth
    }
    /// MAC of the pod's eth0.
    pub fn mac(&self) -> &str {
        &self.info.mac
    }
    /// A long-lived process (`sleep infinity`) in the pod's netns and cgroup,
    /// like the pause container: the pod then shows up in /proc. Killed when
    /// the guard (or the topology) drops.
    pub fn start_pause(&self) -> Result<ChildGuard> {
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity").stdin(std::process::Stdio::null());
        crate::spawn_in(self, cmd).with_context(|| format!("pause process of pod {}", self.info.name))
    }
}

place_methods!(Pod, |p: &Pod| p.registry.clone());
