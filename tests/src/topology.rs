//! Simulated Kubernetes nodes and pods on one machine.
//!
//! ```text
//!   netns <prefix>-lan:   br0 ── veth-n1 ── veth-n2 ...        (the "wire")
//!                                  │          │
//!   netns <prefix>-node1:         eth0 192.168.10.1/24, fd00:10::1/64
//!                         veth-p1 ── eth0 in netns <prefix>-node1-pod1
//!                                    10.10.1.1/32, fd10:1::1/128
//! ```
//!
//! Every device is created directly inside one of our namespaces (`ip -n`),
//! never in the root netns, so device names only need to be unique within
//! a topology and nothing on the host is ever touched.
//!
//! Pods route like Calico: a /32 (/128) on eth0, default route via
//! 169.254.1.1 (fe80::1) with a permanent neighbour entry for the node-side
//! veth MAC; the node has a host route and a permanent neighbour entry per
//! pod, and a route to every other node's pod CIDR via that node's IP. With
//! no ARP/ND on the pod links, the data path is deterministic from the first
//! packet.

use crate::cgroup;
use crate::netns::{self, ip_batch};
use crate::process::{ChildGuard, Place, Registry};
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Bridge name inside the lan netns.
pub const BRIDGE: &str = "br0";
const MAX_NODES: usize = 200;
const MAX_PODS: usize = 250;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A set of nodes on one L2 segment. Dropping it removes everything it
/// created (processes, netns, devices, cgroups), also during a panic.
pub struct Topology {
    inner: Arc<Inner>,
}

struct Inner {
    prefix: String,
    cgroup_root: PathBuf,
    registry: Arc<Registry>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Created netns, in creation order; deleted in reverse.
    netns: Vec<String>,
    nodes: Vec<Arc<NodeInfo>>,
    torn_down: bool,
}

struct NodeInfo {
    name: String,
    index: u8,
    netns: String,
    cgroup: PathBuf,
    lan_veth: String,
    pods: Mutex<Vec<Arc<PodInfo>>>,
}

struct PodInfo {
    name: String,
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

fn node_ipv4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 10, n)
}
fn node_ipv6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, n.into())
}

/// `ip` batch lines routing node `to`'s pod CIDRs via its node IP.
fn routes_to(to: u8) -> [String; 2] {
    [
        format!("route add 10.10.{to}.0/24 via {} dev eth0", node_ipv4(to)),
        format!("route add fd10:{to:x}::/64 via {} dev eth0", node_ipv6(to)),
    ]
}

