//! Kubernetes discovery end to end, in both capture modes: real agents
//! (`sluice run --kubeconfig`) on the harness's nodes read Pods,
//! Namespaces, Services, EndpointSlices and Istio's AuthorizationPolicy and
//! PeerAuthentication from the fake API server (tests/src/fake_api), which
//! listens inside the topology's lan netns (tests/src/kube_mesh.rs). Every
//! change is made through the API and judged by what it does to real
//! traffic: echoes checked byte for byte, HBONE or plaintext on the wire
//! between the nodes, resets with nothing reaching the app, counters that
//! moved.
//!
//! One topology per mode, reused by every scenario (in order, each able to
//! fail on its own; all run, and the test fails naming the ones that did):
//!
//! ```text
//!   namespaces: mesh   istio.io/dataplane-mode=ambient     other  sluice.io/mode=enabled
//!               apps   (labelled and unlabelled by the test)
//!               legacy (never in the mesh)                  istio-system (root namespace, no pods)
//!
//!   node1: c1 mesh, sa sleep (Deployment sleep)   x1 apps        h1 mesh, hostNetwork
//!          l1 mesh, sa local                       u1 legacy      o1 other
//!          late mesh (listed by the API, no process until scenario 2)
//!   node2: s2 mesh, sa server (echo 8080, 8090)   e2, e3 mesh, sa web (Deployment web)
//!          x2 apps (echo 8090)                     u2 legacy (echo 9090)   o2 other (echo 8080)
//!
//!   web     10.96.0.10:80 -> e2:8080 (slice web-a), e3:8081 (slice web-b: "metrics" 9999, then "http" 8081)
//!   local   10.96.0.11:80 -> l1:8080 (same node as c1)
//!   legacy  10.96.0.12:80 -> u2:9090 (outside the mesh)
//!   empty   10.96.0.13:80 -> e2:8082, but not ready
//!   flip    10.96.0.14:80 -> e2:8083, then e3:8084 and back across a dropped watch and a 410
//!   moving  10.96.0.15:80 -> e2:8085, moved to e3:8086 while a transfer runs
//! ```
//!
//! Only `web` has e2:8080 and e3:8081 as target ports, so the destination
//! side's guess of the service (by endpoint and target port) is exact.
//! Every pod but `late` runs (a pause process and its servers) before the
//! agents start, so each is found by the agents' `/proc` scan, and Istio's
//! CRDs are absent when the agents start and installed once they are up.
//!
//! Enrollment is judged per exchange on the wire: plaintext when the client
//! pod's own SYN to the app port crosses between the nodes, HBONE when
//! payload moves on the server pod's 15008. The time each label change took
//! to show is reported (`EVIDENCE:` lines), with the exchanges that failed
//! on the way and those whose app answered on the wire although they went
//! over HBONE (the reply to the agent's transparent connection escaping the
//! pod: the return path was not, or no longer, in place).
//!
//! Knobs for debugging: `SLUICE_K8S_SCENARIOS=a,b` runs only those
//! scenarios (on the same fixture), `SLUICE_K8S_TRACE=1` prints every
//! enrollment exchange, `SLUICE_K8S_AGENT_LOGS=1` prints both agents' logs
//! at the end (with `RUST_LOG` passed on to them).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{
    capture::{Segment, WireReport, HBONE_PORT, TCP_ACK, TCP_SYN},
    cgroup_of, evidence,
    fake_api::objects,
    kube_mesh::{
        config_dump, deployment_pod, endpoint, host_network_pod, metrics, pod_object, prom_labels, send_sequential,
        KubeMesh, Wire, ISTIO_TCP_LABELS,
    },
    mesh::metric_sum,
    pattern, peer_bin, require_root, spawn_in,
    traffic::{echo_server, send, send_verified},
    Agent, ChildGuard, Node, Pod, SendReport, Topology,
};

const T: Duration = Duration::from_secs(30);
const TRUST_DOMAIN: &str = "cluster.local";
const ROOT_NS: &str = "istio-system";
const ISTIO_MODE: &str = "istio.io/dataplane-mode";
const SLUICE_MODE: &str = "sluice.io/mode";
/// What the agent counts a deny by ALLOW policies that do not match under.
const DEFAULT_DENY: &str = "default-deny: no ALLOW policy matched";
/// A label change must show on the wire within this long (the aim is about
/// a second; each measured time is reported).
const ENROLL_DEADLINE: Duration = Duration::from_secs(3);
/// Bytes per enrollment probe.
const PROBE: u64 = 512;

const WEB: &str = "10.96.0.10:80";
const LOCAL: &str = "10.96.0.11:80";
const LEGACY: &str = "10.96.0.12:80";
const EMPTY: &str = "10.96.0.13:80";
const FLIP: &str = "10.96.0.14:80";
const MOVING: &str = "10.96.0.15:80";
const VIPS: [&str; 6] = ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13", "10.96.0.14", "10.96.0.15"];

struct Pods {
    c1: Pod,
    x1: Pod,
    h1: Pod,
    l1: Pod,
    u1: Pod,
    o1: Pod,
    late: Pod,
    s2: Pod,
    e2: Pod,
    e3: Pod,
    x2: Pod,
    u2: Pod,
    o2: Pod,
}

