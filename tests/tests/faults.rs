//! Faults (issue 9, "The suite: Faults"): what Sluice does when something
//! around it breaks, each judged on what an operator or an app can observe:
//! bytes at the apps, how fast and how a client's connection ends, metrics,
//! `/config_dump`, the pinned maps (bpftool), listeners and rules inside the
//! pods, the agent's descriptors, and the wire between the nodes (tcpdump).
//!
//! ```text
//!   node1: a1 (sa sleep), a2 (sa web), a3 (sa batch), u1 (not enrolled)
//!   node2: b1 (sa httpbin), u2 (not enrolled)
//! ```
//!
//! - SIGKILL of node1's agent under load: same-node flows (spliced in eBPF
//!   mode, held by the keeper) complete byte-exact, tunnelled flows end at
//!   once with a reset or a short read, never a hang; a new agent serves
//!   within 1 s of CPU (wall time on this shared machine is in the
//!   evidence) and leaves the pinned maps, pinned links, listeners,
//!   iptables rules and ip rules as they were (the LRU `orig_dst_*` maps
//!   may only grow by the connections made), and the pods' tc filters (the
//!   new agent replaces the killed one's in place).
//! - A pod's netns vanishes under the agent: the agent lets go of it (pod
//!   gone from `/config_dump`, no descriptor on that netns, so the kernel
//!   frees it and its veth) and keeps serving the other pods.
//! - The CA directory (`ca.dir`) rotates or disappears: new leaves follow a
//!   new CA the mesh trusts; one the running agents do not trust is held
//!   back and raised; after a removal the agent keeps its certificates and
//!   raises `sluice_ca_source_healthy 0`.
//! - The peer agent stops: connections to its pods fail at once with a
//!   reset and a counted error, and the pool recovers when it is back.
//! - eBPF mode with the agent down: capture stays and fails closed; tcpdump
//!   between the nodes sees nothing of an enrolled pod's connections, and a
//!   plaintext client does not reach an enrolled pod's app while its agent
//!   is down.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use sluice::{
    identity::{Ca, SpiffeId},
    netns::Netns,
};
use sluice_tests::{
    capture::{Capture, Pcap},
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    peer_bin, require_root,
    traffic::{echo_server, send, send_verified},
    ChildGuard, Node, Pod, SendReport, Topology,
};

const MODES: &[&str] = &["iptables", "ebpf"];
const T: Duration = Duration::from_secs(30);
/// How long a connection may take to end once its agent is gone: a reset
/// or an EOF comes within milliseconds; a hang would take the client's
/// 60 s timeout.
const FAIL_FAST: Duration = Duration::from_secs(3);

struct Fixture {
    topo: Topology,
    mesh: Mesh,
    n1: Node,
    n2: Node,
    a1: Pod,
    a2: Pod,
    a3: Pod,
    u1: Pod,
    b1: Pod,
    u2: Pod,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let (a1, a2, a3, u1) = (n1.add_pod("a1")?, n1.add_pod("a2")?, n1.add_pod("a3")?, n1.add_pod("u1")?);
    let (b1, u2) = (n2.add_pod("b1")?, n2.add_pod("u2")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&a1, "default", "sleep", true);
    mesh.add(&a2, "default", "web", true);
    mesh.add(&a3, "default", "batch", true);
    mesh.add(&u1, "default", "legacy", false);
    mesh.add(&b1, "default", "httpbin", true);
    mesh.add(&u2, "default", "legacy", false);
    mesh.write_config()?;
    Ok(Fixture { topo, mesh, n1, n2, a1, a2, a3, u1, b1, u2 })
}

fn metrics(node: &Node) -> Result<String> {
    http_get(node, 15020, "/metrics")
}

fn config_dump(node: &Node) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&http_get(node, 15000, "/config_dump")?)?)
}

fn dumped_pods(node: &Node) -> Result<BTreeSet<String>> {
    let dump = config_dump(node)?;
    Ok(dump["pods"].as_array().into_iter().flatten().filter_map(|p| p["uid"].as_str().map(str::to_owned)).collect())
}

/// `sluice_hbone_errors_total{direction}` by status.
fn hbone_errors(node: &Node, direction: &str) -> Result<BTreeMap<String, u64>> {
    let m = metrics(node)?;
    let mut by_status = BTreeMap::new();
    for line in m.lines().filter(|l| l.starts_with("sluice_hbone_errors_total{")) {
        if !line.contains(&format!("direction=\"{direction}\"")) {
            continue;
        }
        let status = line.split("status=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        *by_status.entry(status.to_owned()).or_insert(0) += value;
    }
    Ok(by_status)
}

fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Every descriptor of `pid`, as `readlink` shows it.
fn fd_links(pid: u32) -> Result<Vec<String>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(target) = std::fs::read_link(entry?.path()) {
            links.push(target.display().to_string());
        }
    }
    Ok(links)
}

fn counter(c: &serde_json::Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or(0)
}