impl Topology {
    /// Claim a unique prefix `sl-<pid>-<n>-<name>`, create its cgroup dir and
    /// the lan netns with the bridge. The first call per process also sweeps
    /// leftovers of crashed earlier runs (see [`crate::sweep_stale`]).
    pub fn new(name: &str) -> Result<Topology> {
        crate::names::validate("topology", name, 16)?;
        crate::sweep::sweep_once();
        let mount = cgroup::cgroup2_mount()?;
        let mut claimed = None;
        for _ in 0..8 {
            let prefix = crate::names::next_prefix(name);
            let root = mount.join(&prefix);
            match std::fs::create_dir(&root) {
                Ok(()) => {
                    claimed = Some((prefix, root));
                    break;
                }
                // A dead process with a recycled pid left this name behind.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("mkdir cgroup {}", root.display()))
                }
            }
        }
        let (prefix, cgroup_root) = claimed.context("no free topology prefix after 8 tries")?;
        // From here on Drop cleans up whatever exists.
        let topo = Topology {
            inner: Arc::new(Inner {
                prefix,
                cgroup_root,
                registry: Arc::default(),
                state: Mutex::default(),
            }),
        };
        let lan = topo.lan_netns();
        topo.inner.add_netns(&lan)?;
        ip_batch(
            &lan,
            &[
                "link set lo up".into(),
                // No snooping: IPv6 ND multicast must reach every node.
                format!("link add {BRIDGE} type bridge mcast_snooping 0"),
                format!("link set {BRIDGE} up"),
            ],
        )
        .with_context(|| format!("bridge in lan netns {lan}"))?;
        Ok(topo)
    }

    /// The unique `sl-...` prefix of every netns and cgroup of this topology.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The netns holding the bridge that joins the nodes.
    pub fn lan_netns(&self) -> String {
        format!("{}-lan", self.inner.prefix)
    }

    /// The bridge device inside [`Self::lan_netns`].
    pub fn bridge(&self) -> &'static str {
        BRIDGE
    }

    /// `<cgroup2 mount>/<prefix>`: parent of all node and pod cgroups.
    pub fn cgroup_path(&self) -> PathBuf {
        self.inner.cgroup_root.clone()
    }

    /// Every netns this topology created so far.
    pub fn netns_names(&self) -> Vec<String> {
        lock(&self.inner.state).netns.clone()
    }

    pub fn nodes(&self) -> Vec<Node> {
        let nodes = lock(&self.inner.state).nodes.clone();
        nodes
            .into_iter()
            .map(|info| Node {
                info,
                topo: self.inner.clone(),
            })
            .collect()
    }

    /// Add a node: netns `<prefix>-<name>` with lo up and forwarding on, eth0
    /// on the bridge with 192.168.10.<i>/24 and fd00:10::<i>/64 (i = 1, 2,
    /// ... in order of addition), pod CIDRs 10.10.<i>.0/24 and fd10:<i>::/64,
    /// routes to and from every existing node, and cgroup `<prefix>/<name>`.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        crate::names::validate("node", name, 24)?;
        if name == "lan" {
            bail!("node name \"lan\" is reserved for the lan netns");
        }
        let inner = &self.inner;
        // Held throughout: nodes are added one at a time.
        let mut state = lock(&inner.state);
        if state.torn_down {
            bail!("topology {} was torn down", inner.prefix);
        }
        if state.nodes.iter().any(|n| n.name == name) {
            bail!("topology {} already has node {name}", inner.prefix);
        }
        if state.nodes.len() >= MAX_NODES {
            bail!("at most {MAX_NODES} nodes per topology");
        }
        let index = (state.nodes.len() + 1) as u8;
        let ns = format!("{}-{name}", inner.prefix);
        netns::add(&ns)?;
        state.netns.push(ns.clone());
        let cg = inner.cgroup_root.join(name);
        cgroup::create(&cg)?;

        let lan = format!("{}-lan", inner.prefix);
        let lan_veth = format!("veth-n{index}");
        ip_batch(
            &lan,
            &[
                format!("link add {lan_veth} type veth peer name eth0 netns {ns}"),
                format!("link set {lan_veth} master {BRIDGE} up"),
            ],
        )
        .with_context(|| format!("veth for node {name} in lan netns {lan}"))?;
        netns::sysctl(
            &ns,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )
        .with_context(|| format!("forwarding on node {name}"))?;
        let mut lines = vec![
            "link set lo up".into(),
            "link set eth0 up".into(),
            format!("addr add {}/24 dev eth0", node_ipv4(index)),
            format!("addr add {}/64 dev eth0 nodad", node_ipv6(index)),
        ];
        for other in &state.nodes {
            lines.extend(routes_to(other.index));
        }
        ip_batch(&ns, &lines).with_context(|| format!("addresses of node {name}"))?;
        for other in &state.nodes {
            ip_batch(&other.netns, &routes_to(index))
                .with_context(|| format!("routes from node {} to {name}", other.name))?;
        }
        let info = Arc::new(NodeInfo {
            name: name.into(),
            index,
            netns: ns,
            cgroup: cg,
            lan_veth,
            pods: Mutex::default(),
        });
        state.nodes.push(info.clone());
        Ok(Node {
            info,
            topo: inner.clone(),
        })
    }

    /// Remove everything now and report the first error; Drop does the same
    /// but can only print errors.
    pub fn close(self) -> Result<()> {
        self.inner.teardown()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.inner.teardown() {
            eprintln!(
                "sluice-tests: cleanup of topology {} incomplete: {e:#}",
                self.inner.prefix
            );
        }
    }
}

impl Inner {
    fn add_netns(&self, name: &str) -> Result<()> {
        netns::add(name)?;
        lock(&self.state).netns.push(name.into());
        Ok(())
    }

    /// Kill processes, delete netns (their devices go with them), rmdir
    /// cgroups. Keeps going past errors; idempotent.
    fn teardown(&self) -> Result<()> {
        let netns = {
            let mut state = lock(&self.state);
            state.torn_down = true;
            std::mem::take(&mut state.netns)
        };
        let mut first_err: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        self.registry.close_and_kill();
        // Whatever our children forked is in our cgroups too.
        note(cgroup::kill_all(&self.cgroup_root));
        for ns in netns.iter().rev() {
            note(netns::del(ns));
        }
        note(cgroup::remove_tree(&self.cgroup_root));
        first_err.map_or(Ok(()), Err)
    }
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
            /// Node: `<cgroup2>/<prefix>/<node>`; pod: `<cgroup2>/<prefix>/<node>/<pod>`.
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
    info: Arc<NodeInfo>,
    topo: Arc<Inner>,
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
        pods.into_iter()
            .map(|info| Pod {
                info,
                registry: self.topo.registry.clone(),
            })
            .collect()
    }

    /// Add a pod: netns `<prefix>-<node>-<name>`, eth0 with 10.10.<i>.<k>/32
    /// and fd10:<i>::<k>/128 (k = 1, 2, ... per node), veth `veth-p<k>` in
    /// the node netns, and cgroup `<prefix>/<node>/<name>`.
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
        let cg = node.cgroup.join(name);
        cgroup::create(&cg)?;

        let info = PodInfo {
            name: name.into(),
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
        let (veth, mac, hmac, v4, v6) = (
            &info.host_veth,
            &info.mac,
            &info.host_mac,
            info.ipv4,
            info.ipv6,
        );
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
        Ok(Pod {
            info,
            registry: topo.registry.clone(),
        })
    }
}

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
}

place_methods!(Pod, |p: &Pod| p.registry.clone());
