//! Holes a hostile pod could use (issue 9, "Found"), each checked on real
//! agents and real sockets, in both capture modes.
//!
//! ```text
//!   node1: a1 (sa sleep), a4 (sa sleep, same identity as a1), u1 (not enrolled)
//!   node2: b1 (sa httpbin), echo server on 8080 printing each peer
//! ```

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    output_in,
    peer::target_bin,
    require_root,
    traffic::{echo_server, send, send_verified},
    Agent, Node, Pod, Topology,
};

const MODES: &[&str] = &["iptables", "ebpf"];
const T: Duration = Duration::from_secs(30);

struct Fixture {
    mesh: Mesh,
    n1: Node,
    n2: Node,
    a1: Pod,
    a4: Pod,
    u1: Pod,
    b1: Pod,
    _topo: Topology,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let (a1, a4, u1) = (n1.add_pod("a1")?, n1.add_pod("a4")?, n1.add_pod("u1")?);
    let b1 = n2.add_pod("b1")?;
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&a1, "default", "sleep", true);
    mesh.add(&a4, "default", "sleep", true);
    mesh.add(&u1, "default", "legacy", false);
    mesh.add(&b1, "default", "httpbin", true);
    mesh.write_config()?;
    Ok(Fixture { mesh, n1, n2, a1, a4, u1, b1, _topo: topo })
}

fn fd_count(agent: &Agent) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))?.count())
}

fn self_calls(node: &Node, direction: &str) -> Result<u64> {
    let m = http_get(node, 15020, "/metrics")?;
    Ok(metric_sum(&m, "sluice_hbone_errors_total", &[&format!("direction=\"{direction}\""), "status=\"self_call\""]))
}

/// The agent's sk_assign listener ports in `pod` (eBPF mode binds them to
/// port 0): every IPv4 listener but the fixed three and the test's server.
fn assign_ports(pod: &Pod) -> Result<Vec<u16>> {
    let ss = pod.exec_ok(&["ss", "-Hltn4"])?;
    let mut ports: Vec<u16> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next()?.parse().ok())
        .filter(|p| ![15001, 15006, 15008, 8080].contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// One exchange to an agent port must get nothing back: not a byte of the
/// 64 KiB it sends, and a failed exchange (reset or closed), within `T`.
fn gets_nothing(from: &Pod, addr: &str) -> Result<String> {
    let t = Instant::now();
    let r = send(from, addr, 64 << 10, T)?;
    ensure!(!r.ok && r.bytes_verified == 0, "{} -> {addr}: the exchange got bytes back: {r:?}", from.name());
    ensure!(
        t.elapsed() < Duration::from_secs(10),
        "{} -> {addr}: took {:?} (a hang, not a refusal)",
        from.name(),
        t.elapsed()
    );
    Ok(r.error.unwrap_or_default())
}

#[test]
fn connections_to_the_agents_own_ports_are_refused_without_a_loop() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let f = fixture(&format!("self{}", &mode[..1]))?;
        let (ag1, ag2) = (f.mesh.start_agent(&f.n1, mode)?, f.mesh.start_agent(&f.n2, mode)?);
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
        send_verified(&f.a1, &addr, 64 << 10, T)?;
        let fds = (fd_count(&ag1)?, fd_count(&ag2)?);
        let (out_before, in_before) = (self_calls(&f.n1, "outbound")?, self_calls(&f.n2, "inbound")?);
        let b1 = f.b1.ipv4();

        // Outbound, from an enrolled pod: its agent refuses before dialling.
        for port in [15001, 15006] {
            gets_nothing(&f.a1, &format!("{b1}:{port}"))?;
        }
        // Inbound, from a pod outside the mesh, straight at the listeners
        // (and in eBPF mode at the sk_assign listener, whose port the tc
        // program assigns like any app port).
        let mut inbound = vec![15001u16, 15006];
        if *mode == "ebpf" {
            let assign = assign_ports(&f.b1)?;
            ensure!(assign.len() == 1, "one IPv4 sk_assign listener in b1: {assign:?}");
            inbound.extend(assign);
        }
        for port in &inbound {
            gets_nothing(&f.u1, &format!("{b1}:{port}"))?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let outbound = self_calls(&f.n1, "outbound")? - out_before;
        let inbound_counted = self_calls(&f.n2, "inbound")? - in_before;
        ensure!(outbound == 2, "[{mode}] node1 counted {outbound} outbound self calls, want 2");
        // Redirected connections carry their original destination and are
        // counted; direct ones to 15001 may have none (no conntrack entry)
        // and are reset without counting. The sk_assign one always counts.
        ensure!(inbound_counted >= 1, "[{mode}] node2 counted {inbound_counted} inbound self calls");
        let after = (fd_count(&ag1)?, fd_count(&ag2)?);
        ensure!(
            after.0 <= fds.0 + 8 && after.1 <= fds.1 + 8,
            "[{mode}] the agents' descriptors grew: {fds:?} -> {after:?}"
        );
        // Still serving.
        let ok = send_verified(&f.a1, &addr, 256 << 10, T)?;
        ensure!(ok.bytes_verified == 256 << 10, "[{mode}] a1 -> b1 after the refusals: {ok:?}");
        evidence(&format!(
            "[{mode}] own ports: a1 -> b1:15001/15006 and u1 -> b1:{inbound:?} got 0 bytes back; self_call outbound +{outbound}, \
             inbound +{inbound_counted}; descriptors {fds:?} -> {after:?}; a1 -> b1:8080 still byte-exact"
        ));
    }
    Ok(())
}