/// Every app connection node `node`'s agent opened has closed (pooled
/// HBONE connections between the agents may stay), so what remains in maps
/// and sockets is what it keeps for good.
fn quiesce(node: &Node) -> Result<()> {
    wait_until(&format!("{}'s agent to carry no app connection", node.name()), T, || {
        let m = metrics(node)?;
        let opened = metric_sum(&m, "istio_tcp_connections_opened_total", &[]);
        Ok(opened == metric_sum(&m, "istio_tcp_connections_closed_total", &[]))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

// ---------------------------------------------------------------------------
// Flows: sluice-peer clients running in the background
// ---------------------------------------------------------------------------

/// A paced `sluice-peer send` in the background, printing its progress.
struct Flow {
    name: String,
    child: ChildGuard,
    total: u64,
    verified: u64,
}

impl Flow {
    fn start(name: String, pod: &Pod, addr: &str, total: u64, rate: u64) -> Result<Flow> {
        let mut cmd = Command::new(peer_bin());
        cmd.args(["send", "--connect", addr, "--bytes", &total.to_string(), "--rate", &rate.to_string()]).args([
            "--progress-ms",
            "100",
            "--timeout-secs",
            "60",
        ]);
        Ok(Flow { name, child: sluice_tests::spawn_in(pod, cmd)?, total, verified: 0 })
    }

    /// Bytes verified so far, from the latest PROGRESS line.
    fn progress(&mut self) -> u64 {
        while let Ok(Some(line)) = self.child.next_line(Duration::from_millis(1)) {
            if let Some(v) = line.strip_prefix("PROGRESS ").and_then(|r| r.split(' ').nth(2)?.parse().ok()) {
                self.verified = v;
            }
        }
        self.verified
    }

    fn report(self) -> Result<(String, u64, SendReport, Output)> {
        let out = self.child.finish(Duration::from_secs(70))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| {
            format!("{}: no report; stdout {stdout:?}, stderr {}", self.name, String::from_utf8_lossy(&out.stderr))
        })?;
        Ok((self.name, self.total, serde_json::from_str(line)?, out))
    }
}

/// User and system CPU time `pid` has used so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(") ").context("/proc/pid/stat")?.1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// A byte-exact echo of `bytes` written whole, then half-closed, then read
/// back: a spliced app end leaves the sockmap at its half-close, so this
/// client never meets the EAGAIN a blocking read() gets in a sockmap while
/// another thread half-closes (README, "Same-node splice", limits).
fn send_sequential(pod: &Pod, addr: &str, bytes: u64) -> Result<SendReport> {
    let mut cmd = Command::new(peer_bin());
    cmd.args(["send", "--connect", addr, "--bytes", &bytes.to_string(), "--sequential", "--timeout-secs", "10"]);
    let out = sluice_tests::output_in(pod, cmd, Duration::from_secs(15))?;
    let report: SendReport = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("sluice-peer: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })?;
    ensure!(report.ok && report.bytes_verified == bytes, "echo to {addr} not byte-exact: {report:?}");
    Ok(report)
}

/// Polls `flows` until each client has exited or `limit` has passed since
/// `from`; returns when each exited, counted from `from`.
fn exit_times(flows: &[Flow], from: Instant, limit: Duration) -> Result<Vec<Option<Duration>>> {
    let mut ended = vec![None; flows.len()];
    loop {
        for (i, f) in flows.iter().enumerate() {
            if ended[i].is_none() && f.child.try_status()?.is_some() {
                ended[i] = Some(from.elapsed());
            }
        }
        if ended.iter().all(Option::is_some) || from.elapsed() > limit {
            return Ok(ended);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The connection ended as a failure the app can tell from a complete
/// answer: a reset, or EOF with fewer bytes than it sent. Never a timeout.
fn assert_cut(what: &str, r: &SendReport, total: u64) {
    let error = r.error.clone().unwrap_or_default();
    assert!(!r.ok && r.bytes_verified < total, "{what}: expected a cut connection, the transfer completed: {r:?}");
    assert!(!error.contains("timed out"), "{what}: expected a reset or a short read, got a timeout: {error}");
    assert!(
        error.contains("reset") || error.contains("Broken pipe") || error.contains(&format!("of {total} bytes")),
        "{what}: expected ECONNRESET, EPIPE or EOF with a short count, got: {error}"
    );
}

// ---------------------------------------------------------------------------
// What a dead agent could leave behind
// ---------------------------------------------------------------------------

/// Everything an agent keeps on a node besides its own process: the pinned
/// maps' keys and the pinned links (eBPF), and in each enrolled pod its
/// listeners, iptables rules, ip rules and tc filters.
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    maps: BTreeMap<String, BTreeSet<String>>,
    links: BTreeSet<String>,
    pods: BTreeMap<String, BTreeMap<&'static str, Vec<String>>>,
    /// `tc filter show dev eth0 ingress` in each pod, as printed.
    tc: BTreeMap<String, String>,
}

/// Maps whose entries belong to one connection each: empty once the node
/// carries none.
const CONNECTION_MAPS: &[&str] = &["splice_counts", "splice_routes", "splice_written", "sock_pairs"];
/// The original destinations sock_ops records per connection: LRU maps that
/// nothing empties when a connection closes (a later connection on the same
/// 4-tuple overwrites its entry; 65,536 at most). They may only grow by the
/// connections made, never hold anything else.
const LRU_ORIG_DST_MAPS: &[&str] = &["orig_dst_by_cookie", "orig_dst_by_tuple"];

/// Keys of every map pinned under `pins`, as bpftool prints them.
fn map_keys(pins: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir(pins).with_context(|| format!("listing {}", pins.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let out = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(entry.path()).output()?;
        ensure!(out.status.success(), "bpftool map dump {name}: {}", String::from_utf8_lossy(&out.stderr));
        let entries: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bpftool map dump {name}: {}", String::from_utf8_lossy(&out.stdout)))?;
        let keys = entries
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e.get("formatted").and_then(|f| f.get("key")).or_else(|| e.get("key")).unwrap_or(e).to_string())
            .collect();
        maps.insert(name, keys);
    }
    Ok(maps)
}

fn pinned_links(pins: &Path) -> Result<BTreeSet<String>> {
    let mut links = BTreeSet::new();
    let dir = pins.join("links");
    if !dir.exists() {
        return Ok(links);
    }
    for pod in std::fs::read_dir(&dir)? {
        let pod = pod?;
        for link in std::fs::read_dir(pod.path())? {
            links.insert(format!("{}/{}", pod.file_name().to_string_lossy(), link?.file_name().to_string_lossy()));
        }
    }
    Ok(links)
}

/// The agent's listeners in `pod`: the fixed ports by number, the eBPF
/// sk_assign listeners (kernel-chosen ports) as `assign`; the test's own
/// servers left out.
fn agent_listeners(pod: &Pod) -> Result<Vec<String>> {
    let ss = pod.exec_ok(&["ss", "-Hltn"])?;
    let mut listeners: Vec<String> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| {
            let (addr, port) = local.rsplit_once(':')?;
            match port.parse::<u16>().ok()? {
                8080 => None,
                p @ (15001 | 15006 | 15008) => Some(format!("{addr}:{p}")),
                _ => Some(format!("{addr}:assign")),
            }
        })
        .collect();
    listeners.sort();
    Ok(listeners)
}

fn leftovers(f: &Fixture, pins: &Path, mode: &str) -> Result<Leftovers> {
    let (mut pods, mut tc) = (BTreeMap::new(), BTreeMap::new());
    for pod in [&f.a1, &f.a2, &f.a3] {
        let mut what = BTreeMap::new();
        what.insert("listeners", agent_listeners(pod)?);
        let mut rules: Vec<String> = pod
            .exec_ok(&["iptables-save"])?
            .lines()
            .chain(pod.exec_ok(&["ip6tables-save"])?.lines())
            .filter(|l| !l.starts_with('#'))
            // Packet counters move; the rules must not.
            .map(|l| if l.starts_with(':') { l.rsplit_once(' ').map_or(l, |(c, _)| c).to_owned() } else { l.into() })
            .collect();
        rules.sort();
        what.insert("iptables", rules);
        let ip_rules = [pod.exec_ok(&["ip", "rule"])?, pod.exec_ok(&["ip", "-6", "rule"])?];
        what.insert("ip rules", ip_rules.iter().flat_map(|r| r.lines().map(str::to_owned)).collect());
        let shown = pod.exec_ok(&["tc", "filter", "show", "dev", "eth0", "ingress"])?;
        // The program id changes with every agent; what counts is how many.
        let filters = shown.lines().filter(|l| l.contains("sluice_tc_ingress")).count();
        what.insert("tc filters", vec![format!("{filters} sluice_tc_ingress")]);
        pods.insert(pod.name().to_owned(), what);
        tc.insert(pod.name().to_owned(), shown);
    }
    let (maps, links) = if mode == "ebpf" { (map_keys(pins)?, pinned_links(pins)?) } else { Default::default() };
    Ok(Leftovers { maps, links, pods, tc })
}

fn lru(l: &Leftovers) -> usize {
    LRU_ORIG_DST_MAPS.iter().map(|m| l.maps.get(*m).map_or(0, BTreeSet::len)).sum()
}

fn assert_no_connection_entries(label: &str, l: &Leftovers) {
    for name in CONNECTION_MAPS {
        let keys = l.maps.get(*name).cloned().unwrap_or_default();
        assert!(
            keys.is_empty(),
            "{label}: pinned map {name} should hold no entry with no connection open, holds {keys:?}"
        );
    }
}

fn assert_same_leftovers(mode: &str, before: &Leftovers, after: &Leftovers, connections: usize) {
    for (name, keys) in &before.maps {
        let now = after.maps.get(name).cloned().unwrap_or_default();
        let stale: Vec<_> = now.difference(keys).collect();
        let lost: Vec<_> = keys.difference(&now).collect();
        if LRU_ORIG_DST_MAPS.contains(&name.as_str()) {
            assert!(
                stale.len() <= connections,
                "[{mode}] pinned map {name} should grow by at most the {connections} connections made, grew by {}",
                stale.len()
            );
            continue;
        }
        assert!(
            stale.is_empty() && lost.is_empty(),
            "[{mode}] pinned map {name} should hold the same keys after the restart: {} stale {stale:?}, {} lost {lost:?}",
            stale.len(),
            lost.len()
        );
    }
    assert_eq!(before.links, after.links, "[{mode}] the pinned cgroup links should be the same after the restart");
    for (pod, what) in &before.pods {
        for (kind, was) in what {
            let now = &after.pods[pod][kind];
            assert_eq!(
                was, now,
                "[{mode}] {kind} in pod {pod} should be as before the SIGKILL (none stale, none lost)"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// SIGKILL under load
// ---------------------------------------------------------------------------

const SAME_NODE_FLOWS: usize = 3;
const TUNNEL_FLOWS: usize = 3;
/// Same-node flows run about 6 s, so they outlive the kill by seconds.
const SAME_NODE_BYTES: u64 = 48 << 20;
const SAME_NODE_RATE: u64 = 8 << 20;
/// Tunnelled flows would run 16 s: certainly in flight at the kill.
const TUNNEL_BYTES: u64 = 64 << 20;
const TUNNEL_RATE: u64 = 4 << 20;

fn start_keeper(node: &Node, sock: &Path) -> Result<ChildGuard> {
    let mut cmd = Command::new(sluice_tests::agent_bin());
    cmd.args(["keeper", "--socket"]).arg(sock);
    let mut keeper = sluice_tests::spawn_in(node, cmd)?;
    keeper.wait_for_line("READY", Duration::from_secs(10))?;
    Ok(keeper)
}

#[test]
fn sigkill_under_load_spliced_complete_tunnelled_reset_new_agent_clean() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        sigkill_in_mode(mode)?;
    }
    Ok(())
}

fn sigkill_in_mode(mode: &str) -> Result<()> {
    let f = fixture(&format!("kill{}", &mode[..2]))?;
    let sock = f.mesh.dir.path().join("keeper.sock");
    // The keeper only matters where there is a splice to keep (eBPF).
    let keeper = if mode == "ebpf" { Some(start_keeper(&f.n1, &sock)?) } else { None };
    let keeper_args = ["--keeper", sock.to_str().context("keeper path")?];
    let ag1 = f.mesh.start_agent_args(&f.n1, mode, &keeper_args)?;
    let _ag2 = f.mesh.start_agent(&f.n2, mode)?;
    let pins = ag1.pin_root.clone();
    let (_local, local) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &[])?;
    let (_remote, remote) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    send_sequential(&f.a1, &local, 64 << 10)?;
    send_verified(&f.a1, &remote, 64 << 10, T)?;
    quiesce(&f.n1)?;
    let before = leftovers(&f, &pins, mode)?;
    if mode == "ebpf" {
        assert_no_connection_entries("[ebpf] before the load", &before);
    }
    let keeper_fds = keeper.as_ref().map(|k| fd_links(k.pid()).map(|l| l.len())).transpose()?;

    let mut same_node = Vec::new();
    let mut tunnelled = Vec::new();
    for i in 0..SAME_NODE_FLOWS {
        same_node.push(Flow::start(format!("a1->a2 #{i}"), &f.a1, &local, SAME_NODE_BYTES, SAME_NODE_RATE)?);
    }
    for i in 0..TUNNEL_FLOWS {
        tunnelled.push(Flow::start(format!("a1->b1 #{i}"), &f.a1, &remote, TUNNEL_BYTES, TUNNEL_RATE)?);
    }
    wait_until("every flow to be moving verified bytes", T, || {
        Ok(same_node.iter_mut().chain(tunnelled.iter_mut()).all(|fl| fl.progress() > 0))
    })?;
    if mode == "ebpf" {
        // Before the kernel has taken a direction over, the agent holds a
        // few of its bytes in memory, which die with it (README, limits).
        wait_until("the kernel to take every same-node direction over", T, || {
            Ok(counter(&sluice_tests::kernel_counters(&pins)?, "splice_switched") >= 2 * SAME_NODE_FLOWS as u64)
        })?;
    }
    let at_kill: Vec<u64> = same_node.iter_mut().chain(tunnelled.iter_mut()).map(Flow::progress).collect();

    let pid = ag1.pid();
    let killed = Instant::now();
    drop(ag1); // SIGKILL, then reap
    ensure!(!Path::new(&format!("/proc/{pid}")).exists(), "agent {pid} still alive after SIGKILL");

    // Tunnelled flows (and in iptables mode the same-node ones, which the
    // agent also carries itself) end at once.
    let mut cut: Vec<Flow> = tunnelled;
    if mode != "ebpf" {
        cut.append(&mut same_node);
    }
    let ended = exit_times(&cut, killed, FAIL_FAST)?;
    let mut cut_figures = Vec::new();
    for (flow, ended) in cut.into_iter().zip(ended) {
        let (name, total, report, _) = flow.report()?;
        let ended = ended.with_context(|| {
            format!("[{mode}] {name}: expected the client to see its connection end within {FAIL_FAST:?} of the SIGKILL; it hung: {report:?}")
        })?;
        assert_cut(&format!("[{mode}] {name} after the SIGKILL"), &report, total);
        cut_figures.push(format!(
            "{name} ended after {} ms with {} of its bytes verified ({})",
            ended.as_millis(),
            report.bytes_verified,
            report.error.unwrap_or_default()
        ));
    }

    // A new agent: how soon does it serve?
    let spawned = Instant::now();
    let ag1 = f.mesh.start_agent_args(&f.n1, mode, &keeper_args)?;
    let ready = spawned.elapsed();
    let mut tries = 0;
    wait_until("the new agent to carry a1 -> b1 byte-exact", T, || {
        tries += 1;
        Ok(send(&f.a1, &remote, 4096, Duration::from_secs(2))?.ok)
    })?;
    let served_remote = spawned.elapsed();
    let cpu = cpu_time(ag1.pid())?;
    send_sequential(&f.a1, &local, 4096).context("a1 -> a2 through the new agent")?;
    let served_local = spawned.elapsed();

    // Same-node flows in eBPF mode: the keeper held them, the new agent
    // adopted them; every byte arrives.
    let mut kept_figures = Vec::new();
    if mode == "ebpf" {
        for flow in same_node {
            let (name, _, report, _) = flow.report()?;
            assert!(
                report.ok && report.bytes_verified == SAME_NODE_BYTES,
                "[ebpf] {name}: a spliced flow should complete byte-exact across the SIGKILL, got {report:?}\nnew agent:\n{}",
                ag1.stderr()
            );
            kept_figures.push(format!("{name} {} bytes byte-exact in {} ms", report.bytes_verified, report.elapsed_ms));
        }
        let log = ag1.stderr();
        let adopted = log.matches("adopted a spliced connection").count();
        assert!(
            adopted >= SAME_NODE_FLOWS,
            "[ebpf] the new agent should adopt the {SAME_NODE_FLOWS} spliced connections from the keeper, adopted {adopted}:\n{log}"
        );
    }

    quiesce(&f.n1)?;
    let after = leftovers(&f, &pins, mode)?;
    if mode == "ebpf" {
        assert_no_connection_entries("[ebpf] after the flows ended", &after);
    }
    let connections = SAME_NODE_FLOWS + TUNNEL_FLOWS + tries + 1;
    assert_same_leftovers(mode, &before, &after, connections);
    if let (Some(k), Some(was)) = (&keeper, keeper_fds) {
        let now = fd_links(k.pid())?.len();
        assert!(
            now <= was,
            "the keeper should let go of the connections that ended: {was} descriptors before, {now} after"
        );
    }
    evidence(&format!(
        "[{mode}] SIGKILL of node1's agent under load (at kill, bytes verified per flow: {at_kill:?}): {}",
        cut_figures.join("; ")
    ));
    if mode == "ebpf" {
        evidence(&format!("[ebpf] held by the keeper and adopted by the new agent: {}", kept_figures.join("; ")));
    }
    evidence(&format!(
        "[{mode}] new agent: READY {} ms after spawn, first byte-exact a1 -> b1 at {} ms ({tries} tries; {} ms of CPU, \
         load average {}), a1 -> a2 at {} ms; pinned maps ({} maps, {} keys; orig_dst LRU maps {} -> {} entries after \
         {connections} connections), {} pinned links, listeners, iptables rules and ip rules in a1..a3 identical before and after",
        ready.as_millis(),
        served_remote.as_millis(),
        cpu.as_millis(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').next().unwrap_or("?"),
        served_local.as_millis(),
        after.maps.len(),
        after.maps.values().map(BTreeSet::len).sum::<usize>(),
        lru(&before),
        lru(&after),
        after.links.len(),
    ));
    // Wall time on this shared 2-CPU machine mostly measures the other
    // processes; the CPU the agent spent until it served (its own and the
    // kernel's verifier, which runs in its bpf() calls) does not.
    assert!(
        cpu <= Duration::from_secs(1),
        "[{mode}] a new agent should serve within 1 s of CPU; it used {cpu:?} until its first byte-exact exchange ({served_remote:?} wall, READY at {ready:?}); its log:\n{}",
        ag1.stderr()
    );
    assert!(
        served_remote <= Duration::from_secs(10),
        "[{mode}] a new agent should serve promptly; the first byte-exact exchange came after {served_remote:?} (READY at {ready:?}); its log:\n{}",
        ag1.stderr()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// A pod's netns vanishes
// ---------------------------------------------------------------------------

#[test]
fn vanished_pod_netns_is_released_and_other_pods_keep_serving() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        netns_vanishes_in_mode(mode)?;
    }
    Ok(())
}

/// A log line without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |m| &rest[i + m + 1..]);
    }
    out.push_str(rest);
    out.trim().to_owned()
}

/// How many of `pid`'s descriptors are the file `(dev, ino)` (a netns).
fn fds_on(pid: u32, (dev, ino): (u64, u64)) -> Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // stat through the descriptor: an unmounted netns still has its inode.
        if let Ok(m) = std::fs::metadata(entry?.path()) {
            n += usize::from(m.dev() == dev && m.ino() == ino);
        }
    }
    Ok(n)
}

/// Whether `device` exists in `node`'s netns.
fn has_device(node: &Node, device: &str) -> Result<bool> {
    Ok(node.exec(&["ip", "link", "show", "dev", device])?.status.success())
}

fn netns_vanishes_in_mode(mode: &str) -> Result<()> {
    let f = fixture(&format!("vanish{}", &mode[..2]))?;
    let ag1 = f.mesh.start_agent(&f.n1, mode)?;
    let _ag2 = f.mesh.start_agent(&f.n2, mode)?;
    let (_b1, b1_addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    let (_a2, a2_addr) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &[])?;
    let (a3_server, a3_addr) = echo_server(&f.a3, &format!("{}:8080", f.a3.ipv4()), &[])?;
    // a3 in every role: a pooled HBONE connection dialled from its netns,
    // an inbound stream to it, and a same-node connection.
    send_verified(&f.a3, &b1_addr, 64 << 10, T)?;
    send_verified(&f.b1, &a3_addr, 64 << 10, T)?;
    send_sequential(&f.a1, &a3_addr, 64 << 10)?;
    quiesce(&f.n1)?;

    let ns = std::fs::metadata(f.a3.netns_path())?;
    let ns = (ns.dev(), ns.ino());
    let fds_before = fd_links(ag1.pid())?;
    let held_before = fds_on(ag1.pid(), ns)?;
    ensure!(held_before >= 1, "[{mode}] the agent should hold a3's netns while a3 is enrolled");
    ensure!(dumped_pods(&f.n1)?.contains("default/a3"), "[{mode}] a3 should be enrolled first");
    let links_before = pinned_links(&ag1.pin_root)?;
    let enrolled = |m: &str| metric_sum(m, "sluice_enrolled_pods", &[]);
    let enrolled_before = enrolled(&metrics(&f.n1)?);

    // The pod goes the hard way: its processes killed, its netns removed,
    // nothing said to the agent (the config still lists it).
    drop(a3_server);
    let out = Command::new("ip").args(["netns", "del", f.a3.netns_name()]).output()?;
    ensure!(out.status.success(), "ip netns del: {}", String::from_utf8_lossy(&out.stderr));
    let result = (|| -> Result<()> {
        let dropped = wait_until("the agent to drop a3 from /config_dump", Duration::from_secs(15), || {
            Ok(!dumped_pods(&f.n1)?.contains("default/a3"))
        })
        .with_context(|| format!("[{mode}] agent log:\n{}", ag1.stderr()))?;
        // Nothing of the agent's holds the netns any more, so the kernel
        // frees it, and a3's veth goes with it.
        let freed = wait_until("a3's netns to be freed (its veth gone from node1)", Duration::from_secs(10), || {
            Ok(fds_on(ag1.pid(), ns)? == 0 && !has_device(&f.n1, f.a3.host_veth())?)
        })
        .map(|d| d + dropped)
        .with_context(|| {
            format!(
                "[{mode}] the agent should hold no descriptor on a3's netns ({} left) and a3's veth should be gone",
                fds_on(ag1.pid(), ns).unwrap_or(0)
            )
        })?;
        let fds_after = fd_links(ag1.pid())?;
        let sockets = |l: &[String]| l.iter().filter(|x| x.starts_with("socket:")).count();
        assert!(
            sockets(&fds_after) < sockets(&fds_before),
            "[{mode}] the agent's sockets should shrink by a3's listeners: {} before, {} after",
            sockets(&fds_before),
            sockets(&fds_after)
        );
        let enrolled_after = enrolled(&metrics(&f.n1)?);
        assert_eq!(enrolled_after + 1, enrolled_before, "[{mode}] sluice_enrolled_pods should drop by a3");
        let links_after = pinned_links(&ag1.pin_root)?;
        if mode == "ebpf" {
            let left: BTreeSet<_> = links_after.iter().map(|l| l.split('/').next().unwrap_or("")).collect();
            let had: BTreeSet<_> = links_before.iter().map(|l| l.split('/').next().unwrap_or("")).collect();
            assert_eq!(left.len() + 1, had.len(), "[ebpf] a3's pinned cgroup links should go: {had:?} -> {left:?}");
        }
        // The others are served as before, byte-exact.
        send_sequential(&f.a1, &a2_addr, 1 << 20).context("a1 -> a2 after a3 vanished")?;
        send_verified(&f.a1, &b1_addr, 1 << 20, T).context("a1 -> b1 after a3 vanished")?;
        send_verified(&f.b1, &a2_addr, 1 << 20, T).context("b1 -> a2 after a3 vanished")?;
        let log = ag1.stderr();
        let reason = plain(log.lines().find(|l| l.contains("default/a3") && l.contains("netns was")).unwrap_or(""));
        assert!(!reason.is_empty(), "[{mode}] the agent should log why it removed a3:\n{log}");
        evidence(&format!(
            "[{mode}] a3's netns deleted under the agent: dropped from /config_dump after {} ms, netns freed (no \
             descriptor, veth gone) after {} ms; agent descriptors {} -> {} (sockets {} -> {}), enrolled pods {} -> {}; \
             a1 -> a2, a1 -> b1, b1 -> a2 byte-exact after; logged: {reason}",
            dropped.as_millis(),
            freed.as_millis(),
            fds_before.len(),
            fds_after.len(),
            sockets(&fds_before),
            sockets(&fds_after),
            enrolled_before,
            enrolled_after,
        ));
        Ok(())
    })();
    // The topology deletes a3's netns by name on teardown: give it one.
    let _ = Command::new("ip").args(["netns", "add", f.a3.netns_name()]).output();
    result
}

// ---------------------------------------------------------------------------
// The CA directory rotates or disappears
// ---------------------------------------------------------------------------

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "sluice faults");
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn root(name: &str) -> Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        Ok(TestCa { cert: ca_params(name).self_signed(&key)?, key })
    }

    fn intermediate(&self, name: &str) -> Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        Ok(TestCa { cert: ca_params(name).signed_by(&key, &self.cert, &self.key)?, key })
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

