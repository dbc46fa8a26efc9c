//! Services on the data path, end to end, in both capture modes: an app
//! dials a ClusterIP that is routed nowhere, and the agent resolves it to an
//! endpoint and its target port, then takes the same path as for a pod IP.
//! The services come from the local config file, in ztunnel's shape.
//!
//! One topology per mode, reused by every scenario (in order, each able to
//! fail on its own; all run, and the test fails naming the ones that did):
//!
//! ```text
//!   node1: c1 (client, enrolled, sa sleep)   l1 (enrolled endpoint, same node)
//!   node2: e2, e3 (enrolled endpoints)        u2 (endpoint outside the mesh)
//!
//!   web      10.96.0.10, fd96::10  80 -> 8080   e2, e3 (e3 on 8081: its own targetPort)
//!   local    10.96.0.11            80 -> 8080   l1
//!   legacy   10.96.0.12            80 -> 9090   u2
//!   empty    10.96.0.13            80 -> 8080   none
//!   pinned   10.96.0.14            80 -> 8080   l1, e2; internalTrafficPolicy Local
//!   moving   10.96.0.15            80 -> 8080   e2, moved to e3 (8081) while traffic runs
//!   mixed    10.96.0.16            80 -> 8080   l1, e2 (Cluster: either may be picked)
//! ```

use std::{
    collections::BTreeSet,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use sluice_tests::{
    capture::{Capture, Pcap, WireReport, HBONE_PORT},
    evidence,
    kube_mesh::ISTIO_TCP_LABELS,
    mesh::{http_get, metric_sum, Mesh, MeshService},
    pattern, peer_bin, require_root, spawn_in,
    traffic::{echo_server, send, send_verified},
    Agent, ChildGuard, Node, Pod, SendReport, Topology,
};

const T: Duration = Duration::from_secs(60);

const WEB: &str = "10.96.0.10:80";
const WEB_V6: &str = "[fd96::10]:80";
const LOCAL: &str = "10.96.0.11:80";
const LEGACY: &str = "10.96.0.12:80";
const EMPTY: &str = "10.96.0.13:80";
const PINNED: &str = "10.96.0.14:80";
const MOVING: &str = "10.96.0.15:80";
const MIXED: &str = "10.96.0.16:80";
const VIPS: [&str; 8] =
    ["10.96.0.10", "fd96::10", "10.96.0.11", "10.96.0.12", "10.96.0.13", "10.96.0.14", "10.96.0.15", "10.96.0.16"];

/// The echo servers, each printing `PEER <addr>` per connection.
struct Servers {
    e2: ChildGuard,
    e2_v6: ChildGuard,
    e3: ChildGuard,
    e3_v6: ChildGuard,
    l1: ChildGuard,
    u2: ChildGuard,
}

impl Servers {
    fn all(&mut self) -> [(&'static str, &mut ChildGuard); 6] {
        [
            ("e2", &mut self.e2),
            ("e2 v6", &mut self.e2_v6),
            ("e3", &mut self.e3),
            ("e3 v6", &mut self.e3_v6),
            ("l1", &mut self.l1),
            ("u2", &mut self.u2),
        ]
    }

    /// Forgets the connections seen so far.
    fn drain(&mut self) {
        for (_, s) in self.all() {
            peers(s);
        }
    }
}

/// The `PEER` lines `server` printed since the last call.
fn peers(server: &mut ChildGuard) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(line)) = server.next_line(Duration::from_millis(150)) {
        if line.starts_with("PEER ") {
            out.push(line);
        }
    }
    out
}

struct Fixture {
    mode: &'static str,
    mesh: Mesh,
    n1: Node,
    n2: Node,
    c1: Pod,
    e2: Pod,
    ag1: Agent,
    ag2: Agent,
    srv: Servers,
    moving: String,
    // Dropped last: agents and servers die with it.
    topo: Topology,
}