/// Pool connections are dialled from the source pod's netns, so they carry
/// its address: two pods of one service account must never share one.
#[test]
fn pods_of_one_service_account_keep_their_own_source_ip() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let mut f = fixture(&format!("pool{}", &mode[..1]))?;
        let (_ag1, _ag2) = (f.mesh.start_agent(&f.n1, mode)?, f.mesh.start_agent(&f.n2, mode)?);
        let (mut srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &["--print-peer"])?;
        let mut peers = Vec::new();
        for pod in [&f.a1, &f.a4, &f.a1, &f.a4] {
            send_verified(pod, &addr, 32 << 10, T)?;
            peers.push(srv.wait_for_line("PEER ", Duration::from_secs(5))?);
        }
        let want = [f.a1.ipv4(), f.a4.ipv4(), f.a1.ipv4(), f.a4.ipv4()];
        for (seen, ip) in peers.iter().zip(want) {
            ensure!(
                seen.starts_with(&format!("PEER {ip}:")),
                "[{mode}] b1's app saw {peers:?}, want {want:?} in order"
            );
        }
        // a1 leaves the mesh: a4's connections do not depend on it.
        f.mesh.pods.iter_mut().find(|p| p.pod.name() == "a1").context("a1")?.enrolled = false;
        f.mesh.write_config()?;
        let t = Instant::now();
        loop {
            let dump: serde_json::Value = serde_json::from_str(&http_get(&f.n1, 15000, "/config_dump")?)?;
            let a1_enrolled = dump["pods"].as_array().into_iter().flatten().any(|p| p["uid"] == "default/a1");
            if !a1_enrolled {
                break;
            }
            ensure!(t.elapsed() < T, "a1 still enrolled after the config edit");
            std::thread::sleep(Duration::from_millis(100));
        }
        send_verified(&f.a4, &addr, 32 << 10, T)?;
        let seen = srv.wait_for_line("PEER ", Duration::from_secs(5))?;
        ensure!(seen.starts_with(&format!("PEER {}:", f.a4.ipv4())), "[{mode}] after a1 left, a4 was seen as {seen}");
        evidence(&format!(
            "[{mode}] a1 and a4 (both sa sleep) seen by b1's app as {peers:?}; after a1 left, a4 as {seen}"
        ));
    }
    Ok(())
}

fn opened_as_source(node: &Node) -> Result<u64> {
    let m = http_get(node, 15020, "/metrics")?;
    Ok(metric_sum(&m, "istio_tcp_connections_opened_total", &["reporter=\"source\""]))
}

/// eBPF capture exempts nothing an app can choose: not SO_MARK 0x539 (an
/// app with NET_ADMIN can set it; the agent's own sockets never sit in a
/// pod's cgroup), and not port 15008 to a host outside the mesh. iptables
/// mode keeps the mark exemption, as istio-cni does (README, "Security").
#[test]
fn ebpf_capture_has_no_mark_or_15008_exemption() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("exempt")?;
    let (_ag1, _ag2) = (f.mesh.start_agent(&f.n1, "ebpf")?, f.mesh.start_agent(&f.n2, "ebpf")?);
    let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    let (_plain, plain_addr) = echo_server(&f.u1, &format!("{}:15008", f.u1.ipv4()), &[])?;
    let before = opened_as_source(&f.n1)?;

    let mut marked = std::process::Command::new(target_bin("sluice-marked-connect", "SLUICE_MARKED_BIN"));
    marked.args([addr.as_str(), "0x539"]);
    let out = output_in(&f.a1, marked, T)?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "marked hello\n",
        "a1's marked connection to b1 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = send_verified(&f.a1, &plain_addr, 64 << 10, T)?;
    ensure!(r.bytes_verified == 64 << 10, "a1 -> u1:15008 (outside the mesh): {r:?}");
    std::thread::sleep(Duration::from_millis(500));
    let captured = opened_as_source(&f.n1)? - before;
    ensure!(captured == 2, "node1's agent carried {captured} of the 2 connections (a marked one and one to u1:15008)");
    evidence(&format!(
        "[ebpf] SO_MARK 0x539 from a1 and a1 -> u1:15008 (not meshed): both captured (+{captured} source connections on node1)"
    ));
    Ok(())
}