/// Writes a CA directory file by file, each replaced by rename as a
/// Kubernetes secret update or `install` would: the key, then the chain,
/// then the roots.
fn write_ca_dir(dir: &Path, roots: &[&TestCa], key: &rcgen::KeyPair, chain: Option<&[&TestCa]>) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let put = |name: &str, text: &str, mode: u32| -> Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    };
    put("ca-key.pem", &key.serialize_pem(), 0o600)?;
    match chain {
        Some(chain) => put("cert-chain.pem", &chain.iter().map(|c| c.cert.pem()).collect::<String>(), 0o644)?,
        None => {
            let _ = std::fs::remove_file(dir.join("cert-chain.pem"));
        }
    }
    put("root-cert.pem", &roots.iter().map(|c| c.cert.pem()).collect::<String>(), 0o644)
}

/// Accepts any server and keeps the chain it presented.
#[derive(Debug)]
struct Recorder {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate chain `to` (an agent's 15008) presents in a TLS 1.3
/// handshake from `from`'s netns, as a client with a leaf of `probe_ca`.
fn served_chain(from: &Pod, to: SocketAddr, probe_ca: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let me = SpiffeId::new("cluster.local", "default", "probe")?;
    let cert = Ca::load(probe_ca)?.issue(&me, Duration::from_secs(3600))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder { provider: provider.clone(), chain: Mutex::default() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let netns = Netns::open(&from.netns_path())?;
        let tcp = netns.socket(to, None, false)?.connect(to).await.with_context(|| format!("TCP connect to {to}"))?;
        let connect =
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::IpAddress(to.ip().into()), tcp);
        tokio::time::timeout(Duration::from_secs(5), connect).await.context("TLS handshake timed out")??;
        Ok::<_, anyhow::Error>(())
    })?;
    let chain = recorder.chain.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(!chain.is_empty(), "{to} presented no certificate");
    Ok(chain)
}

