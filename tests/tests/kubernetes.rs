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
//! payload moves on the server pod's 15008; and in the changed pod's netns,
//! where the agent's 15001/15006/15008 listeners must all be there
//! (enrolled) or all be gone (un-enrolled). A label change must settle, on
//! both, within a second of the API change ([`ENROLL_DEADLINE`]), timed by
//! the capture's timestamps and a 5 ms poll of the pod's sockets, not by
//! when an exchange ended: probes start every 40 ms, and a second one starts
//! beside one that hangs, so the harness's own exchanges add at most that.
//! Every exchange started after that must be good. The times, the
//! exchanges that failed on the way and the app replies that escaped to
//! the wire (a transparent connection without its return path) are
//! reported (`EVIDENCE:` lines).
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
        KubeMesh, Wire, ISTIO_TCP_LABELS, ISTIO_TCP_METRICS,
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
/// A label change must enroll or un-enroll a running pod within this long
/// (the issue's "within a second"), measured from the API change until
/// both the path on the wire and the pod's listeners have changed; see
/// [`until_paths`].
const ENROLL_DEADLINE: Duration = Duration::from_secs(1);
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
    /// Each running pod's pause process, by pod name.
    pauses: BTreeMap<String, ChildGuard>,
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

    let mut pauses = BTreeMap::new();
    for pod in [&p.c1, &p.x1, &p.h1, &p.l1, &p.u1, &p.o1, &p.s2, &p.e2, &p.e3, &p.x2, &p.u2, &p.o2] {
        pauses.insert(pod.name().to_owned(), pod.start_pause()?);
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
    Ok(Fixture { mode, ag1, ag2, srv, pauses, late_pause: None, km, n1, n2, p, agents_ready: Instant::now(), topo })
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
/// `from` (ns since the epoch) crossed the wire, and when (the capture's
/// timestamp of the segment that shows it): plaintext if the client opened
/// a connection to the app port itself (its SYN; segments of an older
/// connection still closing do not count), else HBONE if payload moved on
/// the server's 15008 between the two pods' addresses (the first such
/// segment: a pooled HBONE connection sends no SYN).
fn path_of(segments: &[Segment], from: u64, client: IpAddr, server: IpAddr, port: u16) -> (Path, Option<u64>) {
    let between = |s: &&Segment| {
        s.ts_nanos >= from
            && ((s.src.ip() == client && s.dst.ip() == server) || (s.src.ip() == server && s.dst.ip() == client))
    };
    let mine: Vec<&Segment> = segments.iter().filter(between).collect();
    let syn = |s: &&&Segment| s.flags & TCP_SYN != 0 && s.flags & TCP_ACK == 0;
    if let Some(s) = mine.iter().filter(syn).find(|s| s.src.ip() == client && s.dst.port() == port) {
        (Path::Plain, Some(s.ts_nanos))
    } else if let Some(s) = mine.iter().find(|s| {
        let server_port = if s.src.ip() == server { s.src.port() } else { s.dst.port() };
        server_port == HBONE_PORT && !s.payload.is_empty()
    }) {
        (Path::Hbone, Some(s.ts_nanos))
    } else {
        (Path::Nothing, None)
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
    probe_traced(wire, client, server, port).map(|e| (e.path, e.report))
}

/// The segments from `server:port` (the app) to `client` that answer no
/// SYN `client` sent to it on the wire since `from`: the app's replies to a
/// transparent connection of its node's agent that escaped the pod instead
/// of returning to the agent (its return path was not, or no longer, in
/// place). Returns their capture timestamps.
fn escaped(segments: &[Segment], from: u64, client: IpAddr, server: IpAddr, port: u16) -> Vec<u64> {
    let since: Vec<&Segment> = segments.iter().filter(|s| s.ts_nanos >= from).collect();
    let opened: std::collections::BTreeSet<u16> = since
        .iter()
        .filter(|s| s.flags & TCP_SYN != 0 && s.flags & TCP_ACK == 0)
        .filter(|s| s.src.ip() == client && s.dst.ip() == server && s.dst.port() == port)
        .map(|s| s.src.port())
        .collect();
    since
        .iter()
        .filter(|s| s.src.ip() == server && s.src.port() == port && s.dst.ip() == client)
        .filter(|s| !opened.contains(&s.dst.port()))
        .map(|s| s.ts_nanos)
        .collect()
}

/// One probed exchange.
struct Exchange {
    /// When the client started it (ns since the epoch).
    started_ns: u64,
    path: Path,
    /// The capture's timestamp of the segment that shows `path`.
    wire_ns: Option<u64>,
    report: SendReport,
    /// The segments between the two pods, for diagnosis.
    trace: Vec<String>,
}

/// [`probe`], with the timestamps and the segments between the two pods.
fn probe_traced(wire: &Wire, client: &Pod, server: &Pod, port: u16) -> Result<Exchange> {
    let from = now_ns();
    // 1 s: a connection that hangs counts as failed, and the next one is tried.
    let r = send(client, &format!("{}:{port}", server.ipv4()), PROBE, Duration::from_secs(1))?;
    let (c, s) = (IpAddr::V4(client.ipv4()), IpAddr::V4(server.ipv4()));
    // tcpdump writes packet by packet, a moment behind.
    let deadline = Instant::now() + Duration::from_millis(if r.ok { 1000 } else { 150 });
    loop {
        let segments = wire.segments()?;
        let (path, wire_ns) = path_of(&segments, from, c, s, port);
        if path != Path::Nothing || Instant::now() > deadline {
            let trace = segments_between(&segments, from, c, s);
            return Ok(Exchange { started_ns: from, path, wire_ns, report: r, trace });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The ports the agent listens on inside an enrolled pod.
const CAPTURE_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Which of [`CAPTURE_PORTS`] are listening in the netns of process `pid`,
/// read from `/proc/<pid>/net/tcp{,6}` (the netns of that process): no
/// process is forked, so it can be polled every few milliseconds.
fn capture_listeners_of(pid: u32) -> Result<std::collections::BTreeSet<u16>> {
    let mut out = std::collections::BTreeSet::new();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{file}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; st 0A is LISTEN.
            let (Some(local), Some(&"0A")) = (fields.get(1), fields.get(3)) else { continue };
            let port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if let Some(port) = port.filter(|p| CAPTURE_PORTS.contains(p)) {
                out.insert(port);
            }
        }
    }
    Ok(out)
}

/// Which of [`CAPTURE_PORTS`] `ss -Hltn` lists inside `pod`'s netns.
fn capture_listeners(pod: &Pod) -> Result<std::collections::BTreeSet<u16>> {
    let ss = pod.exec_ok(&["ss", "-Hltn"])?;
    Ok(ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next().and_then(|p| p.parse().ok()))
        .filter(|p| CAPTURE_PORTS.contains(p))
        .collect())
}

/// One pair to probe: (name, client, server, port, the path wanted), and
/// the pod whose capture the change turns on or off, with the pid of a
/// process in its netns: its listeners must come and go with the path.
struct Want<'a> {
    name: &'a str,
    client: &'a Pod,
    server: &'a Pod,
    port: u16,
    path: Path,
    /// (the changed pod, a pid in its netns).
    changed: Option<(&'a Pod, u32)>,
}

/// How one pair took a change.
struct Took {
    /// From the API change to the first good exchange on the wanted path,
    /// by the capture's timestamp of the segment that shows it.
    wire: Duration,
    /// From the API change to the changed pod's listeners being all there
    /// (enrolled) or all gone (not enrolled), polled every 5 ms.
    listeners: Option<Duration>,
    /// Exchanges that failed before the pair settled, and app replies that
    /// escaped to the wire (reported).
    failed: Vec<String>,
}

impl Took {
    /// When the pair settled: on the wanted path on the wire and with its
    /// pod's listeners as wanted.
    fn settled(&self) -> Duration {
        self.wire.max(self.listeners.unwrap_or_default())
    }
}

/// Gives up on a pair that has not settled this long after the change (the
/// 1 s requirement, [`ENROLL_DEADLINE`], is checked on what was measured).
const SETTLE_GIVE_UP: Duration = Duration::from_secs(8);

/// Probes every pair (each on its own thread, so one hanging exchange does
/// not hold the others up) from the change at `changed` (`changed_ns` on
/// the wall clock, the capture's clock) until it has settled (see
/// [`Took`]) and then made three more good exchanges: the wanted path,
/// byte-exact. A pair whose path goes back to the old one after reaching
/// the new one fails, and so does any exchange started after the pair
/// settled that is not good; exchanges that fail before it settled (a peer
/// agent that learnt of the change first, a connection the agent carried
/// when the pod was un-enrolled) are returned.
fn until_paths(wire: &Wire, wants: &[Want<'_>], changed: Instant, changed_ns: u64) -> Result<Vec<Took>> {
    std::thread::scope(|scope| {
        let threads: Vec<_> =
            wants.iter().map(|want| scope.spawn(move || until_path(wire, want, changed, changed_ns))).collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked"))))
            .collect()
    })
}

fn until_path(wire: &Wire, want: &Want<'_>, changed: Instant, changed_ns: u64) -> Result<Took> {
    let name = want.name;
    let since = |ns: u64| Duration::from_nanos(ns.saturating_sub(changed_ns));
    let listeners_at: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        if let Some((pod, pid)) = want.changed {
            let (listeners_at, done) = (&listeners_at, &done);
            let enrolled = want.path == Path::Hbone;
            scope.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) && changed.elapsed() < SETTLE_GIVE_UP {
                    match capture_listeners_of(pid) {
                        Ok(ports) if ports.len() == if enrolled { CAPTURE_PORTS.len() } else { 0 } => {
                            let _ = listeners_at.set(changed.elapsed());
                            return;
                        }
                        Ok(_) => {}
                        Err(e) => eprintln!("{name}: reading {}'s listeners: {e:#}", pod.name()),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let result = probe_until_settled(wire, want, changed, &since, &listeners_at);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

/// While an exchange is in flight this long (a normal one takes about
/// 10 ms), another is started beside it, so one that hangs (its SYN lost,
/// or its reply) does not hold up seeing the change.
const OVERLAP_AFTER: Duration = Duration::from_millis(50);
/// At most this many exchanges of one pair in flight.
const MAX_IN_FLIGHT: usize = 4;
/// Exchanges of one pair start at most this often: each is a process in
/// the pod, and on 2 CPUs the probes' own load would slow the agents they
/// time.
const PROBE_EVERY: Duration = Duration::from_millis(40);

fn probe_until_settled(
    wire: &Wire,
    want: &Want<'_>,
    changed: Instant,
    since: &dyn Fn(u64) -> Duration,
    listeners_at: &std::sync::OnceLock<Duration>,
) -> Result<Took> {
    let name = want.name;
    let old = if want.path == Path::Hbone { Path::Plain } else { Path::Hbone };
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Exchange>)>();
    std::thread::scope(|scope| {
        let mut done: Vec<Exchange> = Vec::new();
        // (id, when started) of the exchanges in flight.
        let mut in_flight: Vec<(usize, Instant)> = Vec::new();
        let mut next_id = 0;
        let mut last_start: Option<Instant> = None;
        let mut finishing = false;
        loop {
            let overlap = in_flight.last().is_none_or(|(_, at)| at.elapsed() >= OVERLAP_AFTER);
            let paced = last_start.is_none_or(|at: Instant| at.elapsed() >= PROBE_EVERY);
            if !finishing && in_flight.len() < MAX_IN_FLIGHT && overlap && paced {
                last_start = Some(Instant::now());
                let tx = tx.clone();
                let id = next_id;
                next_id += 1;
                in_flight.push((id, Instant::now()));
                scope.spawn(move || {
                    let _ = tx.send((id, probe_traced(wire, want.client, want.server, want.port)));
                });
            }
            let Ok((id, exchange)) = rx.recv_timeout(Duration::from_millis(10)) else {
                ensure!(
                    finishing || changed.elapsed() < SETTLE_GIVE_UP,
                    "{name}: not settled on {:?} within {SETTLE_GIVE_UP:?} (listeners {:?}):\n{}",
                    want.path,
                    listeners_at.get(),
                    history(&done, since)
                );
                continue;
            };
            in_flight.retain(|(i, _)| *i != id);
            done.push(exchange?);
            done.sort_by_key(|e| e.started_ns);

            // The first good exchange on the new path, by when it crossed the
            // wire (a failed one may be credited with the segments of another).
            let first_new = done.iter().filter(|e| good(e, want.path)).filter_map(|e| e.wire_ns).min().map(&since);
            // Going back is a good exchange on the old path that started
            // after that: one started before may have been decided before
            // the change, whenever its (retransmitted) SYN crossed the wire,
            // and a failed one may be credited with a path from segments of
            // another (a pooled HBONE connection closing, say): failures
            // once the pair settled are caught below.
            if let Some(first) = first_new {
                if let Some(back) = done.iter().find(|e| good(e, old) && since(e.started_ns) > first) {
                    bail!(
                        "{name} went {old:?} again in an exchange started at {} ms, after going {:?} at {} ms: {:?}\n{}",
                        since(back.started_ns).as_millis(),
                        want.path,
                        first.as_millis(),
                        back.report,
                        history(&done, since)
                    );
                }
            }
            let listeners = if want.changed.is_some() { listeners_at.get().copied() } else { Some(Duration::ZERO) };
            let Some(settled) = first_new.zip(listeners).map(|(w, l)| w.max(l)) else { continue };
            let after: Vec<&Exchange> = done.iter().filter(|e| since(e.started_ns) >= settled).collect();
            if let Some(bad) = after.iter().find(|e| !good(e, want.path)) {
                bail!(
                    "{name}: an exchange started {} ms after the change, once the pair had settled ({} ms), was not \
                     {:?} byte-exact: {:?} {:?}\n{}",
                    since(bad.started_ns).as_millis(),
                    settled.as_millis(),
                    want.path,
                    bad.path,
                    bad.report,
                    history(&done, since)
                );
            }
            finishing |= after.len() >= 3;
            if !(finishing && in_flight.is_empty()) {
                continue;
            }
            if std::env::var_os("SLUICE_K8S_TRACE").is_some() {
                eprintln!("{}", history(&done, since));
            }
            let mut failed = Vec::new();
            let (c, s) = (IpAddr::V4(want.client.ipv4()), IpAddr::V4(want.server.ipv4()));
            let from = done.first().map_or(0, |e| e.started_ns);
            let leaks = escaped(&wire.segments()?, from, c, s, want.port);
            if let Some(first) = leaks.first() {
                failed.push(format!(
                    "{name}: {} app segments escaped to the wire (a transparent connection without its return \
                     path), the first at {} ms",
                    leaks.len(),
                    since(*first).as_millis()
                ));
            }
            for e in done.iter().filter(|e| since(e.started_ns) < settled) {
                let at = since(e.started_ns).as_millis();
                if !e.report.ok {
                    let error = e.report.error.as_deref().unwrap_or("?");
                    failed.push(format!(
                        "{name} at {at} ms ({:?}): {}",
                        e.path,
                        error.rsplit(": ").next().unwrap_or(error)
                    ));
                }
            }
            return Ok(Took { wire: first_new.unwrap_or_default(), listeners: want.changed.and(listeners), failed });
        }
    })
}

fn good(e: &Exchange, path: Path) -> bool {
    e.path == path && e.report.ok && e.report.bytes_verified == PROBE
}

/// The exchanges so far, for diagnosis: when each started and crossed the
/// wire (ms after the change), its path and outcome, and the segments of
/// the bad ones.
fn history(done: &[Exchange], since: &dyn Fn(u64) -> Duration) -> String {
    let mut out = Vec::new();
    for e in done {
        out.push(format!(
            "{} ms: {:?} ok={} (on the wire at {:?} ms){}",
            since(e.started_ns).as_millis(),
            e.path,
            e.report.ok,
            e.wire_ns.map(|ns| since(ns).as_millis()),
            e.report.error.as_deref().map(|er| format!(" {er}")).unwrap_or_default()
        ));
        if !e.report.ok {
            out.extend(e.trace.iter().take(12).map(|t| format!("    {t}")));
        }
    }
    out.join("\n")
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

/// Captures on the lan bridge while `traffic` runs; the report covers the
/// segments between `pods` only (and leaves out the agents' own traffic
/// with the API server): HBONE connections pooled by earlier scenarios
/// between other pods stay open and exchange keepalive PINGs every 10 s,
/// which are not this scenario's. No segment at all may address a service
/// VIP.
fn on_the_wire<R>(
    f: &Fixture,
    label: &str,
    pods: &[&Pod],
    traffic: impl FnOnce() -> Result<R>,
) -> Result<(WireReport, R)> {
    let (report, _, out) = on_the_wire_segments(f, label, pods, traffic)?;
    Ok((report, out))
}

/// [`on_the_wire`], also returning the segments between `pods`.
fn on_the_wire_segments<R>(
    f: &Fixture,
    label: &str,
    pods: &[&Pod],
    traffic: impl FnOnce() -> Result<R>,
) -> Result<(WireReport, Vec<Segment>, R)> {
    let file = f.km.mesh.dir.path().join(format!("{}-{label}.pcap", f.mode));
    let wire = Wire::start(&f.topo, &file)?;
    let out = traffic()?;
    let (all, stats) = wire.stop()?;
    ensure!(stats.complete(), "{label}: tcpdump lost packets: {stats:?}");
    no_vip_on_the_wire(&WireReport::from_segments(all.clone()))?;
    let ips: std::collections::BTreeSet<IpAddr> =
        pods.iter().flat_map(|p| [IpAddr::V4(p.ipv4()), IpAddr::V6(p.ipv6())]).collect();
    let segments: Vec<Segment> =
        all.into_iter().filter(|s| ips.contains(&s.src.ip()) && ips.contains(&s.dst.ip())).collect();
    let report = WireReport::from_segments(segments.clone());
    ensure!(report.gap_bytes == 0, "{label}: {} bytes missing from the capture", report.gap_bytes);
    evidence(&format!("[{}] {label} wire: {}", f.mode, report.summary()));
    Ok((report, segments, out))
}

/// Each TCP connection in `segments` (client first, the lower port's end
/// taken as the server), with its segment count and its first segment's
/// flags: one whose first segment is no SYN began before the capture.
fn connections(segments: &[Segment]) -> Vec<String> {
    let mut conns: BTreeMap<(std::net::SocketAddr, std::net::SocketAddr), (usize, u8)> = BTreeMap::new();
    for s in segments {
        let key = if s.src.port() < s.dst.port() { (s.dst, s.src) } else { (s.src, s.dst) };
        conns.entry(key).or_insert((0, s.flags)).0 += 1;
    }
    conns.iter().map(|((c, s), (n, first))| format!("{c} -> {s}: {n} segments, first flags {first:#x}")).collect()
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
    let (started, started_ns) = (Instant::now(), now_ns());
    let pause = f.p.late.start_pause()?;
    let want = Want {
        name: "late",
        client: &f.p.late,
        server: &f.p.s2,
        port: 8080,
        path: Path::Hbone,
        changed: Some((&f.p.late, pause.pid())),
    };
    f.late_pause = Some(pause);
    let took = until_paths(&wire, &[want], started, started_ns)?.remove(0);
    drop(wire);
    let status = kube_status(&config_dump(&f.n1)?).clone();
    ensure!(status["unresolvedPods"].as_array().is_some_and(|u| u.is_empty()), "still unresolved: {status}");
    ensure!(enrolled_uids(&f.n1)?.iter().any(|u| u == f.p.late.uid()), "`late` not among the enrolled pods");
    // Found by the rescan (every 250 ms) while it is unresolved.
    ensure!(
        took.settled() <= ENROLL_DEADLINE,
        "`late` was captured {} ms after its first process started: over {ENROLL_DEADLINE:?}",
        took.settled().as_millis()
    );
    f.srv.drain();
    Ok(format!(
        "c1 -> s2 HBONE byte-exact with s2's pre-agent server (pid {server_pid}) untouched; c1 enrolled with \
         {netns} (pid {pid} in pod{}, same netns inode); hostNetwork h1 in the ambient namespace stays plaintext and \
         unenrolled; `late` unresolved until its process started, then captured {} ms after it (HBONE on the wire \
         at {} ms, its listeners at {} ms; failed exchanges on the way: {:?}); {} /proc scans",
        f.p.c1.uid(),
        took.settled().as_millis(),
        took.wire.as_millis(),
        took.listeners.unwrap_or_default().as_millis(),
        took.failed,
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
    let pid = |name: &str| f.pauses.get(name).map(ChildGuard::pid).with_context(|| format!("no pause for {name}"));
    let (x1_pid, x2_pid) = (pid("x1")?, pid("x2")?);
    let wants = |enrolled: bool| -> [Want<'_>; 2] {
        let path = if enrolled { Path::Hbone } else { Path::Plain };
        [
            Want { name: "x1 -> s2", client: &x1, server: &s2, port: 8080, path, changed: Some((&x1, x1_pid)) },
            Want { name: "c1 -> x2", client: &c1, server: &x2, port: 8090, path, changed: Some((&x2, x2_pid)) },
        ]
    };
    // The agent's three listeners in both pods, by `ss`: all or none.
    let listeners_are = |what: &str, enrolled: bool| -> Result<()> {
        for pod in [&x1, &x2] {
            let ports = capture_listeners(pod)?;
            let want: std::collections::BTreeSet<u16> =
                if enrolled { CAPTURE_PORTS.into_iter().collect() } else { Default::default() };
            ensure!(
                ports == want,
                "{what}: `ss -Hltn` in {} lists {ports:?} of the agent's ports, not {want:?}",
                pod.name()
            );
        }
        Ok(())
    };
    let mut lines = Vec::new();
    let mut worst = Duration::ZERO;
    let mut over = Vec::new();
    {
        // Before any label: neither pod is captured (the check can fail).
        let wire = Wire::start(&f.topo, &file)?;
        until_paths(&wire, &wants(false), Instant::now(), now_ns())
            .context("before any label both pods must talk plaintext")?;
        listeners_are("before any label", false)?;
    }
    for (what, change, enrolled) in &steps {
        let wire = Wire::start(&f.topo, &file)?;
        let (t, t_ns) = (Instant::now(), now_ns());
        change(&f.km)?;
        let took = until_paths(&wire, &wants(*enrolled), t, t_ns).with_context(|| what.to_string())?;
        drop(wire);
        listeners_are(what, *enrolled)?;
        let uids = enrolled_uids(&f.n1)?;
        ensure!(
            uids.iter().any(|u| u == x1.uid()) == *enrolled,
            "{what}: x1 {} /config_dump's pods on node1",
            if *enrolled { "missing from" } else { "still in" }
        );
        let uids = enrolled_uids(&f.n2)?;
        ensure!(uids.iter().any(|u| u == x2.uid()) == *enrolled, "{what}: x2 enrollment on node2 is not {enrolled}");
        let mut pairs = Vec::new();
        for (pod, took) in ["x1", "x2"].iter().zip(&took) {
            worst = worst.max(took.settled());
            if took.settled() > ENROLL_DEADLINE {
                over.push(format!("{what}: {pod} {} ms", took.settled().as_millis()));
            }
            pairs.push(format!(
                "{pod} {} ms (wire {}, listeners {}; failed on the way: {:?})",
                took.settled().as_millis(),
                took.wire.as_millis(),
                took.listeners.unwrap_or_default().as_millis(),
                took.failed
            ));
        }
        lines.push(format!("{what} -> {}: {}", if *enrolled { "HBONE" } else { "plaintext" }, pairs.join(", ")));
    }
    // Nothing lingers: a connection the agent was passing to an app when
    // its pod was un-enrolled, left without a return path, would go on
    // sending the app's SYN-ACKs or data straight to the wire. (Pooled
    // HBONE connections between these pods may exchange keepalive PINGs
    // on 15008 meanwhile: those are not looked at.)
    let quiet = f.km.mesh.dir.path().join(format!("{}-enroll-quiet.pcap", f.mode));
    let wire = Wire::start(&f.topo, &quiet)?;
    std::thread::sleep(Duration::from_millis(1500));
    let pods: Vec<IpAddr> = [&x1, &x2, &c1, &s2].iter().map(|p| IpAddr::V4(p.ipv4())).collect();
    let (segments, _) = wire.stop()?;
    let stray: Vec<String> = segments
        .iter()
        .filter(|s| pods.contains(&s.src.ip()) && pods.contains(&s.dst.ip()))
        .filter(|s| s.src.port() != HBONE_PORT && s.dst.port() != HBONE_PORT)
        .take(6)
        .map(|s| format!("{s:?}"))
        .collect();
    ensure!(
        stray.is_empty(),
        "segments between the pods 1.5 s after the last change, with no probe running: {stray:?}"
    );
    f.srv.drain();
    ensure!(
        over.is_empty(),
        "label changes that took over {ENROLL_DEADLINE:?} to settle: {over:?}; all: {}",
        lines.join("; ")
    );
    Ok(format!(
        "ms from the API change until the path on the wire and the pod's listeners (15001/15006/15008, all or none) \
         both changed, slowest {} ms of {} ms allowed: {}",
        worst.as_millis(),
        ENROLL_DEADLINE.as_millis(),
        lines.join("; ")
    ))
}

/// VIP -> two endpoints on the other node, over HBONE: byte-exact, the app
/// sees the client pod's IP, only 15008 on the wire, connections spread over
/// both endpoints, each on its own slice's target port (e3's slice names
/// `metrics` first: taking the first port would send them to 9999).
fn vip_to_remote_endpoints(f: &mut Fixture) -> Result<String> {
    f.srv.drain();
    let secret = markers(&[0, 1 << 20, (4 << 20) - 64]);
    let (wire, segments, big) = on_the_wire_segments(f, "web", &[&f.p.c1, &f.p.e2, &f.p.e3], || {
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
    ensure!(
        wire.non_tls_streams == 0 && wire.tls_other_streams == 0,
        "a stream was not TLS 1.3: {}; connections: {:?}",
        wire.summary(),
        connections(&segments)
    );
    ensure!(secret.iter().all(|w| !wire.contains(w)), "application bytes visible on the wire");
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
    let (wire, report) = on_the_wire(f, "local", &[&f.p.c1, &f.p.l1], || send_sequential(&f.p.c1, LOCAL, 4 << 20))?;
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
    let (wire, _) = on_the_wire(f, "legacy", &[&f.p.c1, &f.p.u2], || send_verified(&f.p.c1, LEGACY, 1 << 20, T))?;
    ensure!(wire.ports_seen.contains(&9090), "plaintext to the target port 9090 expected: {}", wire.summary());
    ensure!(!wire.ports_seen.contains(&HBONE_PORT), "an endpoint outside the mesh got HBONE: {}", wire.summary());
    ensure!(visible.iter().all(|w| wire.contains(w)), "the capture must see the plaintext bytes");
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
    let took = changed(f, |km| km.api.apply(authorization_policy("mesh", "allow-sleep", spec)).map(drop))?;
    // Counted from here: the control's stream may still have been open at
    // node2 when the policy arrived, and closing it is a denial of its own
    // (new_policy_closes_open_connections checks that one).
    std::thread::sleep(Duration::from_millis(300));
    let before = denials(&f.n2, DEFAULT_DENY)?;
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

/// The metrics Istio's tooling reads are all there, under Istio's names
/// (every `istio_tcp_*` family emitted is one of [`ISTIO_TCP_METRICS`], and
/// each of them is emitted), each series with all of Istio's labels and the
/// values the Kubernetes objects give: Deployment names as workloads,
/// app/version labels, services by hostname, SPIFFE principals.
fn metric_labels(f: &mut Fixture) -> Result<String> {
    let mut series: BTreeMap<&str, usize> = ISTIO_TCP_METRICS.iter().map(|m| (*m, 0)).collect();
    let mut exported = Vec::new();
    for node in [&f.n1, &f.n2] {
        let m = metrics(node)?;
        exported.push(m.clone());
        for line in m.lines().filter(|l| l.starts_with("istio_tcp_")) {
            let family = line.split(['{', ' ']).next().unwrap_or(line);
            let Some(count) = series.get_mut(family) else {
                bail!("{}: {family} is not one of Istio's TCP metrics {ISTIO_TCP_METRICS:?}: {line}", node.name());
            };
            *count += 1;
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
    let absent: Vec<&&str> = series.iter().filter(|(_, n)| **n == 0).map(|(m, _)| m).collect();
    ensure!(absent.is_empty(), "Istio's TCP metrics never emitted: {absent:?}");
    let (m1, m2) = (&exported[0], &exported[1]);
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
    // vip_to_remote_endpoints: 31 connections to `web`, echoing 4 MiB and
    // 30 x 16 KiB, all closed by now.
    let (conns, bytes) = (31u64, (4u64 << 20) + 30 * (16 << 10));
    let mut moved = Vec::new();
    for (metric, least) in [
        ("istio_tcp_connections_opened_total", conns),
        ("istio_tcp_connections_closed_total", conns),
        ("istio_tcp_received_bytes_total", bytes),
        ("istio_tcp_sent_bytes_total", bytes),
    ] {
        let source = metric_sum(m1, metric, &[&["reporter=\"source\""][..], &web].concat());
        let destination = metric_sum(m2, metric, &[&["reporter=\"destination\""][..], &web].concat());
        ensure!(
            source >= least && destination >= least,
            "{metric} for service `web` with the objects' names, on both reporters: source {source}, destination \
             {destination}, at least {least} expected"
        );
        moved.push(format!("{metric} {source}/{destination}"));
    }
    let plain = metric_sum(
        m1,
        "istio_tcp_connections_opened_total",
        &["destination_service=\"legacy.legacy.svc.cluster.local\"", "connection_security_policy=\"unknown\""],
    );
    ensure!(plain >= 1, "plaintext to a service: connection_security_policy=\"unknown\" with the service named");
    Ok(format!(
        "{} series in all {} of Istio's TCP families ({}), each with all {} Istio TCP labels; `web` named with the \
         Deployment names (sleep, web), app/version labels and SPIFFE principals from the API on source/destination: \
         {}",
        series.values().sum::<usize>(),
        series.len(),
        series.iter().map(|(m, n)| format!("{m} {n}")).collect::<Vec<_>>().join(", "),
        ISTIO_TCP_LABELS.len(),
        moved.join(", ")
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