fn fixture(mode: &'static str) -> Result<Fixture> {
    let topo = Topology::new(&format!("svc{}", &mode[..2]))?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let (c1, l1) = (n1.add_pod("c1")?, n1.add_pod("l1")?);
    let (e2, e3, u2) = (n2.add_pod("e2")?, n2.add_pod("e3")?, n2.add_pod("u2")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&c1, "default", "sleep", true);
    mesh.add(&l1, "default", "web", true);
    mesh.add(&e2, "default", "web", true);
    mesh.add(&e3, "default", "web", true);
    mesh.add(&u2, "default", "legacy", false);
    mesh.label("c1", "sleep", &[("app", "sleep"), ("version", "v1")]);
    mesh.label("l1", "web-local", &[("app", "web"), ("version", "v1")]);
    mesh.label("e2", "web", &[("app", "web"), ("version", "v1")]);
    mesh.label("e3", "web", &[("app", "web"), ("version", "v2")]);
    // `web` first: the destination side names the first service an
    // endpoint serves on the port it was asked for.
    let web = mesh.add_service(MeshService::new("web", "default", &["10.96.0.10", "fd96::10"], &[(80, 8080)]));
    let local = mesh.add_service(MeshService::new("local", "default", &["10.96.0.11"], &[(80, 8080)]));
    let legacy = mesh.add_service(MeshService::new("legacy", "default", &["net1/10.96.0.12"], &[(80, 9090)]));
    mesh.add_service(MeshService::new("empty", "default", &["10.96.0.13"], &[(80, 8080)]));
    let pinned = mesh.add_service(MeshService {
        local_only: true,
        ..MeshService::new("pinned", "default", &["10.96.0.14"], &[(80, 8080)])
    });
    let moving = mesh.add_service(MeshService::new("moving", "default", &["10.96.0.15"], &[(80, 8080)]));
    let mixed = mesh.add_service(MeshService::new("mixed", "default", &["10.96.0.16"], &[(80, 8080)]));
    mesh.add_endpoint("e2", &web, &[]);
    mesh.add_endpoint("e3", &web, &[(80, 8081)]);
    mesh.add_endpoint("l1", &local, &[]);
    mesh.add_endpoint("u2", &legacy, &[]);
    mesh.add_endpoint("l1", &pinned, &[]);
    mesh.add_endpoint("e2", &pinned, &[]);
    mesh.add_endpoint("e2", &moving, &[]);
    mesh.add_endpoint("l1", &mixed, &[]);
    mesh.add_endpoint("e2", &mixed, &[]);
    mesh.write_config()?;
    let ag1 = mesh.start_agent(&n1, mode)?;
    let ag2 = mesh.start_agent(&n2, mode)?;
    let serve = |pod: &Pod, listen: String| echo_server(pod, &listen, &["--print-peer"]).map(|(s, _)| s);
    let srv = Servers {
        e2: serve(&e2, format!("{}:8080", e2.ipv4()))?,
        e2_v6: serve(&e2, format!("[{}]:8080", e2.ipv6()))?,
        // e3 serves `web` on 8081 only: a connection that reaches it went
        // through its own targetPort.
        e3: serve(&e3, format!("{}:8081", e3.ipv4()))?,
        e3_v6: serve(&e3, format!("[{}]:8081", e3.ipv6()))?,
        l1: serve(&l1, format!("{}:8080", l1.ipv4()))?,
        u2: serve(&u2, format!("{}:9090", u2.ipv4()))?,
    };
    Ok(Fixture { mode, mesh, n1, n2, c1, e2, ag1, ag2, srv, moving, topo })
}