/// Whether `chain` (leaf first) verifies up to `root`.
fn chains_to(chain: &[CertificateDer<'static>], root: &TestCa) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(root.der()).is_err() {
        return false;
    }
    let Ok(leaf) = rustls::server::ParsedCertificate::try_from(&chain[0]) else { return false };
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(&leaf, &roots, &chain[1..], UnixTime::now(), algs.all)
        .is_ok()
}

fn ca_health(node: &Node) -> Result<(u64, u64, u64, bool)> {
    let m = metrics(node)?;
    let present = m.lines().any(|l| l.starts_with("sluice_ca_source_healthy"));
    Ok((
        metric_sum(&m, "sluice_ca_source_healthy", &[]),
        metric_sum(&m, "sluice_ca_reloads_total", &["result=\"ok\""]),
        metric_sum(&m, "sluice_ca_reloads_total", &["result=\"error\""]),
        present,
    ))
}

fn cert_not_after(node: &Node, uid: &str) -> Result<String> {
    let dump = config_dump(node)?;
    let pod = dump["pods"].as_array().and_then(|p| p.iter().find(|p| p["uid"] == uid)).cloned().unwrap_or_default();
    Ok(pod["cert_not_after"].as_str().unwrap_or_default().to_owned())
}

/// `ca.dir` changes under running agents. Capture plays no part in where
/// certificates come from, so this runs in one mode.
#[test]
fn ca_dir_rotated_or_removed() -> Result<()> {
    require_root!(Ok(()));
    let mode = "iptables";
    let mut f = fixture("cafault")?;
    f.mesh.cert_ttl = "4s".into();
    f.mesh.write_config()?;
    let ca_dir = f.mesh.ca_dir();
    let probe_dir = f.mesh.dir.path().join("probe-ca");
    // Our own root, so the test can sign intermediates under it.
    let r1 = TestCa::root("faults root 1")?;
    write_ca_dir(&ca_dir, &[&r1], &r1.key, None)?;
    write_ca_dir(&probe_dir, &[&r1], &r1.key, None)?;
    let _ag1 = f.mesh.start_agent(&f.n1, mode)?;
    let ag2 = f.mesh.start_agent(&f.n2, mode)?;
    let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    let b1_hbone = SocketAddr::new(f.b1.ipv4().into(), 15008);
    send_verified(&f.a1, &addr, 64 << 10, T)?;
    let chain = served_chain(&f.u1, b1_hbone, &probe_dir)?;
    ensure!(chain.len() == 1 && chains_to(&chain, &r1), "b1 should first present a leaf signed by root 1 directly");

    // 1. Rotation to a new intermediate under the same root: the mesh
    //    trusts it, so new leaves follow it, with traffic going on.
    let i1 = r1.intermediate("faults intermediate 1")?;
    write_ca_dir(&ca_dir, &[&r1], &i1.key, Some(&[&i1, &r1]))?;
    let followed = wait_until("b1's leaf to be issued by the new intermediate", Duration::from_secs(15), || {
        let chain = served_chain(&f.u1, b1_hbone, &probe_dir)?;
        Ok(chain.len() == 2 && chain[1] == i1.der() && chains_to(&chain, &r1))
    })
    .with_context(|| format!("agent log:\n{}", ag2.stderr()))?;
    send_verified(&f.a1, &addr, 1 << 20, T).context("a1 -> b1 after the rotation to intermediate 1")?;
    let (healthy, ok, errors, present) = ca_health(&f.n2)?;
    ensure!(present, "node2 should export sluice_ca_source_healthy:\n{}", metrics(&f.n2)?);
    ensure!(
        healthy == 1 && ok >= 1,
        "node2 should report its CA source healthy after the rotation ({healthy}, {ok} ok reloads)"
    );
    evidence(&format!(
        "[{mode}] ca.dir rotated to a new intermediate under the same root: b1's leaf chained through it after {} ms; \
         a1 -> b1 byte-exact; sluice_ca_source_healthy {healthy}, reloads ok {ok}, error {errors}",
        followed.as_millis()
    ));

    // 2. A new root the running agents were not started with: following it
    //    would cut every peer off, so the agent keeps signing with the CA
    //    it has and raises the alert, naming the restart it needs.
    let r2 = TestCa::root("faults root 2")?;
    let (_, _, errors_before, _) = ca_health(&f.n2)?;
    write_ca_dir(&ca_dir, &[&r2, &r1], &r2.key, None)?;
    wait_until("node2 to raise the alert for a root it does not trust", Duration::from_secs(10), || {
        let (healthy, _, errors, _) = ca_health(&f.n2)?;
        Ok(healthy == 0 && errors > errors_before)
    })?;
    let first = cert_not_after(&f.n2, "default/b1")?;
    wait_until(
        "b1's leaf to be renewed",
        Duration::from_secs(10),
        || Ok(cert_not_after(&f.n2, "default/b1")? > first),
    )?;
    let chain = served_chain(&f.u1, b1_hbone, &probe_dir)?;
    ensure!(
        chain.len() == 2 && chain[1] == i1.der() && !chains_to(&chain, &r2),
        "with a root the agents do not trust yet, b1's renewed leaf should still come from intermediate 1"
    );
    send_verified(&f.a1, &addr, 1 << 20, T).context("a1 -> b1 with an untrusted new root in ca.dir")?;
    let dump = config_dump(&f.n2)?;
    let last_error = dump["ca"]["lastError"].as_str().unwrap_or_default().to_owned();
    ensure!(last_error.contains("restart"), "config_dump ca.lastError should say a restart is needed: {}", dump["ca"]);
    evidence(&format!(
        "[{mode}] ca.dir rotated to a new root: held back (leaves still from intermediate 1, renewed), \
         sluice_ca_source_healthy 0, a1 -> b1 byte-exact; config_dump ca.lastError: {last_error}"
    ));

    // 3. Removal: the agent keeps its certificates (and renews them with
    //    the CA it holds), raises the alert, and traffic goes on.
    write_ca_dir(&ca_dir, &[&r1], &i1.key, Some(&[&i1, &r1]))?;
    wait_until("node2's CA source to be healthy again", Duration::from_secs(10), || Ok(ca_health(&f.n2)?.0 == 1))?;
    let (_, _, errors_before, _) = ca_health(&f.n2)?;
    for file in ["ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::remove_file(ca_dir.join(file))?;
    }
    let alerted = wait_until("node2 to raise the alert for the removed CA", Duration::from_secs(10), || {
        let (healthy, _, errors, _) = ca_health(&f.n2)?;
        Ok(healthy == 0 && errors > errors_before)
    })?;
    let mut renewals = Vec::new();
    let mut last = cert_not_after(&f.n2, "default/b1")?;
    while renewals.len() < 2 {
        wait_until("b1's leaf to be renewed with the CA gone", Duration::from_secs(10), || {
            Ok(cert_not_after(&f.n2, "default/b1")? > last)
        })?;
        last = cert_not_after(&f.n2, "default/b1")?;
        renewals.push(last.clone());
        send_verified(&f.a1, &addr, 256 << 10, T).context("a1 -> b1 with the CA directory gone")?;
    }
    let chain = served_chain(&f.u1, b1_hbone, &probe_dir)?;
    ensure!(chain.len() == 2 && chain[1] == i1.der(), "b1 should keep leaves of the CA it held");
    let dump = config_dump(&f.n2)?;
    let last_error = dump["ca"]["lastError"].as_str().unwrap_or_default().to_owned();
    ensure!(
        last_error.contains("root-cert.pem"),
        "config_dump ca.lastError should name the missing file: {}",
        dump["ca"]
    );
    evidence(&format!(
        "[{mode}] ca.dir emptied: alert (sluice_ca_source_healthy 0) after {} ms; b1's leaf renewed {} times since \
         ({renewals:?}) and a1 -> b1 byte-exact each time; lastError: {last_error}",
        alerted.as_millis(),
        renewals.len()
    ));

    // Back: healthy again.
    write_ca_dir(&ca_dir, &[&r1], &i1.key, Some(&[&i1, &r1]))?;
    wait_until("node2's CA source to be healthy once the files are back", Duration::from_secs(10), || {
        Ok(ca_health(&f.n2)?.0 == 1)
    })?;
    send_verified(&f.a1, &addr, 64 << 10, T)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The peer agent stops
// ---------------------------------------------------------------------------

#[test]
fn peer_agent_down_fails_fast_counted_and_pool_recovers() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        peer_down_in_mode(mode)?;
    }
    Ok(())
}

