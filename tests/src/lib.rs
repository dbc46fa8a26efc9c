//! Sluice's node-simulation test harness.
//!
//! Builds Kubernetes-like topologies on one machine out of real kernel
//! objects: nodes and pods are named network namespaces joined by veths and
//! a bridge, every node and pod has its own cgroup v2 directory, and real
//! processes (see [`spawn_in`] and the `sluice-peer` binary) move real bytes.
//! Everything is removed on drop, also when a test panics, and leftovers of
//! crashed runs are swept ([`sweep_stale`]).
//!
//! ```no_run
//! use sluice_tests::{require_root, Topology, peer_bin};
//! use std::{process::Command, time::Duration};
//!
//! fn pods_talk() -> anyhow::Result<()> {
//!     require_root!(Ok(()));
//!     let topo = Topology::new("demo")?;
//!     let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
//!     let (a, b) = (n1.add_pod("a")?, n2.add_pod("b")?);
//!     let mut server = Command::new(peer_bin());
//!     server.args(["serve", "--listen", &format!("{}:0", b.ipv4())]);
//!     let mut server = b.spawn(server)?;
//!     let addr = server.wait_for_line("LISTENING ", Duration::from_secs(5))?;
//!     let mut client = Command::new(peer_bin());
//!     client.args(["send", "--connect", &addr["LISTENING ".len()..], "--bytes", "1000"]);
//!     let out = a.output(client, Duration::from_secs(10))?;
//!     assert!(out.status.success());
//!     Ok(())
//! }
//! ```
//!
//! All of it needs root; start every test with [`require_root!`].

pub mod agent;
pub mod bench;
pub mod capture;
pub mod cgroup;
pub mod cni_chain;
pub mod fake_api;
pub mod kube_mesh;
pub mod mesh;
pub mod names;
pub mod netns;
pub mod node;
pub mod pattern;
pub mod peer;
pub mod process;
pub mod skip;
pub mod sweep;
pub mod tcpinfo;
pub mod topology;
pub mod traffic;

pub use agent::{agent_bin, evidence, kernel_counters, Agent, PinDir};
pub use cgroup::{cgroup2_mount, cgroup_of};
pub use names::HARNESS_PREFIX;
pub use netns::{exec_in, exec_in_ok, netns_path};
pub use node::{CniPod, Node, Pod};
pub use peer::{peer_bin, SendReport, ServeReport};
pub use process::{output_in, spawn_in, ChildGuard, Place};
pub use skip::root_or_skip;
pub use sweep::sweep_stale;
pub use tcpinfo::{tcp_info, TcpInfo};
pub use topology::Topology;