/// `sluice-peer send --sequential`: writes everything, half-closes, then
/// reads the echo. Same-node connections to a spliced endpoint use it for
/// small transfers: a client blocked in read() on one thread while another
/// thread half-closes its socket gets EAGAIN once that socket is in a
/// sockmap (README, "Same-node splice", limits), which a concurrent
/// small-transfer client hits.
fn send_sequential(pod: &Pod, addr: &str, bytes: u64) -> Result<SendReport> {
    let mut c = Command::new(peer_bin());
    c.args(["send", "--connect", addr, "--bytes", &bytes.to_string(), "--sequential", "--timeout-secs", "30"]);
    let out = sluice_tests::output_in(pod, c, Duration::from_secs(35))?;
    let r: SendReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("sluice-peer send: {}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(r.ok && r.bytes_verified == bytes, "echo to {addr} not byte-exact: {r:?}");
    Ok(r)
}

fn metrics(node: &Node) -> Result<String> {
    http_get(node, 15020, "/metrics")
}

fn reloads(node: &Node) -> Result<u64> {
    Ok(metric_sum(&metrics(node)?, "sluice_config_reloads_total", &["result=\"ok\""]))
}

/// Writes the config and waits until both agents have applied it.
fn apply(f: &Fixture) -> Result<()> {
    let before = (reloads(&f.n1)?, reloads(&f.n2)?);
    f.mesh.write_config()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if reloads(&f.n1)? > before.0 && reloads(&f.n2)? > before.1 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the agents did not apply the new config within 10 s")
}

fn counter(c: &serde_json::Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or(0)
}

/// 64-byte windows of the `sluice-peer` stream at `offsets`.
fn markers(offsets: &[u64]) -> Vec<[u8; 64]> {
    offsets
        .iter()
        .map(|&off| {
            let mut w = [0u8; 64];
            pattern::fill(off, &mut w);
            w
        })
        .collect()
}

/// Captures on the lan bridge between the nodes while `traffic` runs.
fn on_the_wire<R>(f: &Fixture, label: &str, traffic: impl FnOnce() -> Result<R>) -> Result<(WireReport, R)> {
    let file = f.mesh.dir.path().join(format!("{}-{label}.pcap", f.mode));
    let cap = Capture::start(&f.topo.lan_netns(), f.topo.bridge(), &file)?;
    let out = traffic()?;
    let (pcap, stats) = cap.stop_with_stats()?;
    let report = WireReport::from_pcap(&pcap)?;
    ensure!(stats.complete(), "{label}: tcpdump lost packets: {stats:?}");
    ensure!(report.gap_bytes == 0, "{label}: {} bytes missing from the capture", report.gap_bytes);
    evidence(&format!("[{}] {label} wire: {}", f.mode, report.summary()));
    Ok((report, out))
}

fn no_vip_on_the_wire(r: &WireReport) -> Result<()> {
    let vips: BTreeSet<IpAddr> = VIPS.iter().map(|v| v.parse().unwrap()).collect();
    ensure!(r.addrs_seen.is_disjoint(&vips), "a service VIP appeared on the wire: {:?}", r.addrs_seen);
    Ok(())
}

/// VIP -> two endpoints on the other node, over HBONE: byte-exact, the app
/// sees the client pod's IP, only 15008 on the wire, 40 connections spread
/// over both endpoints, each on its own target port; and the IPv6 VIP.
fn vip_to_remote_endpoints(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let secret = markers(&[0, 1 << 20, (8 << 20) - 64]);
    let (wire, big) = on_the_wire(f, "web", || {
        let big = send_verified(&f.c1, WEB, 8 << 20, T)?;
        for i in 0..40 {
            send_verified(&f.c1, WEB, 64 << 10, T).with_context(|| format!("connection #{i} to {WEB}"))?;
        }
        send_verified(&f.c1, WEB_V6, 1 << 20, T)?;
        Ok(big)
    })?;
    ensure!(wire.segments > 0 && wire.ports_seen.contains(&HBONE_PORT), "no HBONE seen: {}", wire.summary());
    ensure!(wire.non_hbone_segments == 0, "TCP without port {HBONE_PORT} between the nodes: {}", wire.summary());
    ensure!(wire.non_tls_streams == 0 && wire.tls_other_streams == 0, "a stream was not TLS 1.3: {}", wire.summary());
    ensure!(secret.iter().all(|w| !wire.contains(w)), "application bytes visible on the wire");
    no_vip_on_the_wire(&wire)?;

    let (e2, e3) = (peers(&mut f.srv.e2), peers(&mut f.srv.e3));
    let (e2_v6, e3_v6) = (peers(&mut f.srv.e2_v6), peers(&mut f.srv.e3_v6));
    let v4_client = format!("PEER {}:", f.c1.ipv4());
    let v6_client = format!("PEER [{}]:", f.c1.ipv6());
    ensure!(
        e2.iter().chain(&e3).all(|p| p.starts_with(&v4_client)),
        "the apps must see the client pod's IP {}: {e2:?} {e3:?}",
        f.c1.ipv4()
    );
    ensure!(e2.len() + e3.len() == 41, "41 IPv4 connections, the apps saw {} + {}", e2.len(), e3.len());
    ensure!(
        !e2.is_empty() && !e3.is_empty(),
        "40 connections all went to one endpoint: e2 {} e3 {}",
        e2.len(),
        e3.len()
    );
    ensure!(
        e2_v6.len() + e3_v6.len() == 1 && e2_v6.iter().chain(&e3_v6).all(|p| p.starts_with(&v6_client)),
        "the IPv6 VIP must reach an endpoint over IPv6 with the client's IPv6: {e2_v6:?} {e3_v6:?}"
    );
    Ok(format!(
        "8 MiB byte-exact in {} ms; 41 IPv4 connections spread e2:8080 {} / e3:8081 {} (each endpoint on its own \
         targetPort), app saw {}; IPv6 VIP reached {} over IPv6; wire: only {HBONE_PORT}, all TLS 1.3, no VIP, no \
         plaintext",
        big.elapsed_ms,
        e2.len(),
        e3.len(),
        f.c1.ipv4(),
        if e2_v6.is_empty() { "e3" } else { "e2" },
    ))
}

/// VIP -> an enrolled endpoint on the client's own node: spliced in the
/// kernel in eBPF mode (the VIP is in splice_services, so the app's socket
/// was admitted), HBONE through the same agent with iptables.
fn vip_to_same_node_endpoint(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let before = if f.mode == "ebpf" { Some(f.ag1.counters()?) } else { None };
    let m0 = metrics(&f.n1)?;
    let report = send_verified(&f.c1, LOCAL, 32 << 20, T)?;
    let seen = peers(&mut f.srv.l1);
    ensure!(
        seen.len() == 1 && seen[0].starts_with(&format!("PEER {}:", f.c1.ipv4())),
        "l1 must see one connection from the client's IP: {seen:?}"
    );
    let m1 = metrics(&f.n1)?;
    let needles = ["reporter=\"destination\"", "destination_service=\"local.default.svc.cluster.local\"", "mutual_tls"];
    let counted = metric_sum(&m1, "istio_tcp_received_bytes_total", &needles)
        - metric_sum(&m0, "istio_tcp_received_bytes_total", &needles);
    ensure!(counted == 32 << 20, "the destination side must count 32 MiB for service `local`, counted {counted}");
    let path = match before {
        Some(before) => {
            let after = f.ag1.counters()?;
            let spliced = counter(&after, "spliced_bytes") - counter(&before, "spliced_bytes");
            let switched = counter(&after, "splice_switched") - counter(&before, "splice_switched");
            ensure!(switched >= 2, "both directions must be taken over by the kernel (switched {switched}): {after}");
            ensure!(spliced >= 56 << 20, "most of the 64 MiB must be spliced, got {spliced}: {after}");
            let dump = bpftool_dump(&f.ag1, "splice_services")?;
            ensure!(dump.contains("\"local_endpoints\": 1"), "splice_services must list the VIP: {dump}");
            format!("spliced in the kernel: {spliced} bytes, {switched} directions switched")
        }
        None => "HBONE through the node's own agent".into(),
    };
    Ok(format!("32 MiB byte-exact in {} ms, {path}; app saw {}", report.elapsed_ms, f.c1.ipv4()))
}

fn bpftool_dump(agent: &Agent, map: &str) -> Result<String> {
    let out = Command::new("bpftool").args(["-p", "map", "dump", "pinned"]).arg(agent.pin_root.join(map)).output()?;
    ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A service with endpoints on both nodes: every connection's app socket
/// is admitted to the sockmap (the VIP is in splice_services), and the ones
/// that go to the other node over HBONE must leave it again, or the app
/// would keep the sockmap's blocking-read limit on a connection that is not
/// even spliced.
fn mixed_service_releases_unspliced_sockets(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    for i in 0..20 {
        send_sequential(&f.c1, MIXED, 16 << 10).with_context(|| format!("connection #{i}"))?;
    }
    let (l1, e2) = (peers(&mut f.srv.l1), peers(&mut f.srv.e2));
    ensure!(l1.len() + e2.len() == 20 && !l1.is_empty() && !e2.is_empty(), "spread: l1 {} e2 {}", l1.len(), e2.len());
    if f.mode != "ebpf" {
        return Ok(format!("20 connections spread l1 {} / e2 {}", l1.len(), e2.len()));
    }
    // An open connection that went to e2 (retrying until one does).
    let before = counter(&f.ag1.counters()?, "sockhash_added");
    let mut open = None;
    for _ in 0..16 {
        let mut c = Command::new(peer_bin());
        c.args(["send", "--connect", MIXED, "--bytes", &(1u64 << 40).to_string(), "--timeout-secs", "60"]);
        let client = spawn_in(&f.c1, c)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut went = None;
        while went.is_none() && Instant::now() < deadline {
            if !peers(&mut f.srv.e2).is_empty() {
                went = Some("e2");
            } else if !peers(&mut f.srv.l1).is_empty() {
                went = Some("l1");
            }
        }
        if went == Some("e2") {
            open = Some(client);
            break;
        }
        drop(client);
    }
    let client = open.context("no connection to `mixed` went to e2 in 16 tries")?;
    std::thread::sleep(Duration::from_millis(200));
    let admitted = counter(&f.ag1.counters()?, "sockhash_added") - before;
    let keys = sock_pair_keys(&f.ag1)?;
    let app_ends: Vec<_> = keys.iter().filter(|(_, remote_port)| *remote_port == 15001).collect();
    ensure!(client.try_status()?.is_none(), "the HBONE connection ended early");
    drop(client);
    ensure!(admitted >= 1, "the app socket of a connection to the VIP must have been admitted: {admitted}");
    ensure!(app_ends.is_empty(), "an app socket stayed in sock_pairs with its connection not spliced: {keys:?}");
    Ok(format!(
        "20 connections spread l1 {} / e2 {}; an open connection to e2 over HBONE: its app socket was admitted          ({admitted} sockhash adds) and taken out again (sock_pairs holds {} keys, none an app end facing 15001)",
        l1.len(),
        e2.len(),
        keys.len()
    ))
}

/// (local port, remote port) of every key in the agent's sock_pairs.
fn sock_pair_keys(agent: &Agent) -> Result<Vec<(u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_root.join("sock_pairs"))
        .output()?;
    ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool output: {}", String::from_utf8_lossy(&out.stdout)))?;
    let mut keys = Vec::new();
    for e in entries.as_array().into_iter().flatten() {
        // The raw key: SockKey, 48 bytes; the ports are the last two u32s
        // in host order.
        let bytes: Vec<u8> = e["key"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .filter_map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
            .collect();
        ensure!(bytes.len() == 48, "unexpected sock_pairs entry: {e}");
        let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as u64;
        keys.push((word(40), word(44)));
    }
    Ok(keys)
}

/// VIP -> an endpoint outside the mesh: plain TCP from the client pod to
/// endpoint_ip:targetPort (9090), never 15008.
fn vip_to_non_mesh_endpoint(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let visible = markers(&[0, (1 << 20) - 64]);
    let (wire, _) = on_the_wire(f, "legacy", || send_verified(&f.c1, LEGACY, 1 << 20, T))?;
    ensure!(wire.ports_seen.contains(&9090), "plaintext to the target port 9090 expected: {}", wire.summary());
    ensure!(!wire.ports_seen.contains(&HBONE_PORT), "an endpoint outside the mesh got HBONE: {}", wire.summary());
    ensure!(visible.iter().all(|w| wire.contains(w)), "the capture must see the plaintext bytes");
    no_vip_on_the_wire(&wire)?;
    let seen = peers(&mut f.srv.u2);
    ensure!(
        seen.len() == 1 && seen[0].starts_with(&format!("PEER {}:", f.c1.ipv4())),
        "u2 must see one connection from the client pod's IP: {seen:?}"
    );
    Ok(format!("1 MiB byte-exact as plaintext to {}:9090 (ports on the wire {:?})", "u2", wire.ports_seen))
}

/// A VIP with no endpoint, and a port the service does not have: reset
/// (ECONNRESET, never an EOF), no app sees anything, each attempt counted.
fn vip_without_endpoints_is_reset(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let errors = |node: &Node| -> Result<u64> {
        Ok(metric_sum(&metrics(node)?, "sluice_hbone_errors_total", &["status=\"no_healthy_upstream\""]))
    };
    let before = errors(&f.n1)?;
    let attempts = [EMPTY, EMPTY, EMPTY, "10.96.0.10:81", "10.96.0.10:81"];
    let file = f.mesh.dir.path().join(format!("{}-reset.pcap", f.mode));
    // The app <-> agent leg stays inside the client pod (lo).
    let cap = Capture::start(f.c1.netns_name(), "lo", &file)?;
    let mut outcomes = Vec::new();
    for addr in attempts {
        // 0 bytes: a clean close would be a successful (empty) echo.
        let r = send(&f.c1, addr, 0, Duration::from_secs(10))?;
        let error = r.error.clone().unwrap_or_default();
        ensure!(!r.ok, "{addr}: the client saw a clean close, not a reset: {r:?}");
        // 104: read() got ECONNRESET; 107: the reset came before the
        // client's own shutdown(), which only a reset socket refuses.
        ensure!(error.contains("os error 104") || error.contains("os error 107"), "{addr}: not a reset: {r:?}");
        outcomes.push(error);
    }
    let pcap = Pcap::parse(&cap.stop()?)?;
    // The agent's side: every segment not sent to 15001 (with iptables,
    // conntrack shows the agent's replies as coming from the VIP).
    let from_agent: Vec<_> = pcap.segments.iter().filter(|s| s.dst.port() != 15001).collect();
    let rst = from_agent.iter().filter(|s| s.flags & 0x04 != 0).count();
    let fin = from_agent.iter().filter(|s| s.flags & 0x01 != 0).count();
    ensure!(rst >= attempts.len() && fin == 0, "the agent must answer with RST and never FIN: {rst} RST, {fin} FIN");
    let moved = errors(&f.n1)? - before;
    ensure!(moved == attempts.len() as u64, "no_healthy_upstream moved by {moved} for {} attempts", attempts.len());
    for (name, s) in f.srv.all() {
        let seen = peers(s);
        ensure!(seen.is_empty(), "app {name} was reached: {seen:?}");
    }
    Ok(format!(
        "{} attempts (3 to a service without endpoints, 2 to a port the service lacks): all reset ({} RST, 0 FIN \
         from the agent on the pod's lo; client errors {:?}), no app reached, no_healthy_upstream +{moved}",
        attempts.len(),
        rst,
        outcomes.iter().map(|e| e.rsplit(": ").next().unwrap_or(e)).collect::<BTreeSet<_>>()
    ))
}

/// internalTrafficPolicy Local: only endpoints on the client's node.
fn local_traffic_policy(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    for i in 0..20 {
        send_sequential(&f.c1, PINNED, 16 << 10).with_context(|| format!("connection #{i}"))?;
    }
    let (l1, e2) = (peers(&mut f.srv.l1), peers(&mut f.srv.e2));
    ensure!(
        l1.len() == 20 && e2.is_empty(),
        "Local must keep every connection on node1: l1 {} e2 {}",
        l1.len(),
        e2.len()
    );
    Ok("20 connections to a Local service with endpoints on both nodes: 20 to l1 (same node), 0 to e2".into())
}

/// Rewriting the endpoints while a transfer runs: new connections follow
/// the new endpoint at once, the open one finishes byte-exact on the old.
fn endpoints_change_under_traffic(f: &mut Fixture) -> Result<String> {
    const LONG: u64 = 16 << 20;
    f.srv.drain();
    // The old endpoint's replies are slowed to 40 Mbit/s, so the transfer
    // is certainly still open when the change lands.
    f.e2.exec_ok(&[
        "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "64kb", "latency", "1s",
    ])?;
    let result = (|| -> Result<String> {
        let mut long = Command::new(peer_bin());
        long.args(["send", "--connect", MOVING, "--bytes", &LONG.to_string(), "--timeout-secs", "60"]);
        let client = spawn_in(&f.c1, long)?;
        f.srv.e2.wait_for_line("PEER ", Duration::from_secs(10)).context("the transfer must start on e2")?;
        let moving = f.moving.clone();
        f.mesh.remove_endpoint("e2", &moving);
        f.mesh.add_endpoint("e3", &moving, &[(80, 8081)]);
        apply(f)?;
        for i in 0..10 {
            send_verified(&f.c1, MOVING, 16 << 10, T).with_context(|| format!("new connection #{i}"))?;
        }
        let still_open = client.try_status()?.is_none();
        let (e2, e3) = (peers(&mut f.srv.e2), peers(&mut f.srv.e3));
        ensure!(e3.len() == 10 && e2.is_empty(), "new connections must go to e3 only: e3 {} e2 {}", e3.len(), e2.len());
        ensure!(still_open, "the long transfer ended before the change: the test proves nothing");
        let out = client.finish(Duration::from_secs(60))?;
        let r: SendReport = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("long client: {}", String::from_utf8_lossy(&out.stderr)))?;
        ensure!(r.ok && r.bytes_verified == LONG, "the open connection must finish byte-exact: {r:?}");
        Ok(format!(
            "endpoints rewritten e2 -> e3 during a 16 MiB transfer: 10 new connections all to e3:8081, the open \
             one finished byte-exact on e2 in {} ms",
            r.elapsed_ms
        ))
    })();
    f.e2.exec_ok(&["tc", "qdisc", "del", "dev", "eth0", "root"])?;
    let moving = f.moving.clone();
    f.mesh.remove_endpoint("e3", &moving);
    f.mesh.add_endpoint("e2", &moving, &[]);
    apply(f)?;
    result
}

/// A policy that arrives while connections are open closes them: an HBONE
/// one (to `web`, on node2) and a same-node one (to `local`: spliced in
/// eBPF mode), each reset at the client and counted once.
fn new_policy_closes_open_connections(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let denials = |node: &Node| -> Result<u64> {
        Ok(metric_sum(&metrics(node)?, "sluice_auth_denials_total", &["policy=\"default/deny-sleep\""]))
    };
    let before = (denials(&f.n1)?, denials(&f.n2)?);
    let switched_before = if f.mode == "ebpf" { counter(&f.ag1.counters()?, "splice_switched") } else { 0 };
    let endless = |addr: &str| -> Result<ChildGuard> {
        let mut c = Command::new(peer_bin());
        c.args(["send", "--connect", addr, "--bytes", &(1u64 << 40).to_string(), "--timeout-secs", "60"]);
        spawn_in(&f.c1, c)
    };
    let (remote, local) = (endless(WEB)?, endless(LOCAL)?);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut remote_seen = false;
    while !remote_seen && Instant::now() < deadline {
        remote_seen = !peers(&mut f.srv.e2).is_empty() || !peers(&mut f.srv.e3).is_empty();
    }
    ensure!(remote_seen, "the HBONE connection never reached web's endpoints");
    f.srv.l1.wait_for_line("PEER ", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(remote.try_status()?.is_none() && local.try_status()?.is_none(), "a client ended before the policy");
    let spliced = if f.mode == "ebpf" { counter(&f.ag1.counters()?, "splice_switched") - switched_before } else { 0 };

    f.mesh.policies_yaml = "  - name: deny-sleep\n    namespace: default\n    selector: { names: [e2, e3, l1] }\n    action: DENY\n    rules:\n      - from: [{ principals: [\"cluster.local/ns/default/sa/sleep\"] }]\n".into();
    let applied = Instant::now();
    apply(f)?;
    let finish = |c: ChildGuard, what: &str| -> Result<SendReport> {
        let out = c.finish(Duration::from_secs(15)).with_context(|| format!("{what}: the client was not closed"))?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let (r_remote, r_local) = (finish(remote, "HBONE")?, finish(local, "same node")?);
    let closed_after = applied.elapsed();
    f.mesh.policies_yaml.clear();
    apply(f)?;
    for (what, r) in [("HBONE", &r_remote), ("same node", &r_local)] {
        let error = r.error.clone().unwrap_or_default();
        // ECONNRESET, or EPIPE for the writer when the reader took the
        // reset (the socket reports it once).
        ensure!(
            !r.ok && (error.contains("os error 104") || error.contains("os error 32")),
            "{what}: the client must see a reset: {r:?}"
        );
    }
    let counted = (denials(&f.n1)? - before.0, denials(&f.n2)? - before.1);
    ensure!(counted == (1, 1), "each closed connection counted once (node1, node2): {counted:?}");
    for (agent, what) in [(&f.ag1, "node1"), (&f.ag2, "node2")] {
        ensure!(
            agent.stderr().contains("closing an open connection the new policy denies"),
            "{what}'s agent must log the closed connection"
        );
    }
    if f.mode == "ebpf" {
        ensure!(spliced >= 1, "the same-node connection must have been spliced before the policy");
    }
    Ok(format!(
        "DENY added with an HBONE and a {} connection open: both reset at the client within {} ms of the reload \
         (errors {:?} / {:?}), counted once on each node",
        if f.mode == "ebpf" { "spliced" } else { "same-node HBONE" },
        closed_after.as_millis(),
        r_remote.error.as_deref().unwrap_or("").rsplit(": ").next(),
        r_local.error.as_deref().unwrap_or("").rsplit(": ").next(),
    ))
}

/// One Prometheus sample line's labels.
fn labels(line: &str) -> Vec<(String, String)> {
    let Some(inner) = line.split_once('{').and_then(|(_, rest)| rest.rsplit_once('}')).map(|(l, _)| l) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = inner;
    while let Some((name, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        out.push((name.trim_start_matches(',').to_string(), after[..end].to_string()));
        rest = &after[end + 1..];
    }
    out
}

/// The labels Istio's tooling reads are all there, with Istio's values.
fn metric_labels(f: &mut Fixture) -> Result<String> {
    let mut lines = 0;
    for node in [&f.n1, &f.n2] {
        let m = metrics(node)?;
        for line in m.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total{")) {
            lines += 1;
            let l = labels(line);
            let names: BTreeSet<&str> = l.iter().map(|(k, _)| k.as_str()).collect();
            let missing: Vec<&&str> = ISTIO_TCP_LABELS.iter().filter(|n| !names.contains(**n)).collect();
            ensure!(missing.is_empty(), "{missing:?} missing on {line}");
            for (k, v) in &l {
                if k.ends_with("_principal") {
                    ensure!(v == "unknown" || v.starts_with("spiffe://cluster.local/ns/"), "{k}={v} on {line}");
                }
            }
        }
        ensure!(m.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\""), "no SPIFFE principal");
    }
    let (m1, m2) = (metrics(&f.n1)?, metrics(&f.n2)?);
    let web = [
        "destination_service=\"web.default.svc.cluster.local\"",
        "destination_service_name=\"web\"",
        "destination_service_namespace=\"default\"",
        "destination_workload=\"web\"",
        "destination_app=\"web\"",
        "source_workload=\"sleep\"",
        "source_app=\"sleep\"",
        "source_version=\"v1\"",
        "source_cluster=\"Kubernetes\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let name = "istio_tcp_connections_opened_total";
    let source = metric_sum(&m1, name, &[&["reporter=\"source\""][..], &web].concat());
    let destination = metric_sum(&m2, name, &[&["reporter=\"destination\""][..], &web].concat());
    ensure!(
        source >= 42 && destination >= 42,
        "service `web` on both reporters: source {source}, destination {destination}"
    );
    let plain = metric_sum(
        &m1,
        name,
        &["destination_service=\"legacy.default.svc.cluster.local\"", "connection_security_policy=\"unknown\""],
    );
    ensure!(plain >= 1, "plaintext to a service: connection_security_policy=\"unknown\" with the service named");
    Ok(format!(
        "{lines} istio_tcp_connections_opened_total series carry all {} Istio TCP labels; principals spiffe://; \
         service `web` named on {source} source / {destination} destination connections",
        ISTIO_TCP_LABELS.len()
    ))
}

type Scenario = fn(&mut Fixture) -> Result<String>;

const SCENARIOS: [(&str, Scenario); 9] = [
    ("vip_to_remote_endpoints", vip_to_remote_endpoints),
    ("vip_to_same_node_endpoint", vip_to_same_node_endpoint),
    ("mixed_service_releases_unspliced_sockets", mixed_service_releases_unspliced_sockets),
    ("vip_to_non_mesh_endpoint", vip_to_non_mesh_endpoint),
    ("vip_without_endpoints_is_reset", vip_without_endpoints_is_reset),
    ("local_traffic_policy", local_traffic_policy),
    ("metric_labels", metric_labels),
    ("endpoints_change_under_traffic", endpoints_change_under_traffic),
    ("new_policy_closes_open_connections", new_policy_closes_open_connections),
];

fn run(mode: &'static str) -> Result<()> {
    let started = Instant::now();
    let mut f = fixture(mode)?;
    let mut failed = Vec::new();
    for (name, scenario) in SCENARIOS {
        let t = Instant::now();
        match scenario(&mut f) {
            Ok(what) => evidence(&format!("[{mode}] {name} ({} ms): {what}", t.elapsed().as_millis())),
            Err(e) => {
                eprintln!("[{mode}] {name} FAILED: {e:#}");
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "[{mode}] failed: {failed:?}\nnode1 agent:\n{}\nnode2 agent:\n{}",
            tail(&f.ag1.stderr()),
            tail(&f.ag2.stderr())
        );
    }
    evidence(&format!("[{mode}] all {} scenarios in {} s", SCENARIOS.len(), started.elapsed().as_secs()));
    let Fixture { ag1, ag2, .. } = f;
    ag1.stop()?;
    ag2.stop()?;
    Ok(())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn services_with_iptables_capture() -> Result<()> {
    require_root!(Ok(()));
    run("iptables")
}

#[test]
fn services_with_ebpf_capture() -> Result<()> {
    require_root!(Ok(()));
    run("ebpf")
}