fn peer_down_in_mode(mode: &str) -> Result<()> {
    let f = fixture(&format!("peer{}", &mode[..2]))?;
    let _ag1 = f.mesh.start_agent(&f.n1, mode)?;
    let ag2 = f.mesh.start_agent(&f.n2, mode)?;
    let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    send_verified(&f.a1, &addr, 64 << 10, T)?;
    let pooled = config_dump(&f.n1)?["pool"]["connections"].as_u64().unwrap_or(0);
    ensure!(pooled >= 1, "[{mode}] node1 should pool an HBONE connection to b1 first");
    let mut inflight = Flow::start("a1->b1 in flight".into(), &f.a1, &addr, TUNNEL_BYTES, TUNNEL_RATE)?;
    wait_until("the in-flight flow to move bytes", T, || Ok(inflight.progress() > 0))?;
    let errors_before = hbone_errors(&f.n1, "outbound")?;

    let killed = Instant::now();
    drop(ag2); // SIGKILL
    let ended = exit_times(std::slice::from_ref(&inflight), killed, FAIL_FAST)?[0];
    let (name, total, report, _) = inflight.report()?;
    let ended = ended.with_context(|| format!("[{mode}] {name} should end within {FAIL_FAST:?}: {report:?}"))?;
    assert_cut(&format!("[{mode}] {name} when node2's agent died"), &report, total);

    let mut attempts = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let r = send(&f.a1, &addr, 64 << 10, Duration::from_secs(15))?;
        let took = t.elapsed();
        assert!(
            !r.ok && r.bytes_verified == 0,
            "[{mode}] attempt {i} to b1 with its agent down should get nothing: {r:?}"
        );
        let error = r.error.clone().unwrap_or_default();
        assert!(
            error.contains("reset") || error.contains("Broken pipe") || error.contains("of 65536 bytes"),
            "[{mode}] attempt {i}: expected a reset (or EOF with nothing), got: {error}"
        );
        assert!(took < Duration::from_secs(2), "[{mode}] attempt {i} should fail fast, took {took:?}: {error}");
        attempts.push(format!("{} ms ({error})", took.as_millis()));
    }
    std::thread::sleep(Duration::from_millis(200));
    let counted = grown(&errors_before, &hbone_errors(&f.n1, "outbound")?);
    let total: u64 = counted.values().sum();
    assert!(
        total >= attempts.len() as u64,
        "[{mode}] sluice_hbone_errors_total{{direction=\"outbound\"}} should count each of the {} refused attempts, moved by {counted:?}",
        attempts.len()
    );

    // The peer is back: the pool dials again.
    let spawned = Instant::now();
    let _ag2 = f.mesh.start_agent(&f.n2, mode)?;
    let ready = spawned.elapsed();
    let recovered =
        wait_until("a1 -> b1 to work again", T, || Ok(send(&f.a1, &addr, 4096, Duration::from_secs(3))?.ok))?;
    for _ in 0..3 {
        send_verified(&f.a1, &addr, 1 << 20, T).context("a1 -> b1 after node2's agent came back")?;
    }
    let pool = config_dump(&f.n1)?["pool"].clone();
    evidence(&format!(
        "[{mode}] node2's agent SIGKILLed: the in-flight a1 -> b1 ended after {} ms ({}); 3 new attempts failed in {attempts:?}; \
         counted {counted:?}; agent back (READY {} ms after spawn), a1 -> b1 byte-exact {} ms after READY; pool {pool}",
        ended.as_millis(),
        report.error.unwrap_or_default(),
        ready.as_millis(),
        recovered.as_millis()
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// Fail closed, on the wire
// ---------------------------------------------------------------------------

/// With node1's agent stopped (SIGTERM: capture stays) or killed (SIGKILL:
/// the pinned links keep it), nothing a1 sends leaves node1: tcpdump on the
/// bridge between the nodes sees not one segment from a1. A control from
/// the unenrolled u1 to the same app port shows the capture sees that port.
#[test]
fn ebpf_agent_down_nothing_leaves_in_plaintext() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("closed")?;
    let mut ag1 = Some(f.mesh.start_agent(&f.n1, "ebpf")?);
    let _ag2 = f.mesh.start_agent(&f.n2, "ebpf")?;
    let (_b4, b4) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    let (_b6, b6) = echo_server(&f.b1, &format!("[{}]:8080", f.b1.ipv6()), &[])?;
    let (_u4, u4) = echo_server(&f.u2, &format!("{}:8080", f.u2.ipv4()), &[])?;
    send_verified(&f.a1, &b4, 64 << 10, T)?;

    for how in ["SIGTERM", "SIGKILL"] {
        let agent = ag1.take().context("node1's agent")?;
        match how {
            "SIGTERM" => {
                agent.stop()?;
            }
            _ => drop(agent),
        }
        let file = f.mesh.dir.path().join(format!("closed-{how}.pcap"));
        let cap = Capture::start(&f.topo.lan_netns(), f.topo.bridge(), &file)?;
        let mut refused = Vec::new();
        for (what, addr) in
            [("a1 -> b1:8080 (IPv4)", &b4), ("a1 -> b1:8080 (IPv6)", &b6), ("a1 -> u2:8080 (not enrolled)", &u4)]
        {
            let t = Instant::now();
            let r = send(&f.a1, addr, 64 << 10, Duration::from_secs(5))?;
            let took = t.elapsed();
            assert!(
                !r.ok && r.bytes_verified == 0,
                "[ebpf, agent {how}] {what} should be refused with no agent running, got {r:?}"
            );
            assert!(
                took < Duration::from_secs(2),
                "[ebpf, agent {how}] {what} should be refused at once, took {took:?}"
            );
            refused.push(format!("{what}: {} ms, {}", took.as_millis(), r.error.unwrap_or_default()));
        }
        // Control: the capture sees segments to b1's app port when some are sent.
        send_verified(&f.u1, &b4, 64 << 10, T).context("control u1 -> b1")?;
        let (pcap, stats) = cap.stop_with_stats()?;
        ensure!(stats.complete(), "tcpdump lost packets: {stats:?}");
        let segments = Pcap::parse(&pcap)?.segments;
        let a1: [IpAddr; 2] = [f.a1.ipv4().into(), f.a1.ipv6().into()];
        let from_a1: Vec<_> =
            segments.iter().filter(|s| a1.contains(&s.src.ip()) || a1.contains(&s.dst.ip())).collect();
        let to_app: Vec<_> = segments.iter().filter(|s| s.dst.port() == 8080 && !a1.contains(&s.src.ip())).collect();
        assert!(
            from_a1.is_empty(),
            "[ebpf, agent {how}] no segment of a1's should cross between the nodes with its agent down, saw {from_a1:?}"
        );
        assert!(
            to_app.iter().any(|s| s.src.ip() == IpAddr::from(f.u1.ipv4())),
            "[ebpf, agent {how}] control: the capture should show u1's segments to b1:8080"
        );
        evidence(&format!(
            "[ebpf] node1's agent stopped by {how}: {}; tcpdump between the nodes: {} segments, 0 to or from a1, {} of the \
             control u1 -> b1:8080",
            refused.join("; "),
            segments.len(),
            to_app.len()
        ));
        ag1 = Some(f.mesh.start_agent(&f.n1, "ebpf")?);
        send_verified(&f.a1, &b4, 64 << 10, T).context("a1 -> b1 once node1's agent is back")?;
    }
    Ok(())
}

/// The other half of failing closed: with the destination's agent down, a
/// plaintext client (not enrolled) must not reach an enrolled pod's app
/// around 15006 and its policy. iptables mode: the REDIRECT to 15006 stays,
/// nobody listens, refused. eBPF mode: tc finds no listener to assign the
/// SYN to and drops it (`tc_no_agent_dropped`).
#[test]
fn agent_down_plaintext_inbound_never_reaches_the_app() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let mut f = fixture(&format!("inbound{}", &mode[..2]))?;
        // Only mTLS clients may reach default's pods.
        f.mesh.policies_yaml = "  - name: mtls-only\n    namespace: default\n    action: ALLOW\n    rules:\n      - from: [{ principals: [\"*\"] }]\n".into();
        f.mesh.write_config()?;
        let _ag1 = f.mesh.start_agent(&f.n1, mode)?;
        let ag2 = f.mesh.start_agent(&f.n2, mode)?;
        let (mut srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &["--print-peer"])?;
        send_verified(&f.a1, &addr, 4096, T).context("a1 -> b1 over mTLS")?;
        let r = send(&f.u2, &addr, 4096, Duration::from_secs(5))?;
        ensure!(!r.ok && r.bytes_verified == 0, "[{mode}] with node2's agent up, the policy should refuse u2: {r:?}");
        while let Ok(Some(_)) = srv.next_line(Duration::from_millis(300)) {}
        let seen = srv.lines_seen().len();
        drop(ag2); // SIGKILL
        let mut outcomes = Vec::new();
        for (who, pod) in [("u1 (node1)", &f.u1), ("u2 (node2)", &f.u2)] {
            let r = send(pod, &addr, 4096, Duration::from_secs(5))?;
            assert!(
                !r.ok && r.bytes_verified == 0,
                "[{mode}] with node2's agent down, plaintext {who} -> b1:8080 should be refused, got {r:?}"
            );
            outcomes.push(format!("{who}: {}", r.error.unwrap_or_default()));
        }
        while let Ok(Some(_)) = srv.next_line(Duration::from_millis(300)) {}
        let reached = &srv.lines_seen()[seen..];
        assert!(
            reached.is_empty(),
            "[{mode}] no plaintext client should reach b1's app with its agent down: {reached:?}"
        );
        evidence(&format!("[{mode}] node2's agent down: {}; b1's app saw nobody", outcomes.join("; ")));
    }
    Ok(())
}
