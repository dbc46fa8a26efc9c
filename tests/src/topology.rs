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
use crate::node::{node_ipv4, node_ipv6, NodeInfo};
use crate::process::{lock, Registry};
use crate::Node;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Bridge name inside the lan netns.
pub const BRIDGE: &str = "br0";
const MAX_NODES: usize = 200;

/// A set of nodes on one L2 segment. Dropping it removes everything it
/// created (processes, netns, devices, cgroups), also during a panic.
pub struct Topology {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) prefix: String,
    cgroup_root: PathBuf,
    pub(crate) registry: Arc<Registry>,
    pub(crate) state: Mutex<State>,
}

#[derive(Default)]
pub(crate) struct State {
    /// Created netns, in creation order; deleted in reverse.
    netns: Vec<String>,
    nodes: Vec<Arc<NodeInfo>>,
    pub(crate) torn_down: bool,
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
                Err(e) => return Err(e).with_context(|| format!("mkdir cgroup {}", root.display())),
            }
        }
        let (prefix, cgroup_root) = claimed.context("no free topology prefix after 8 tries")?;
        // From here on Drop cleans up whatever exists.
        let topo = Topology {
            inner: Arc::new(Inner { prefix, cgroup_root, registry: Arc::default(), state: Mutex::default() }),
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
        nodes.into_iter().map(|info| Node { info, topo: self.inner.clone() }).collect()
    }

    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.nodes().into_iter().find(|n| n.name() == name)
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
        netns::sysctl(&ns, &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
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
        let info =
            Arc::new(NodeInfo { name: name.into(), index, netns: ns, cgroup: cg, lan_veth, pods: Mutex::default() });
        state.nodes.push(info.clone());
        Ok(Node { info, topo: inner.clone() })
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
            eprintln!("sluice-tests: cleanup of topology {} incomplete: {e:#}", self.inner.prefix);
        }
    }
}

impl Inner {
    pub(crate) fn add_netns(&self, name: &str) -> Result<()> {
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