/// The echo servers by name (`s2` is s2:8080, `s2:8090` its second port),
/// each printing `PEER <addr>` per connection.
struct Servers(BTreeMap<&'static str, ChildGuard>);

impl Servers {
    /// The `PEER` lines server `name` printed since the last call.
    fn peers(&mut self, name: &str) -> Vec<String> {
        let server = self.0.get_mut(name).unwrap_or_else(|| panic!("no server {name}"));
        let mut out = Vec::new();
        while let Ok(Some(line)) = server.next_line(Duration::from_millis(40)) {
            if line.starts_with("PEER ") {
                out.push(line);
            }
        }
        out
    }

    /// Forgets the connections seen so far.
    fn drain(&mut self) {
        let names: Vec<&'static str> = self.0.keys().copied().collect();
        for name in names {
            self.peers(name);
        }
    }

    fn get(&mut self, name: &str) -> &mut ChildGuard {
        self.0.get_mut(name).unwrap_or_else(|| panic!("no server {name}"))
    }
}

/// Field order is drop order: agents and processes before the API server,
/// the topology last.
struct Fixture {
    mode: &'static str,
    ag1: Agent,
    ag2: Agent,
    srv: Servers,
    _pauses: Vec<ChildGuard>,
    late_pause: Option<ChildGuard>,
    km: KubeMesh,
    n1: Node,
    n2: Node,
    p: Pods,
    /// When the agents printed READY (both), for the CRD scenario.
    agents_ready: Instant,
    topo: Topology,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn fixture(mode: &'static str) -> Result<Fixture> {
    let topo = Topology::new(&format!("k8s{}", &mode[..2]))?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let p = Pods {
        c1: n1.add_pod("c1")?,
        x1: n1.add_pod("x1")?,
        h1: n1.add_pod("h1")?,
        l1: n1.add_pod("l1")?,
        u1: n1.add_pod("u1")?,
        o1: n1.add_pod("o1")?,
        late: n1.add_pod("late")?,
        s2: n2.add_pod("s2")?,
        e2: n2.add_pod("e2")?,
        e3: n2.add_pod("e3")?,
        x2: n2.add_pod("x2")?,
        u2: n2.add_pod("u2")?,
        o2: n2.add_pod("o2")?,
    };
    let km = KubeMesh::new(&topo, TRUST_DOMAIN, ROOT_NS)?;
    km.check_reachable(&n1)?;
    km.check_reachable(&n2)?;
    km.api.set_crds_installed(false);
    populate(&km, &p, &n1)?;

    let mut pauses = Vec::new();
    for pod in [&p.c1, &p.x1, &p.h1, &p.l1, &p.u1, &p.o1, &p.s2, &p.e2, &p.e3, &p.x2, &p.u2, &p.o2] {
        pauses.push(pod.start_pause()?);
    }
    let serve =
        |pod: &Pod, port: u16| echo_server(pod, &format!("{}:{port}", pod.ipv4()), &["--print-peer"]).map(|(s, _)| s);
    let srv = Servers(BTreeMap::from([
        ("s2", serve(&p.s2, 8080)?),
        ("s2:8090", serve(&p.s2, 8090)?),
        ("e2", serve(&p.e2, 8080)?),
        ("e3", serve(&p.e3, 8081)?),
        ("e2:8082", serve(&p.e2, 8082)?),
        ("e2:8083", serve(&p.e2, 8083)?),
        ("e3:8084", serve(&p.e3, 8084)?),
        ("e2:8085", serve(&p.e2, 8085)?),
        ("e3:8086", serve(&p.e3, 8086)?),
        ("x2", serve(&p.x2, 8090)?),
        ("l1", serve(&p.l1, 8080)?),
        ("u2", serve(&p.u2, 9090)?),
        ("o2", serve(&p.o2, 8080)?),
    ]));
    let ag1 = km.start_agent(&n1, mode, &[])?;
    let ag2 = km.start_agent(&n2, mode, &[])?;
    Ok(Fixture {
        mode,
        ag1,
        ag2,
        srv,
        _pauses: pauses,
        late_pause: None,
        km,
        n1,
        n2,
        p,
        agents_ready: Instant::now(),
        topo,
    })
}

fn populate(km: &KubeMesh, p: &Pods, n1: &Node) -> Result<()> {
    let api = &km.api;
    api.apply(objects::namespace("mesh", &[(ISTIO_MODE, "ambient")]))?;
    api.apply(objects::namespace("other", &[(SLUICE_MODE, "enabled")]))?;
    api.apply(objects::namespace("apps", &[]))?;
    api.apply(objects::namespace("legacy", &[]))?;
    api.apply(objects::namespace(ROOT_NS, &[]))?;

    api.apply(deployment_pod(&p.c1, "mesh", "sleep", "sleep", &[("app", "sleep"), ("version", "v1")]))?;
    api.apply(pod_object(&p.x1, "apps", "default", &[("app", "x1")]))?;
    api.apply(host_network_pod(&p.h1, n1, "mesh", &[("app", "host")]))?;
    api.apply(pod_object(&p.l1, "mesh", "local", &[("app", "local")]))?;
    api.apply(pod_object(&p.u1, "legacy", "default", &[("app", "u1")]))?;
    api.apply(pod_object(&p.o1, "other", "default", &[("app", "o1")]))?;
    api.apply(pod_object(&p.late, "mesh", "late", &[("app", "late")]))?;
    api.apply(pod_object(&p.s2, "mesh", "server", &[("app", "s2")]))?;
    api.apply(deployment_pod(&p.e2, "mesh", "web", "web", &[("app", "web"), ("version", "v1")]))?;
    api.apply(deployment_pod(&p.e3, "mesh", "web", "web", &[("app", "web"), ("version", "v2")]))?;
    api.apply(pod_object(&p.x2, "apps", "default", &[("app", "x2")]))?;
    api.apply(pod_object(&p.u2, "legacy", "legacy", &[("app", "legacy")]))?;
    api.apply(pod_object(&p.o2, "other", "default", &[("app", "o2")]))?;

    // web's targetPort is a name: each slice says which port it is.
    api.apply(objects::service("mesh", "web", &[ip("10.96.0.10")], &[("http", 80, json!("http"))]))?;
    api.apply(objects::endpoint_slice("mesh", "web-a", "web", "IPv4", &[endpoint(&p.e2, true)], &[("http", 8080)]))?;
    api.apply(objects::endpoint_slice(
        "mesh",
        "web-b",
        "web",
        "IPv4",
        &[endpoint(&p.e3, true)],
        &[("metrics", 9999), ("http", 8081)],
    ))?;
    api.apply(objects::service("mesh", "local", &[ip("10.96.0.11")], &[("http", 80, json!(8080))]))?;
    api.apply(objects::endpoint_slice(
        "mesh",
        "local-a",
        "local",
        "IPv4",
        &[endpoint(&p.l1, true)],
        &[("http", 8080)],
    ))?;
    api.apply(objects::service("legacy", "legacy", &[ip("10.96.0.12")], &[("http", 80, json!(9090))]))?;
    api.apply(objects::endpoint_slice(
        "legacy",
        "legacy-a",
        "legacy",
        "IPv4",
        &[endpoint(&p.u2, true)],
        &[("http", 9090)],
    ))?;
    api.apply(objects::service("mesh", "empty", &[ip("10.96.0.13")], &[("http", 80, json!(8082))]))?;
    api.apply(slice("empty-a", "empty", &p.e2, 8082, false))?;
    api.apply(objects::service("mesh", "flip", &[ip("10.96.0.14")], &[("http", 80, json!("http"))]))?;
    api.apply(slice("flip-a", "flip", &p.e2, 8083, true))?;
    api.apply(objects::service("mesh", "moving", &[ip("10.96.0.15")], &[("http", 80, json!("http"))]))?;
    api.apply(slice("moving-a", "moving", &p.e2, 8085, true))?;
    Ok(())
}

/// EndpointSlice `name` of service `service` (namespace mesh): one endpoint, port "http".
fn slice(name: &str, service: &str, to: &Pod, port: u16, ready: bool) -> Value {
    objects::endpoint_slice("mesh", name, service, "IPv4", &[endpoint(to, ready)], &[("http", port)])
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How an exchange crossed the wire between the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Payload on the server's 15008 between the two pods' addresses.
    Hbone,
    /// Any segment to or from the server's app port: plaintext.
    Plain,
    /// Neither (the exchange failed before a byte moved).
    Nothing,
}

/// How the exchange between `client` and `server:port` that started at
/// `from` (ns since the epoch) crossed the wire: plaintext if the client
/// opened a connection to the app port itself (its SYN; segments of an
/// older connection still closing do not count), else HBONE if payload
/// moved on the server's 15008 between the two pods' addresses.
fn path_of(segments: &[Segment], from: u64, client: IpAddr, server: IpAddr, port: u16) -> Path {
    let between = |s: &&Segment| {
        s.ts_nanos >= from
            && ((s.src.ip() == client && s.dst.ip() == server) || (s.src.ip() == server && s.dst.ip() == client))
    };
    let mine: Vec<&Segment> = segments.iter().filter(between).collect();
    let syn = |s: &&&Segment| s.flags & TCP_SYN != 0 && s.flags & TCP_ACK == 0;
    if mine.iter().filter(syn).any(|s| s.src.ip() == client && s.dst.port() == port) {
        Path::Plain
    } else if mine.iter().any(|s| {
        let server_port = if s.src.ip() == server { s.src.port() } else { s.dst.port() };
        server_port == HBONE_PORT && !s.payload.is_empty()
    }) {
        Path::Hbone
    } else {
        Path::Nothing
    }
}

/// The segments between the two pods since `from`, for diagnosis.
fn segments_between(segments: &[Segment], from: u64, client: IpAddr, server: IpAddr) -> Vec<String> {
    segments
        .iter()
        .filter(|s| {
            s.ts_nanos >= from
                && ((s.src.ip() == client && s.dst.ip() == server) || (s.src.ip() == server && s.dst.ip() == client))
        })
        .map(|s| format!("+{}us {s:?}", (s.ts_nanos - from) / 1000))
        .collect()
}

/// One exchange of [`PROBE`] bytes from `client` to `server:port`, and how
/// it crossed the wire.
fn probe(wire: &Wire, client: &Pod, server: &Pod, port: u16) -> Result<(Path, SendReport)> {
    probe_traced(wire, client, server, port).map(|(path, r, _)| (path, r))
}

/// Whether `trace` (from [`probe_traced`]) shows the server's app port
/// answering on the wire in an exchange that went over HBONE: the app's
/// reply to a transparent connection of its node's agent that escaped the
/// pod instead of returning to the agent.
fn leaked(path: Path, trace: &[String], port: u16) -> bool {
    path == Path::Hbone && trace.iter().any(|t| t.contains(&format!(":{port} -> ")))
}

/// [`probe`], also returning the segments between the two pods, for diagnosis.
fn probe_traced(wire: &Wire, client: &Pod, server: &Pod, port: u16) -> Result<(Path, SendReport, Vec<String>)> {
    let from = now_ns();
    // 1 s: a connection that hangs counts as failed, and the next one is tried.
    let r = send(client, &format!("{}:{port}", server.ipv4()), PROBE, Duration::from_secs(1))?;
    let (c, s) = (IpAddr::V4(client.ipv4()), IpAddr::V4(server.ipv4()));
    // tcpdump writes packet by packet, a moment behind.
    let deadline = Instant::now() + Duration::from_millis(if r.ok { 1000 } else { 150 });
    loop {
        let segments = wire.segments()?;
        let path = path_of(&segments, from, c, s, port);
        if path != Path::Nothing || Instant::now() > deadline {
            return Ok((path, r, segments_between(&segments, from, c, s)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One pair to probe: (name, client, server, port, the path wanted).
type Want<'a> = (&'a str, &'a Pod, &'a Pod, u16, Path);

/// Probes every pair (each on its own thread, so one hanging exchange
/// does not hold the others up) from `changed` on until it crosses the
/// wire as wanted, byte-exact, and keeps doing so for two more exchanges.
/// Returns, per pair, how long after `changed` its first good exchange
/// ended, and the exchanges that failed on the way or whose app answered on
/// the wire though they went over HBONE. A pair that goes back after a good
/// exchange fails, and so does the deadline.
fn until_paths(wire: &Wire, wants: &[Want<'_>], changed: Instant) -> Result<(Vec<Duration>, Vec<String>)> {
    let outcomes: Vec<Result<(Duration, Vec<String>)>> = std::thread::scope(|scope| {
        let threads: Vec<_> = wants.iter().map(|want| scope.spawn(move || until_path(wire, want, changed))).collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked"))))
            .collect()
    });
    let mut took = Vec::new();
    let mut failed = Vec::new();
    for outcome in outcomes {
        let (t, f) = outcome?;
        took.push(t);
        failed.extend(f);
    }
    Ok((took, failed))
}

fn until_path(wire: &Wire, want: &Want<'_>, changed: Instant) -> Result<(Duration, Vec<String>)> {
    let (name, client, server, port, want) = *want;
    let mut first: Option<Duration> = None;
    let mut failed = Vec::new();
    let mut history: Vec<String> = Vec::new();
    let mut stable = 0;
    loop {
        let (path, r, trace) = probe_traced(wire, client, server, port)?;
        let at = changed.elapsed();
        let good = path == want && r.ok && r.bytes_verified == PROBE;
        if leaked(path, &trace, port) {
            failed.push(format!("{name} at {} ms: the app's reply escaped to the wire (ok {})", at.as_millis(), r.ok));
        }
        if !r.ok {
            let error = r.error.as_deref().unwrap_or("?");
            failed.push(format!("{name} at {} ms: {}", at.as_millis(), error.rsplit(": ").next().unwrap_or(error)));
        }
        history.push(format!("{} ms {name}: {path:?} ok={}", at.as_millis(), r.ok));
        if !good {
            history.extend(trace.into_iter().take(12).map(|t| format!("    {t}")));
        }
        if good {
            first.get_or_insert(at);
            stable += 1;
            if stable == 3 {
                if std::env::var_os("SLUICE_K8S_TRACE").is_some() {
                    eprintln!("{}", history.join("\n"));
                }
                return Ok((first.unwrap_or_default(), failed));
            }
        } else if first.is_some() {
            bail!("{name} went {path:?} (ok {}) after going {want:?}: {r:?}\n{}", r.ok, history.join("\n"));
        } else if at > ENROLL_DEADLINE {
            bail!("{name}: not {want:?} within {ENROLL_DEADLINE:?}:\n{}", history.join("\n"));
        }
    }
}

fn reloads(node: &Node) -> Result<u64> {
    Ok(metric_sum(&metrics(node)?, "sluice_config_reloads_total", &["result=\"ok\""]))
}

/// Makes `change` through the API and waits until both agents published a
/// new state; returns how long that took.
fn changed(f: &Fixture, change: impl FnOnce(&KubeMesh) -> Result<()>) -> Result<Duration> {
    let before = (reloads(&f.n1)?, reloads(&f.n2)?);
    let t = Instant::now();
    change(&f.km)?;
    while t.elapsed() < Duration::from_secs(10) {
        if reloads(&f.n1)? > before.0 && reloads(&f.n2)? > before.1 {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the agents did not publish a new state within 10 s of the change")
}

fn denials(node: &Node, policy: &str) -> Result<u64> {
    Ok(metric_sum(&metrics(node)?, "sluice_auth_denials_total", &[&format!("policy=\"{policy}\"")]))
}

fn authorization_policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

fn delete_policy(f: &Fixture, kind: &str, ns: &str, name: &str) -> Result<()> {
    changed(f, |km| km.api.delete("security.istio.io/v1", kind, Some(ns), name))?;
    Ok(())
}

/// `client` -> `addr` must be reset with nothing echoed; returns the error.
fn refused(client: &Pod, addr: &str) -> Result<String> {
    let r = send(client, addr, 64 << 10, Duration::from_secs(10))?;
    let error = r.error.clone().unwrap_or_default();
    ensure!(!r.ok && r.bytes_verified == 0, "{addr} from {}: must be refused, got {r:?}", client.name());
    // 104: ECONNRESET; 107: reset before the client's own shutdown; 32: EPIPE for the writer.
    ensure!(
        ["os error 104", "os error 107", "os error 32"].iter().any(|e| error.contains(e)),
        "{addr} from {}: not a reset: {r:?}",
        client.name()
    );
    Ok(error.rsplit(": ").next().unwrap_or(&error).to_owned())
}

/// An endless echo client (runs until reset or killed).
fn endless(client: &Pod, addr: &str) -> Result<ChildGuard> {
    let mut c = Command::new(peer_bin());
    c.args(["send", "--connect", addr, "--bytes", &(1u64 << 40).to_string(), "--timeout-secs", "60"]);
    spawn_in(client, c)
}

/// Waits for an endless client to end and returns its report.
fn ended(c: ChildGuard, what: &str) -> Result<SendReport> {
    let out = c.finish(Duration::from_secs(15)).with_context(|| format!("{what}: the client was not closed"))?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn reset_error(r: &SendReport) -> bool {
    let e = r.error.as_deref().unwrap_or("");
    !r.ok && (e.contains("os error 104") || e.contains("os error 32"))
}

fn peer_of(pod: &Pod) -> String {
    format!("PEER {}:", pod.ipv4())
}

/// Captures on the lan bridge while `traffic` runs; the report leaves out
/// the agents' own traffic with the API server.
fn on_the_wire<R>(f: &Fixture, label: &str, traffic: impl FnOnce() -> Result<R>) -> Result<(WireReport, R)> {
    let (report, _, out) = on_the_wire_segments(f, label, traffic)?;
    Ok((report, out))
}

/// [`on_the_wire`], also returning the segments.
fn on_the_wire_segments<R>(
    f: &Fixture,
    label: &str,
    traffic: impl FnOnce() -> Result<R>,
) -> Result<(WireReport, Vec<Segment>, R)> {
    let file = f.km.mesh.dir.path().join(format!("{}-{label}.pcap", f.mode));
    let wire = Wire::start(&f.topo, &file)?;
    let out = traffic()?;
    let (segments, stats) = wire.stop()?;
    let report = WireReport::from_segments(segments.clone());
    ensure!(stats.complete(), "{label}: tcpdump lost packets: {stats:?}");
    ensure!(report.gap_bytes == 0, "{label}: {} bytes missing from the capture", report.gap_bytes);
    evidence(&format!("[{}] {label} wire: {}", f.mode, report.summary()));
    Ok((report, segments, out))
}

fn no_vip_on_the_wire(r: &WireReport) -> Result<()> {
    let vips: std::collections::BTreeSet<IpAddr> = VIPS.iter().map(|v| ip(v)).collect();
    ensure!(r.addrs_seen.is_disjoint(&vips), "a service VIP appeared on the wire: {:?}", r.addrs_seen);
    Ok(())
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

fn counter(c: &Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or(0)
}

fn kube_status(dump: &Value) -> &Value {
    &dump["source"]["kubernetes"]
}

/// The uids `/config_dump` lists as enrolled pods.
fn enrolled_uids(node: &Node) -> Result<Vec<String>> {
    let dump = config_dump(node)?;
    Ok(dump["pods"].as_array().into_iter().flatten().filter_map(|p| p["uid"].as_str().map(str::to_owned)).collect())
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// The agents came up while the API server answered 404 for Istio's CRDs:
/// `/config_dump` says so, and once the CRDs are installed the watchers
/// retrying in the background list them.
fn crds_absent_then_installed(f: &mut Fixture) -> Result<String> {
    let crd = |dump: &Value, absent: bool| -> Vec<String> {
        kube_status(dump)["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["resource"].as_str().is_some_and(|n| n.ends_with(".security.istio.io")))
            .filter(|r| r["crdAbsent"].as_bool() == Some(absent) && r["ready"].as_bool() == Some(true))
            .filter_map(|r| r["resource"].as_str().map(str::to_owned))
            .collect()
    };
    for node in [&f.n1, &f.n2] {
        let dump = config_dump(node)?;
        ensure!(
            crd(&dump, true).len() == 2,
            "{}: both Istio CRDs must show as absent (and ready) at start: {}",
            node.name(),
            kube_status(&dump)
        );
    }
    let since_ready = f.agents_ready.elapsed();
    f.km.api.set_crds_installed(true);
    let t = Instant::now();
    loop {
        let (d1, d2) = (config_dump(&f.n1)?, config_dump(&f.n2)?);
        if crd(&d1, false).len() == 2 && crd(&d2, false).len() == 2 {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the CRDs were not listed within 60 s of being installed: {}",
            kube_status(&d1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(format!(
        "both agents READY with authorizationpolicies/peerauthentications absent (crdAbsent in /config_dump); \
         installed {} ms after READY, listed by both agents {} ms later (the watchers' backoff)",
        since_ready.as_millis(),
        t.elapsed().as_millis()
    ))
}

/// Pods that were running before the agents started are enrolled from the
/// /proc scan, without a restart: c1 -> s2 crosses the wire as HBONE and
/// s2's server process is the one started before the agents; the enrolled
/// netns is c1's own (same inode), reached through a process in c1's
/// cgroup. A hostNetwork pod in the same ambient namespace is never
/// captured. A pod the API lists before any of its processes exists is
/// unresolved, and enrolled once its process appears.
fn pods_running_before_the_agents(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let server_pid = f.srv.get("s2").pid();
    let file = f.km.mesh.dir.path().join(format!("{}-proc.pcap", f.mode));
    let wire = Wire::start(&f.topo, &file)?;
    let (c1_path, c1) = probe(&wire, &f.p.c1, &f.p.s2, 8080)?;
    let (h1_path, h1) = probe(&wire, &f.p.h1, &f.p.s2, 8080)?;
    ensure!(c1_path == Path::Hbone && c1.ok, "c1 -> s2 must be HBONE: {c1_path:?} {c1:?}");
    ensure!(h1_path == Path::Plain && h1.ok, "the hostNetwork pod h1 must not be captured: {h1_path:?} {h1:?}");
    ensure!(f.srv.get("s2").try_status()?.is_none() && f.srv.get("s2").pid() == server_pid, "s2's server restarted");
    let seen = f.srv.peers("s2");
    ensure!(
        seen.len() == 2 && seen[0].starts_with(&peer_of(&f.p.c1)) && seen[1].starts_with(&peer_of(&f.p.h1)),
        "s2's app must see c1 then h1 by their own IPs: {seen:?}"
    );

    let dump = config_dump(&f.n1)?;
    let pods = dump["pods"].as_array().context("/config_dump pods")?;
    let c1_entry = pods.iter().find(|p| p["uid"] == f.p.c1.uid()).context("c1 is not among the enrolled pods")?;
    let netns = c1_entry["netns"].as_str().context("netns")?;
    let pid: u32 = netns
        .strip_prefix("/proc/")
        .and_then(|r| r.strip_suffix("/ns/net"))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("c1's netns {netns} is not a /proc/<pid>/ns/net path"))?;
    ensure!(
        std::fs::metadata(netns)?.ino() == std::fs::metadata(f.p.c1.netns_path())?.ino(),
        "c1 enrolled with netns {netns}, not c1's"
    );
    let cg = cgroup_of(pid)?;
    ensure!(cg.contains(&format!("pod{}", f.p.c1.uid())), "pid {pid} is not in c1's cgroup: {cg}");
    ensure!(c1_entry["identity"] == "spiffe://cluster.local/ns/mesh/sa/sleep", "c1's identity: {c1_entry}");
    ensure!(!pods.iter().any(|p| p["uid"] == f.p.h1.uid()), "the hostNetwork pod was enrolled: {pods:?}");
    let status = kube_status(&dump);
    ensure!(status["procScans"].as_u64().unwrap_or(0) >= 1, "no /proc scan counted: {status}");
    let unresolved = status["unresolvedPods"].as_array().context("unresolvedPods")?;
    ensure!(
        unresolved.len() == 1 && unresolved[0] == f.p.late.uid(),
        "`late` (no process yet) must be the one unresolved pod: {unresolved:?}"
    );

    // `late` gets its first process now (no probe before: a probe's own
    // process in the pod's cgroup would be found).
    let started = Instant::now();
    f.late_pause = Some(f.p.late.start_pause()?);
    let (took, failed) = until_paths(&wire, &[("late", &f.p.late, &f.p.s2, 8080, Path::Hbone)], started)?;
    drop(wire);
    let status = kube_status(&config_dump(&f.n1)?).clone();
    ensure!(status["unresolvedPods"].as_array().is_some_and(|u| u.is_empty()), "still unresolved: {status}");
    ensure!(enrolled_uids(&f.n1)?.iter().any(|u| u == f.p.late.uid()), "`late` not among the enrolled pods");
    f.srv.drain();
    Ok(format!(
        "c1 -> s2 HBONE byte-exact with s2's pre-agent server (pid {server_pid}) untouched; c1 enrolled with \
         {netns} (pid {pid} in pod{}, same netns inode); hostNetwork h1 in the ambient namespace stays plaintext and \
         unenrolled; `late` unresolved until its process started, then captured (HBONE) within {} ms (failed \
         exchanges on the way: {failed:?}); {} /proc scans",
        f.p.c1.uid(),
        took[0].as_millis(),
        status["procScans"]
    ))
}

/// Enrollment follows the labels while the pods run: the namespace's
/// `istio.io/dataplane-mode=ambient`, a pod's opt-out (`istio.io/...=none`,
/// `sluice.io/mode=disabled`), a pod's own opt-in (`sluice.io/mode=enabled`,
/// `istio.io/...=ambient`), and their removal. Watched on the wire for x1
/// as a client (its own agent's outbound capture: x1 -> s2) and x2 as a
/// server (node2's inbound capture and node1's view of it: c1 -> x2).
fn enrollment_follows_labels(f: &mut Fixture) -> Result<String> {
    type Change = Box<dyn Fn(&KubeMesh) -> Result<()>>;
    let ns = |labels: Vec<(&'static str, Option<&'static str>)>| -> Change {
        Box::new(move |km: &KubeMesh| km.api.patch_labels("v1", "Namespace", None, "apps", &labels))
    };
    let pods =
        |x1: Vec<(&'static str, Option<&'static str>)>, x2: Vec<(&'static str, Option<&'static str>)>| -> Change {
            Box::new(move |km: &KubeMesh| {
                km.api.patch_labels("v1", "Pod", Some("apps"), "x1", &x1)?;
                km.api.patch_labels("v1", "Pod", Some("apps"), "x2", &x2)
            })
        };
    let steps: Vec<(&str, Change, bool)> = vec![
        ("namespace labelled istio.io/dataplane-mode=ambient", ns(vec![(ISTIO_MODE, Some("ambient"))]), true),
        (
            "pods opt out (x1 istio.io/dataplane-mode=none, x2 sluice.io/mode=disabled)",
            pods(vec![(ISTIO_MODE, Some("none"))], vec![(SLUICE_MODE, Some("disabled"))]),
            false,
        ),
        ("opt-out labels removed", pods(vec![(ISTIO_MODE, None)], vec![(SLUICE_MODE, None)]), true),
        ("namespace label removed", ns(vec![(ISTIO_MODE, None)]), false),
        (
            "pods opt in (x1 sluice.io/mode=enabled, x2 istio.io/dataplane-mode=ambient)",
            pods(vec![(SLUICE_MODE, Some("enabled"))], vec![(ISTIO_MODE, Some("ambient"))]),
            true,
        ),
        ("pod labels removed", pods(vec![(SLUICE_MODE, None)], vec![(ISTIO_MODE, None)]), false),
    ];
    let file = f.km.mesh.dir.path().join(format!("{}-enroll.pcap", f.mode));
    let (x1, x2, c1, s2) = (f.p.x1.clone(), f.p.x2.clone(), f.p.c1.clone(), f.p.s2.clone());
    fn wants<'a>(enrolled: bool, x1: &'a Pod, x2: &'a Pod, c1: &'a Pod, s2: &'a Pod) -> [Want<'a>; 2] {
        let path = if enrolled { Path::Hbone } else { Path::Plain };
        [("x1 -> s2", x1, s2, 8080, path), ("c1 -> x2", c1, x2, 8090, path)]
    }
    let mut lines = Vec::new();
    let mut worst = Duration::ZERO;
    {
        // Before any label: neither pod is captured (the check can fail).
        let wire = Wire::start(&f.topo, &file)?;
        until_paths(&wire, &wants(false, &x1, &x2, &c1, &s2), Instant::now())
            .context("before any label both pods must talk plaintext")?;
    }
    for (what, change, enrolled) in &steps {
        let wire = Wire::start(&f.topo, &file)?;
        let t = Instant::now();
        change(&f.km)?;
        let (took, failed) =
            until_paths(&wire, &wants(*enrolled, &x1, &x2, &c1, &s2), t).with_context(|| what.to_string())?;
        drop(wire);
        let uids = enrolled_uids(&f.n1)?;
        ensure!(
            uids.iter().any(|u| u == x1.uid()) == *enrolled,
            "{what}: x1 {} /config_dump's pods on node1",
            if *enrolled { "missing from" } else { "still in" }
        );
        let uids = enrolled_uids(&f.n2)?;
        ensure!(uids.iter().any(|u| u == x2.uid()) == *enrolled, "{what}: x2 enrollment on node2 is not {enrolled}");
        worst = worst.max(took[0]).max(took[1]);
        lines.push(format!(
            "{what} -> {}: x1 {} ms, x2 {} ms (failed exchanges on the way: {failed:?})",
            if *enrolled { "HBONE" } else { "plaintext" },
            took[0].as_millis(),
            took[1].as_millis()
        ));
    }
    f.srv.drain();
    Ok(format!("capture on the wire after each change (slowest {} ms): {}", worst.as_millis(), lines.join("; ")))
}

/// VIP -> two endpoints on the other node, over HBONE: byte-exact, the app
/// sees the client pod's IP, only 15008 on the wire, connections spread over
/// both endpoints, each on its own slice's target port (e3's slice names
/// `metrics` first: taking the first port would send them to 9999).
fn vip_to_remote_endpoints(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let secret = markers(&[0, 1 << 20, (4 << 20) - 64]);
    let (wire, segments, big) = on_the_wire_segments(f, "web", || {
        let big = send_verified(&f.p.c1, WEB, 4 << 20, T)?;
        for i in 0..30 {
            send_verified(&f.p.c1, WEB, 16 << 10, T).with_context(|| format!("connection #{i} to {WEB}"))?;
        }
        Ok(big)
    })?;
    ensure!(wire.ports_seen.contains(&HBONE_PORT), "no HBONE seen: {}", wire.summary());
    let stray: Vec<&Segment> =
        segments.iter().filter(|s| s.src.port() != HBONE_PORT && s.dst.port() != HBONE_PORT).take(5).collect();
    ensure!(
        wire.non_hbone_segments == 0,
        "TCP without port {HBONE_PORT} between the nodes: {stray:?}; {}",
        wire.summary()
    );
    ensure!(wire.non_tls_streams == 0 && wire.tls_other_streams == 0, "a stream was not TLS 1.3: {}", wire.summary());
    ensure!(secret.iter().all(|w| !wire.contains(w)), "application bytes visible on the wire");
    no_vip_on_the_wire(&wire)?;
    let (e2, e3) = (f.srv.peers("e2"), f.srv.peers("e3"));
    ensure!(
        e2.iter().chain(&e3).all(|p| p.starts_with(&peer_of(&f.p.c1))),
        "the apps must see the client pod's IP {}: {e2:?} {e3:?}",
        f.p.c1.ipv4()
    );
    ensure!(e2.len() + e3.len() == 31, "31 connections, the apps saw {} + {}", e2.len(), e3.len());
    ensure!(!e2.is_empty() && !e3.is_empty(), "all connections went to one endpoint: e2 {} e3 {}", e2.len(), e3.len());
    Ok(format!(
        "4 MiB byte-exact in {} ms; 31 connections spread e2:8080 {} / e3:8081 {} (target port by slice port name); \
         apps saw {}; wire: only {HBONE_PORT}, all TLS 1.3, no VIP, no plaintext",
        big.elapsed_ms,
        e2.len(),
        e3.len(),
        f.p.c1.ipv4()
    ))
}

/// VIP -> an endpoint on the client's own node: spliced in the kernel in
/// eBPF mode, HBONE through the same agent with iptables; nothing on the wire.
fn vip_to_same_node_endpoint(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let before = if f.mode == "ebpf" { Some(f.ag1.counters()?) } else { None };
    // 4 MiB: an echo client that writes everything before it reads stalls
    // once the echo outgrows what the path buffers; here that happens at
    // 8 MiB even over plain TCP between two pods, with no agent at all.
    let (wire, report) = on_the_wire(f, "local", || send_sequential(&f.p.c1, LOCAL, 4 << 20))?;
    let l1 = IpAddr::V4(f.p.l1.ipv4());
    ensure!(!wire.addrs_seen.contains(&l1), "same-node traffic reached the wire: {}", wire.summary());
    let seen = f.srv.peers("l1");
    ensure!(
        seen.len() == 1 && seen[0].starts_with(&peer_of(&f.p.c1)),
        "l1 must see one connection from the client's IP: {seen:?}"
    );
    let path = match before {
        Some(before) => {
            let after = f.ag1.counters()?;
            let spliced = counter(&after, "spliced_bytes") - counter(&before, "spliced_bytes");
            let switched = counter(&after, "splice_switched") - counter(&before, "splice_switched");
            ensure!(switched >= 2, "both directions must be taken over by the kernel (switched {switched}): {after}");
            ensure!(spliced >= 6 << 20, "most of the 8 MiB must be spliced, got {spliced}: {after}");
            format!("spliced in the kernel: {spliced} bytes, {switched} directions switched")
        }
        None => "HBONE through the node's own agent".into(),
    };
    Ok(format!("4 MiB byte-exact in {} ms, {path}; app saw {}; nothing on the wire", report.elapsed_ms, f.p.c1.ipv4()))
}

/// VIP -> an endpoint outside the mesh (legacy namespace): plain TCP to the
/// endpoint's target port, never 15008.
fn vip_to_non_mesh_endpoint(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let visible = markers(&[0, (1 << 20) - 64]);
    let (wire, _) = on_the_wire(f, "legacy", || send_verified(&f.p.c1, LEGACY, 1 << 20, T))?;
    ensure!(wire.ports_seen.contains(&9090), "plaintext to the target port 9090 expected: {}", wire.summary());
    ensure!(!wire.ports_seen.contains(&HBONE_PORT), "an endpoint outside the mesh got HBONE: {}", wire.summary());
    ensure!(visible.iter().all(|w| wire.contains(w)), "the capture must see the plaintext bytes");
    no_vip_on_the_wire(&wire)?;
    let seen = f.srv.peers("u2");
    ensure!(
        seen.len() == 1 && seen[0].starts_with(&peer_of(&f.p.c1)),
        "u2 must see one connection from the client pod's IP: {seen:?}"
    );
    Ok(format!("1 MiB byte-exact as plaintext to u2:9090 (ports on the wire {:?})", wire.ports_seen))
}

/// A VIP whose only endpoint is not ready, and a port the service lacks:
/// reset, no app reached, each counted as `no_healthy_upstream`.
fn vip_without_endpoints_is_reset(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let errors = |node: &Node| -> Result<u64> {
        Ok(metric_sum(&metrics(node)?, "sluice_hbone_errors_total", &["status=\"no_healthy_upstream\""]))
    };
    let before = errors(&f.n1)?;
    let attempts = [EMPTY, EMPTY, EMPTY, "10.96.0.10:81"];
    let mut outcomes = Vec::new();
    for addr in attempts {
        let r = send(&f.p.c1, addr, 0, Duration::from_secs(10))?;
        let error = r.error.clone().unwrap_or_default();
        ensure!(!r.ok, "{addr}: the client saw a clean close, not a reset: {r:?}");
        ensure!(error.contains("os error 104") || error.contains("os error 107"), "{addr}: not a reset: {r:?}");
        outcomes.push(error.rsplit(": ").next().unwrap_or(&error).to_owned());
    }
    let moved = errors(&f.n1)? - before;
    ensure!(moved == attempts.len() as u64, "no_healthy_upstream moved by {moved} for {} attempts", attempts.len());
    let seen = f.srv.peers("e2:8082");
    ensure!(seen.is_empty(), "the not-ready endpoint e2 was reached: {seen:?}");
    outcomes.dedup();
    Ok(format!(
        "{} attempts (3 to `empty`, whose only endpoint has ready=false; 1 to a port `web` lacks): all reset \
         ({outcomes:?}), no app reached, no_healthy_upstream +{moved}",
        attempts.len()
    ))
}

/// The EndpointSlice of `moving` is rewritten (e2 -> e3) while a transfer
/// runs: new connections follow at once, the open one finishes byte-exact.
fn endpoints_change_under_traffic(f: &mut Fixture) -> Result<String> {
    const LONG: u64 = 16 << 20;
    f.srv.drain();
    f.p.e2.exec_ok(&[
        "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "64kb", "latency", "1s",
    ])?;
    let result = (|| -> Result<String> {
        let mut long = Command::new(peer_bin());
        long.args(["send", "--connect", MOVING, "--bytes", &LONG.to_string(), "--timeout-secs", "60"]);
        let client = spawn_in(&f.p.c1, long)?;
        f.srv
            .get("e2:8085")
            .wait_for_line("PEER ", Duration::from_secs(10))
            .context("the transfer must start on e2")?;
        let slice = slice("moving-a", "moving", &f.p.e3, 8086, true);
        let took = changed(f, |km| km.api.apply(slice).map(drop))?;
        for i in 0..10 {
            send_verified(&f.p.c1, MOVING, 16 << 10, T).with_context(|| format!("new connection #{i}"))?;
        }
        let still_open = client.try_status()?.is_none();
        let (e2, e3) = (f.srv.peers("e2:8085"), f.srv.peers("e3:8086"));
        ensure!(e3.len() == 10 && e2.is_empty(), "new connections must go to e3 only: e3 {} e2 {}", e3.len(), e2.len());
        ensure!(still_open, "the long transfer ended before the change: the test proves nothing");
        let out = client.finish(Duration::from_secs(60))?;
        let r: SendReport = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("long client: {}", String::from_utf8_lossy(&out.stderr)))?;
        ensure!(r.ok && r.bytes_verified == LONG, "the open connection must finish byte-exact: {r:?}");
        Ok(format!(
            "slice rewritten e2 -> e3 during a 16 MiB transfer (in both agents' state {} ms later): 10 new \
             connections all to e3:8086, the open one finished byte-exact on e2 in {} ms",
            took.as_millis(),
            r.elapsed_ms
        ))
    })();
    f.p.e2.exec_ok(&["tc", "qdisc", "del", "dev", "eth0", "root"])?;
    result
}

/// ALLOW by principal on s2: c1 (sa sleep) passes, o1 (other/default) is
/// refused before s2's app, counted as the default deny.
fn allow_by_principal(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let spec = json!({
        "selector": {"matchLabels": {"app": "s2"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/sleep"]}}]}],
    });
    // The control: before the policy, o1 reaches s2.
    send_verified(&f.p.o1, &format!("{}:8080", f.p.s2.ipv4()), 4096, T)?;
    let before = denials(&f.n2, DEFAULT_DENY)?;
    let took = changed(f, |km| km.api.apply(authorization_policy("mesh", "allow-sleep", spec)).map(drop))?;
    let s2 = format!("{}:8080", f.p.s2.ipv4());
    let result = (|| -> Result<String> {
        send_verified(&f.p.c1, &s2, 64 << 10, T).context("c1 (sa sleep) must pass")?;
        let error = refused(&f.p.o1, &s2)?;
        let moved = denials(&f.n2, DEFAULT_DENY)? - before;
        ensure!(moved == 1, "the refusal must be counted once as {DEFAULT_DENY:?}: +{moved}");
        let seen = f.srv.peers("s2");
        ensure!(
            seen.len() == 2 && seen[0].starts_with(&peer_of(&f.p.o1)) && seen[1].starts_with(&peer_of(&f.p.c1)),
            "s2's app must see the control and c1, never the refused o1: {seen:?}"
        );
        Ok(format!(
            "in both agents' state {} ms after the apply; c1 passes byte-exact, o1 refused ({error}), s2's app never \
             saw it, counted as {DEFAULT_DENY:?} +1",
            took.as_millis()
        ))
    })();
    delete_policy(f, "AuthorizationPolicy", "mesh", "allow-sleep")?;
    result
}

/// DENY by source namespace: o1 (namespace other) refused and counted
/// under the policy's name, c1 passes.
fn deny_by_namespace(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let spec = json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]});
    let before = denials(&f.n2, "mesh/deny-other")?;
    changed(f, |km| km.api.apply(authorization_policy("mesh", "deny-other", spec)).map(drop))?;
    let s2 = format!("{}:8080", f.p.s2.ipv4());
    let result = (|| -> Result<String> {
        let error = refused(&f.p.o1, &s2)?;
        send_verified(&f.p.c1, &s2, 64 << 10, T).context("c1 (namespace mesh) must pass")?;
        let moved = denials(&f.n2, "mesh/deny-other")? - before;
        ensure!(moved == 1, "counted once under mesh/deny-other: +{moved}");
        let seen = f.srv.peers("s2");
        ensure!(seen.len() == 1 && seen[0].starts_with(&peer_of(&f.p.c1)), "s2's app must see only c1: {seen:?}");
        Ok(format!("o1 (namespace other) refused ({error}), counted under mesh/deny-other +1; c1 passes"))
    })();
    delete_policy(f, "AuthorizationPolicy", "mesh", "deny-other")?;
    result
}

/// DENY with `notPorts: ["8080"]`: s2:8090 refused, s2:8080 passes.
fn deny_not_ports(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let spec = json!({
        "selector": {"matchLabels": {"app": "s2"}},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}],
    });
    let (on, off) = (format!("{}:8080", f.p.s2.ipv4()), format!("{}:8090", f.p.s2.ipv4()));
    send_verified(&f.p.c1, &off, 4096, T).context("the control: 8090 passes before the policy")?;
    let before = denials(&f.n2, "mesh/deny-not-8080")?;
    changed(f, |km| km.api.apply(authorization_policy("mesh", "deny-not-8080", spec)).map(drop))?;
    let result = (|| -> Result<String> {
        let error = refused(&f.p.c1, &off)?;
        send_verified(&f.p.c1, &on, 64 << 10, T).context("8080 must pass")?;
        let moved = denials(&f.n2, "mesh/deny-not-8080")? - before;
        ensure!(moved == 1, "counted once under mesh/deny-not-8080: +{moved}");
        let (p8080, p8090) = (f.srv.peers("s2"), f.srv.peers("s2:8090"));
        ensure!(p8080.len() == 1 && p8090.len() == 1, "s2 must see 8080 once and 8090 only for the control");
        Ok(format!("s2:8090 refused ({error}), counted under mesh/deny-not-8080 +1; s2:8080 passes"))
    })();
    delete_policy(f, "AuthorizationPolicy", "mesh", "deny-not-8080")?;
    result
}

/// An ALLOW whose only rule is HTTP (`methods: [GET]`) cannot match at L4:
/// the policy still applies, so c1 is refused by the default deny, and the
/// agent names the problem in /config_dump.
fn l7_only_allow_denies(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let spec = json!({
        "selector": {"matchLabels": {"app": "s2"}},
        "action": "ALLOW",
        "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
    });
    let before = denials(&f.n2, DEFAULT_DENY)?;
    changed(f, |km| km.api.apply(authorization_policy("mesh", "allow-get", spec)).map(drop))?;
    let s2 = format!("{}:8080", f.p.s2.ipv4());
    let result = (|| -> Result<String> {
        let error = refused(&f.p.c1, &s2)?;
        let moved = denials(&f.n2, DEFAULT_DENY)? - before;
        ensure!(moved == 1, "counted once as the default deny: +{moved}");
        ensure!(f.srv.peers("s2").is_empty(), "s2's app was reached");
        let dump = config_dump(&f.n2)?;
        let problems = kube_status(&dump)["problems"].to_string();
        ensure!(
            problems.contains("AuthorizationPolicy mesh/allow-get"),
            "/config_dump must name the policy's L7 rule: {problems}"
        );
        Ok(format!(
            "ALLOW methods:[GET] refuses c1 ({error}), counted as {DEFAULT_DENY:?} +1, named in /config_dump problems"
        ))
    })();
    delete_policy(f, "AuthorizationPolicy", "mesh", "allow-get")?;
    result
}

/// A DENY in the root namespace (istio-system), with no selector, applies
/// mesh-wide: c1 is refused by s2 (namespace mesh) and by o2 (namespace
/// other), both counted under istio-system/deny-sleep; o1 still reaches s2.
fn root_namespace_policy_is_mesh_wide(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let spec = json!({
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/sleep"]}}]}],
    });
    let policy = "istio-system/deny-sleep";
    let before = denials(&f.n2, policy)?;
    changed(f, |km| km.api.apply(authorization_policy(ROOT_NS, "deny-sleep", spec)).map(drop))?;
    let (s2, o2) = (format!("{}:8080", f.p.s2.ipv4()), format!("{}:8080", f.p.o2.ipv4()));
    let result = (|| -> Result<String> {
        let e1 = refused(&f.p.c1, &s2)?;
        let e2 = refused(&f.p.c1, &o2)?;
        send_verified(&f.p.o1, &s2, 64 << 10, T).context("o1 is not sa sleep: it must pass")?;
        let moved = denials(&f.n2, policy)? - before;
        ensure!(moved == 2, "both refusals counted under {policy}: +{moved}");
        ensure!(f.srv.peers("o2").is_empty(), "o2's app was reached");
        let seen = f.srv.peers("s2");
        ensure!(seen.len() == 1 && seen[0].starts_with(&peer_of(&f.p.o1)), "s2's app must see only o1: {seen:?}");
        Ok(format!("c1 refused by s2 (mesh: {e1}) and o2 (other: {e2}), counted under {policy} +2; o1 passes"))
    })();
    delete_policy(f, "AuthorizationPolicy", ROOT_NS, "deny-sleep")?;
    result
}

/// A DENY that arrives while connections are open closes them: c1 -> s2
/// (HBONE) and c1 -> l1 (same node: spliced in eBPF mode), each reset at the
/// client and counted once on its destination's node.
fn new_policy_closes_open_connections(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let policy = "mesh/deny-open";
    let before = (denials(&f.n1, policy)?, denials(&f.n2, policy)?);
    let switched_before = if f.mode == "ebpf" { counter(&f.ag1.counters()?, "splice_switched") } else { 0 };
    let remote = endless(&f.p.c1, &format!("{}:8080", f.p.s2.ipv4()))?;
    let local = endless(&f.p.c1, &format!("{}:8080", f.p.l1.ipv4()))?;
    f.srv.get("s2").wait_for_line("PEER ", Duration::from_secs(10)).context("the HBONE connection never reached s2")?;
    f.srv.get("l1").wait_for_line("PEER ", Duration::from_secs(10)).context("the local connection never reached l1")?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(remote.try_status()?.is_none() && local.try_status()?.is_none(), "a client ended before the policy");
    let spliced = if f.mode == "ebpf" { counter(&f.ag1.counters()?, "splice_switched") - switched_before } else { 0 };
    let spec = json!({
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/sleep"]}}]}],
    });
    let applied = Instant::now();
    changed(f, |km| km.api.apply(authorization_policy("mesh", "deny-open", spec)).map(drop))?;
    let outcome = (|| -> Result<String> {
        let (r_remote, r_local) = (ended(remote, "HBONE")?, ended(local, "same node")?);
        let closed_after = applied.elapsed();
        for (what, r) in [("HBONE", &r_remote), ("same node", &r_local)] {
            ensure!(reset_error(r), "{what}: the client must see a reset: {r:?}");
        }
        let counted = (denials(&f.n1, policy)? - before.0, denials(&f.n2, policy)? - before.1);
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
            "DENY applied with an HBONE and a {} connection open: both reset at the client within {} ms of the \
             apply, counted once on each node under {policy}",
            if f.mode == "ebpf" { "spliced" } else { "same-node HBONE" },
            closed_after.as_millis()
        ))
    })();
    delete_policy(f, "AuthorizationPolicy", "mesh", "deny-open")?;
    f.srv.drain();
    outcome
}

/// PeerAuthentication STRICT for namespace mesh: plaintext from u1 (outside
/// the mesh) reached s2 before; once STRICT applies, the open plaintext
/// connection is reset and a new one refused before the app, both counted;
/// mTLS from c1 still passes; removing the policy lets plaintext back in.
fn peer_authentication_strict(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let s2 = format!("{}:8080", f.p.s2.ipv4());
    send_verified(&f.p.u1, &s2, 64 << 10, T).context("plaintext from u1 must pass before STRICT")?;
    let open = endless(&f.p.u1, &s2)?;
    let seen = f.srv.peers("s2");
    ensure!(seen.len() == 2 && seen.iter().all(|p| p.starts_with(&peer_of(&f.p.u1))), "s2 must see u1 twice: {seen:?}");
    let policy = "mesh/strict requires mTLS";
    let before = denials(&f.n2, policy)?;
    let pa = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "mesh"},
        "spec": {"mtls": {"mode": "STRICT"}},
    });
    changed(f, |km| km.api.apply(pa).map(drop))?;
    let result = (|| -> Result<String> {
        let r_open = ended(open, "open plaintext")?;
        ensure!(reset_error(&r_open), "the open plaintext connection must be reset: {r_open:?}");
        let error = refused(&f.p.u1, &s2)?;
        send_verified(&f.p.c1, &s2, 64 << 10, T).context("mTLS from c1 must pass under STRICT")?;
        let moved = denials(&f.n2, policy)? - before;
        ensure!(moved == 2, "the closed and the refused connection counted under {policy:?}: +{moved}");
        let seen = f.srv.peers("s2");
        ensure!(seen.len() == 1 && seen[0].starts_with(&peer_of(&f.p.c1)), "s2's app must see only c1: {seen:?}");
        Ok(format!(
            "STRICT: the open plaintext connection reset, a new one refused ({error}), both counted under \
             {policy:?}; mTLS passes"
        ))
    })();
    delete_policy(f, "PeerAuthentication", "mesh", "strict")?;
    let result = result?;
    send_verified(&f.p.u1, &s2, 4096, T).context("plaintext must pass again once STRICT is gone")?;
    f.srv.drain();
    Ok(format!("{result}; plaintext passes again once the policy is deleted"))
}

/// Where connections to `flip` go now: "e2" or "e3".
fn flip_target(f: &mut Fixture) -> Result<&'static str> {
    send_verified(&f.p.c1, FLIP, 4096, T)?;
    let (e2, e3) = (f.srv.peers("e2:8083"), f.srv.peers("e3:8084"));
    match (e2.len(), e3.len()) {
        (1, 0) => Ok("e2"),
        (0, 1) => Ok("e3"),
        other => bail!("one connection to flip, the endpoints saw (e2, e3) = {other:?}"),
    }
}

/// Waits until connections to `flip` reach `want`; returns how long.
fn until_flip(f: &mut Fixture, want: &str, since: Instant) -> Result<Duration> {
    loop {
        if flip_target(f)? == want {
            return Ok(since.elapsed());
        }
        ensure!(since.elapsed() < Duration::from_secs(20), "connections to flip did not reach {want} within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_requests(f: &Fixture, pred: impl Fn(&str) -> bool) -> usize {
    f.km.api.requests().iter().filter(|r| pred(&r.path_and_query)).count()
}

fn slice_list(q: &str) -> bool {
    q.starts_with("/apis/discovery.k8s.io/v1/endpointslices") && !q.contains("watch=true") && !q.contains("watch=1")
}

fn slice_watch(q: &str) -> bool {
    q.starts_with("/apis/discovery.k8s.io/v1/endpointslices") && (q.contains("watch=true") || q.contains("watch=1"))
}

fn resource_errors(node: &Node, resource: &str) -> Result<u64> {
    let dump = config_dump(node)?;
    Ok(kube_status(&dump)["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["resource"] == resource)
        .filter_map(|r| r["errors"].as_u64())
        .sum())
}

/// The watches survive the API server cutting every stream (they resume
/// from their resourceVersion) and a 410 Expired (they relist): a slice
/// change made right after each, while the agents are reconnecting, is
/// applied.
fn watch_survives_drop_and_expiry(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    ensure!(flip_target(f)? == "e2", "flip starts on e2");

    let errors = |f: &Fixture| -> Result<(u64, u64)> {
        Ok((resource_errors(&f.n1, "endpointslices")?, resource_errors(&f.n2, "endpointslices")?))
    };
    let (watches, lists) = (count_requests(f, slice_watch), count_requests(f, slice_list));
    // Made while the agents are reconnecting: a resumed watch replays it.
    let t = Instant::now();
    f.km.api.drop_watches();
    f.km.api.apply(slice("flip-a", "flip", &f.p.e3, 8084, true))?;
    let after_drop = until_flip(f, "e3", t)?;
    let rewatched = count_requests(f, slice_watch) - watches;
    ensure!(rewatched >= 2, "both agents must watch endpointslices again after the drop: {rewatched} new watches");
    let relisted = count_requests(f, slice_list) - lists;
    ensure!(relisted == 0, "a cut stream resumes from its resourceVersion, no relist: {relisted} new lists");

    let (errors_before, lists) = (errors(f)?, count_requests(f, slice_list));
    let t = Instant::now();
    f.km.api.expire_history();
    f.km.api.apply(slice("flip-a", "flip", &f.p.e2, 8083, true))?;
    let after_410 = until_flip(f, "e2", t)?;
    // The client's agent moved; the other one may still be backing off.
    let (relisted, errors_after) = loop {
        let (relisted, errors_after) = (count_requests(f, slice_list) - lists, errors(f)?);
        let both_errored = errors_after.0 > errors_before.0 && errors_after.1 > errors_before.1;
        if (relisted >= 2 && both_errored) || t.elapsed() > Duration::from_secs(15) {
            break (relisted, errors_after);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(relisted >= 2, "after a 410 both agents must relist endpointslices: {relisted} new lists");
    ensure!(
        errors_after.0 > errors_before.0 && errors_after.1 > errors_before.1,
        "the 410 must show as a watch error in /config_dump: {errors_before:?} -> {errors_after:?}"
    );
    for _ in 0..3 {
        ensure!(flip_target(f)? == "e2", "flip must stay on e2");
    }
    Ok(format!(
        "every watch cut, slice changed at once: connections followed to e3:8084 after {} ms (resumed: \
         {rewatched} new watches, no relist); history expired (410), changed back: e2:8083 after {} ms \
         ({relisted} relists, endpointslices errors (node1, node2) {errors_before:?} -> {errors_after:?})",
        after_drop.as_millis(),
        after_410.as_millis()
    ))
}

/// The labels Istio's tooling reads are all there, with the values the
/// Kubernetes objects give: Deployment names as workloads, app/version
/// labels, services by hostname, SPIFFE principals.
fn metric_labels(f: &mut Fixture) -> Result<String> {
    let mut lines = 0;
    for node in [&f.n1, &f.n2] {
        let m = metrics(node)?;
        for line in m.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total{")) {
            lines += 1;
            let l = prom_labels(line);
            let names: std::collections::BTreeSet<&str> = l.iter().map(|(k, _)| k.as_str()).collect();
            let missing: Vec<&&str> = ISTIO_TCP_LABELS.iter().filter(|n| !names.contains(**n)).collect();
            ensure!(missing.is_empty(), "{missing:?} missing on {line}");
            for (k, v) in &l {
                if k.ends_with("_principal") {
                    ensure!(v == "unknown" || v.starts_with("spiffe://cluster.local/ns/"), "{k}={v} on {line}");
                }
            }
        }
    }
    ensure!(lines > 0, "no istio_tcp_connections_opened_total series");
    let (m1, m2) = (metrics(&f.n1)?, metrics(&f.n2)?);
    let web = [
        "destination_service=\"web.mesh.svc.cluster.local\"",
        "destination_service_name=\"web\"",
        "destination_service_namespace=\"mesh\"",
        "destination_workload=\"web\"",
        "destination_workload_namespace=\"mesh\"",
        "destination_app=\"web\"",
        "destination_principal=\"spiffe://cluster.local/ns/mesh/sa/web\"",
        "source_workload=\"sleep\"",
        "source_workload_namespace=\"mesh\"",
        "source_canonical_service=\"sleep\"",
        "source_app=\"sleep\"",
        "source_version=\"v1\"",
        "source_principal=\"spiffe://cluster.local/ns/mesh/sa/sleep\"",
        "source_cluster=\"Kubernetes\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let name = "istio_tcp_connections_opened_total";
    let source = metric_sum(&m1, name, &[&["reporter=\"source\""][..], &web].concat());
    let destination = metric_sum(&m2, name, &[&["reporter=\"destination\""][..], &web].concat());
    ensure!(
        source >= 31 && destination >= 31,
        "service `web` with the objects' names on both reporters: source {source}, destination {destination}"
    );
    let plain = metric_sum(
        &m1,
        name,
        &["destination_service=\"legacy.legacy.svc.cluster.local\"", "connection_security_policy=\"unknown\""],
    );
    ensure!(plain >= 1, "plaintext to a service: connection_security_policy=\"unknown\" with the service named");
    Ok(format!(
        "{lines} istio_tcp_connections_opened_total series carry all {} Istio TCP labels; `web` named on {source} \
         source / {destination} destination connections with the Deployment names (sleep, web), app/version labels \
         and SPIFFE principals from the API",
        ISTIO_TCP_LABELS.len()
    ))
}

type Scenario = fn(&mut Fixture) -> Result<String>;

const SCENARIOS: [(&str, Scenario); 16] = [
    ("crds_absent_then_installed", crds_absent_then_installed),
    ("pods_running_before_the_agents", pods_running_before_the_agents),
    ("enrollment_follows_labels", enrollment_follows_labels),
    ("vip_to_remote_endpoints", vip_to_remote_endpoints),
    ("vip_to_same_node_endpoint", vip_to_same_node_endpoint),
    ("vip_to_non_mesh_endpoint", vip_to_non_mesh_endpoint),
    ("vip_without_endpoints_is_reset", vip_without_endpoints_is_reset),
    ("endpoints_change_under_traffic", endpoints_change_under_traffic),
    ("allow_by_principal", allow_by_principal),
    ("deny_by_namespace", deny_by_namespace),
    ("deny_not_ports", deny_not_ports),
    ("l7_only_allow_denies", l7_only_allow_denies),
    ("root_namespace_policy_is_mesh_wide", root_namespace_policy_is_mesh_wide),
    ("new_policy_closes_open_connections", new_policy_closes_open_connections),
    ("peer_authentication_strict", peer_authentication_strict),
    ("watch_survives_drop_and_expiry", watch_survives_drop_and_expiry),
];

/// Runs last, over the traffic of all the others.
const LAST: (&str, Scenario) = ("metric_labels", metric_labels);

/// The two modes take turns: each measures latencies, on 2 shared CPUs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(mode: &'static str) -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let mut f = fixture(mode)?;
    evidence(&format!("[{mode}] topology, fake API server and both agents up in {} ms", started.elapsed().as_millis()));
    let only = std::env::var("SLUICE_K8S_SCENARIOS").ok();
    let mut failed = Vec::new();
    for (name, scenario) in SCENARIOS.into_iter().chain([LAST]) {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|s| s == name)) {
            continue;
        }
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
    evidence(&format!("[{mode}] all {} scenarios in {} s", SCENARIOS.len() + 1, started.elapsed().as_secs()));
    if std::env::var_os("SLUICE_K8S_AGENT_LOGS").is_some() {
        eprintln!("node1 agent:\n{}\nnode2 agent:\n{}", f.ag1.stderr(), f.ag2.stderr());
    }
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
fn kubernetes_with_iptables_capture() -> Result<()> {
    require_root!(Ok(()));
    run("iptables")
}

#[test]
fn kubernetes_with_ebpf_capture() -> Result<()> {
    require_root!(Ok(()));
    run("ebpf")
}
