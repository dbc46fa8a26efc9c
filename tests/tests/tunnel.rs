//! End to end through two real `sluice run` agents on two simulated nodes,
//! with iptables capture inside each pod's netns.
//!
//! Topology: node1 has enrolled pods a1, a2; node2 has enrolled pods b1, b2
//! and an unenrolled pod u. Everything the agents do is observed from
//! outside: bytes at the apps, the client IP the app saw, the capture on the
//! wire between the nodes, the agents' metrics and config dumps.

use std::time::Duration;

use anyhow::Result;
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    require_root,
    traffic::{echo_server, send_verified},
    Agent, Node, Pod, Topology,
};

struct Fixture {
    topo: Topology,
    mesh: Mesh,
    n1: Node,
    n2: Node,
    a1: Pod,
    a2: Pod,
    b1: Pod,
    b2: Pod,
    u: Pod,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let (a1, a2) = (n1.add_pod("a1")?, n1.add_pod("a2")?);
    let (b1, b2, u) = (n2.add_pod("b1")?, n2.add_pod("b2")?, n2.add_pod("u")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&a1, "default", "sleep", true);
    mesh.add(&a2, "default", "sleep", true);
    mesh.add(&b1, "default", "httpbin", true);
    mesh.add(&b2, "other", "httpbin", true);
    mesh.add(&u, "default", "legacy", false);
    mesh.write_config()?;
    Ok(Fixture { topo, mesh, n1, n2, a1, a2, b1, b2, u })
}

fn agents(f: &Fixture, mode: &str) -> Result<(Agent, Agent)> {
    Ok((f.mesh.start_agent(&f.n1, mode)?, f.mesh.start_agent(&f.n2, mode)?))
}

#[test]
fn cross_node_pod_to_pod_over_hbone() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("hbone")?;
    let (ag1, ag2) = agents(&f, "iptables")?;
    let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &["--print-peer"])?;
    let report = send_verified(&f.a1, &addr, 8 << 20, Duration::from_secs(60))?;
    evidence(&format!("a1 -> b1 over HBONE: {} bytes verified in {} ms", report.bytes_verified, report.elapsed_ms));
    let m1 = http_get(&f.n1, 15020, "/metrics")?;
    let m2 = http_get(&f.n2, 15020, "/metrics")?;
    let src_bytes = metric_sum(&m1, "istio_tcp_received_bytes_total", &["reporter=\"source\"", "mutual_tls"]);
    let dst_opened = metric_sum(&m2, "istio_tcp_connections_opened_total", &["reporter=\"destination\"", "source_principal=\"cluster.local/ns/default/sa/sleep\""]);
    evidence(&format!("node1 source bytes {src_bytes}, node2 destination connections {dst_opened}"));
    assert!(src_bytes >= 8 << 20, "source agent did not count the bytes:\n{m1}");
    assert!(dst_opened >= 1, "destination agent did not see an mTLS connection from sleep:\n{m2}");
    ag1.stop()?;
    ag2.stop()?;
    drop(f.topo);
    Ok(())
}
