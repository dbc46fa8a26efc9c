//! An agent upgrade the way the DaemonSet does it (`maxSurge: 1,
//! maxUnavailable: 0`): the new agent starts beside the old one on the same
//! node, with the same `--cni-socket` and `--keeper`, and takes the socket
//! over; then the old one gets SIGTERM, as kubelet sends it. Against the
//! fake API server, with Debian's reference `bridge` + `host-local` and then
//! `sluice-cni` run as a runtime runs a conflist (tests/src/cni_chain.rs).
//!
//! ```text
//!   node1: a1 --(same node, paced 1 MiB/s)--> a2:8080      agent 1, then agent 2 beside it, then agent 2 alone
//!          "surge" pod: ADD through the chain while both agents run
//!          "after" pod: ADD through the chain once agent 1 has exited
//!   node2: c2 --HBONE--> surge:8080, after:8080
//! ```
//!
//! The same-node flow is paced so that it is provably in flight across the
//! whole handover: its progress is sampled every 100 ms and must grow while
//! both agents run and after the old one is gone (eBPF: the kernel splices
//! it and the keeper holds the old agent's sockets; iptables: the old agent
//! carries it through its drain, which is what iptables mode can promise).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use sluice_tests::{
    capture::WireReport,
    cni_chain::{
        bridge_conflist, capture_state, plugin_dirs, result_ipv4, sluice_plugin, wait_enrolled, wait_for,
        wait_known_as_hbone, Attachment, Chain,
    },
    evidence,
    fake_api::objects,
    kernel_counters,
    kube_mesh::{config_dump, pod_object, KubeMesh, Wire},
    peer_bin, require_root, spawn_in,
    traffic::{echo_server, send_verified},
    Agent, ChildGuard, CniPod, Node, Pod, SendReport, Topology,
};

const T: Duration = Duration::from_secs(60);
const NS: &str = "shop";
/// The same-node flow's pace, bytes per second.
const RATE: u64 = 1 << 20;
/// The agent's default `--drain-secs` (the DaemonSet does not change it).
const DRAIN: Duration = Duration::from_secs(10);

/// The two modes share the machine's two cores with everything else: one
/// at a time, so the paced flow's timeline is the test's, not the load's.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fixture {
    topo: Topology,
    n1: Node,
    n2: Node,
    kube: KubeMesh,
    data_dir: tempfile::TempDir,
    /// `--cni-socket` of both node1 agents, and the plugin's `agentSocket`.
    socket: PathBuf,
    /// `--keeper` of both node1 agents.
    keeper: PathBuf,
    chain: Chain,
    a1: Pod,
    a2: Pod,
    c2: Pod,
    _keeper: ChildGuard,
    _pauses: Vec<ChildGuard>,
}

fn fixture(mode: &str) -> Result<Fixture> {
    let topo = Topology::new(&format!("cniup{}", &mode[..1]))?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let (a1, a2) = (n1.add_pod("a1")?, n1.add_pod("a2")?);
    let c2 = n2.add_pod("c2")?;
    let kube = KubeMesh::new(&topo, "cluster.local", "istio-system")?;
    kube.api.apply(objects::namespace(NS, &[("istio.io/dataplane-mode", "ambient")]))?;
    kube.api.apply(pod_object(&a1, NS, "sleep", &[("app", "sleep")]))?;
    kube.api.apply(pod_object(&a2, NS, "httpbin", &[("app", "httpbin")]))?;
    kube.api.apply(pod_object(&c2, NS, "sleep", &[("app", "sleep")]))?;
    // Running pods: the agents find them (and their netns) through these.
    let pauses = vec![a1.start_pause()?, a2.start_pause()?, c2.start_pause()?];
    let data_dir = tempfile::tempdir()?;
    let socket = data_dir.path().join("cni.sock");
    let keeper = data_dir.path().join("keeper.sock");
    // The DaemonSet pod's second container.
    let mut keep = Command::new(sluice_tests::agent_bin());
    keep.args(["keeper", "--socket"]).arg(&keeper);
    let mut keeper_proc = spawn_in(&n1, keep)?;
    keeper_proc.wait_for_line("READY", Duration::from_secs(10))?;
    let conflist = bridge_conflist(
        "k8s-pod-network",
        "10.10.1.128/25",
        ("10.10.1.130", "10.10.1.250"),
        "10.10.1.129",
        &data_dir.path().join("ipam"),
        vec![sluice_plugin(&socket, true, &data_dir.path().join("sluice-cni.log"))],
    );
    let chain = Chain { conflist, cni_path: plugin_dirs()?, netns: n1.netns_name().to_owned() };
    Ok(Fixture {
        topo,
        n1,
        n2,
        kube,
        data_dir,
        socket,
        keeper,
        chain,
        a1,
        a2,
        c2,
        _keeper: keeper_proc,
        _pauses: pauses,
    })
}

impl Fixture {
    /// A node1 agent as the DaemonSet runs it: the node's CNI socket and
    /// keeper, the default drain.
    fn node1_agent(&self, mode: &str) -> Result<Agent> {
        let socket = self.socket.to_str().context("socket path")?;
        let keeper = self.keeper.to_str().context("keeper path")?;
        self.kube.start_agent(&self.n1, mode, &["--cni-socket", socket, "--keeper", keeper])
    }

    fn plugin_log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("sluice-cni.log")).unwrap_or_default()
    }

    /// A pod the way kubelet brings it up: its object in the API (scheduled,
    /// Pending, no address yet), then ADD through the chain. Returns the pod,
    /// its address from host-local and how long ADD took.
    fn add_through_cni(&self, name: &str) -> Result<(CniPod, std::net::Ipv4Addr, Duration)> {
        let pod = self.n1.add_cni_pod(name)?;
        let mut obj = objects::pod(NS, pod.name(), pod.uid(), pod.node_name(), "web", &[], &[("app", name)]);
        obj["status"] = json!({"phase": "Pending"});
        self.kube.api.apply(obj)?;
        let t = Instant::now();
        let result = self
            .chain
            .add(&Attachment::kubelet(&pod, NS, &[]))
            .map_err(|e| anyhow::anyhow!("ADD {name}: {e}\nplugin log:\n{}", self.plugin_log()))?;
        let took = t.elapsed();
        Ok((pod, result_ipv4(&result)?, took))
    }

    /// What kubelet does once the runtime is done: the pod's address in
    /// its status, so other nodes' agents learn it is meshed.
    fn report_address(&self, pod: &CniPod, ip: std::net::Ipv4Addr) -> Result<()> {
        let name = pod.name();
        self.kube.api.apply(objects::pod(
            NS,
            name,
            pod.uid(),
            pod.node_name(),
            "web",
            &[ip.into()],
            &[("app", name)],
        ))?;
        Ok(())
    }
}

/// Captured, with nothing running in the pod yet.
fn ensure_captured_before_start(pod: &CniPod, mode: &str, when: &str) -> Result<()> {
    ensure!(sluice_tests::cgroup::procs(&pod.cgroup_path())?.is_empty(), "nothing runs in {} yet", pod.name());
    let (listeners, rules) = capture_state(pod, mode)?;
    ensure!(listeners && rules, "[{mode}] {} captured {when}: listeners {listeners}, rules {rules}", pod.name());
    Ok(())
}

/// A paced `sluice-peer send` with its progress, each sample stamped when
/// the test read it.
struct Flow {
    started: Instant,
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    done: Option<std::thread::JoinHandle<Result<SendReport>>>,
}

impl Flow {
    fn start(from: &Pod, addr: &str, total: u64) -> Result<Flow> {
        let mut cmd = Command::new(peer_bin());
        cmd.args(["send", "--connect", addr, "--bytes", &total.to_string(), "--rate", &RATE.to_string()]).args([
            "--progress-ms",
            "100",
            "--timeout-secs",
            "150",
        ]);
        let mut child = spawn_in(from, cmd)?;
        let started = Instant::now();
        let samples: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
        let sink = samples.clone();
        let done = std::thread::spawn(move || -> Result<SendReport> {
            let mut report = None;
            while let Some(line) = child.next_line(Duration::from_secs(160))? {
                if let Some(rest) = line.strip_prefix("PROGRESS ") {
                    if let Some(verified) = rest.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), verified));
                    }
                } else if line.starts_with('{') {
                    let r: SendReport = serde_json::from_str(&line).with_context(|| format!("report {line}"))?;
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), r.bytes_verified));
                    report = Some(r);
                }
            }
            let out = child.finish(Duration::from_secs(10))?;
            report.with_context(|| format!("sluice-peer printed no report: {}", String::from_utf8_lossy(&out.stderr)))
        });
        Ok(Flow { started, samples, done: Some(done) })
    }

    /// Bytes verified by `t` (the last sample read at or before it).
    fn at(&self, t: Instant) -> u64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().take_while(|(at, _)| *at <= t).last().map_or(0, |s| s.1)
    }

    /// When the last sample was read: the report line, once the flow is over.
    fn ended_at(&self) -> Option<Instant> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).last().map(|s| s.0)
    }

    fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    fn running(&self) -> bool {
        self.done.as_ref().is_some_and(|d| !d.is_finished())
    }

    /// The final report, once the transfer is over.
    fn finish(&mut self) -> Result<SendReport> {
        let done = self.done.take().context("finished once")?;
        done.join().map_err(|_| anyhow::anyhow!("flow thread panicked"))?
    }

    fn wait_verified(&self, bytes: u64) -> Result<()> {
        wait_for(&format!("the flow to reach {bytes} bytes"), T, || Ok(self.now() >= bytes))
    }
}

fn counter(pins: &std::path::Path, name: &str) -> Result<u64> {
    Ok(kernel_counters(pins)?[name].as_u64().unwrap_or(0))
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn upgrade_through_the_daemonset_path(mode: &str) -> Result<()> {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ebpf = mode == "ebpf";
    let f = fixture(mode)?;
    let ag1 = f.node1_agent(mode)?;
    let _ag_n2 = f.kube.start_agent(&f.n2, mode, &[])?;
    let pins = ag1.pin_root.clone();
    wait_enrolled(&f.n1, &[f.a1.uid(), f.a2.uid()], T)?;
    wait_enrolled(&f.n2, &[f.c2.uid()], T)?;

    // The flow: eBPF, long enough to outlive the old agent's drain by far;
    // iptables, long enough to be in flight at SIGTERM and short enough to
    // finish within the old agent's drain.
    let total = if ebpf { 45 * RATE } else { 11 * RATE };
    let (_srv, addr) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &[])?;
    let (switched0, spliced0) =
        if ebpf { (counter(&pins, "splice_switched")?, counter(&pins, "spliced_bytes")?) } else { (0, 0) };
    let mut flow = Flow::start(&f.a1, &addr, total)?;
    flow.wait_verified(256 << 10)?;
    if ebpf {
        // Both directions in the kernel before anything changes.
        wait_for("the kernel to take both directions of the flow over", T, || {
            Ok(counter(&pins, "splice_switched")? >= switched0 + 2)
        })?;
    }
    let spliced = |pins: &std::path::Path| -> Result<u64> {
        if ebpf {
            counter(pins, "spliced_bytes")
        } else {
            Ok(0)
        }
    };

    // The surge: agent 2 beside agent 1, same socket, same keeper, same pins.
    let t_surge = Instant::now();
    let ag2 = f.node1_agent(mode)?;
    let t_ready2 = Instant::now();
    let spliced_ready2 = spliced(&pins)?;
    ensure!(flow.running(), "the flow ended before agent 2 was ready; it proves nothing");

    // A pod created during the overlap is captured through the new agent.
    let (surge, surge_ip, surge_add) = f.add_through_cni("surge")?;
    ensure_captured_before_start(&surge, mode, "when ADD returned, during the overlap")?;
    ensure!(
        std::path::Path::new(&format!("/proc/{}", ag1.pid())).exists(),
        "agent 1 still runs while the overlap's ADD is answered"
    );
    let answered_by_2 = |uid: &str| ag2.stderr().lines().any(|l| l.contains("CNI request done") && l.contains(uid));
    ensure!(answered_by_2(surge.uid()), "agent 2 (the socket's new owner) answered the ADD:\n{}", ag2.stderr());

    // Kubelet stops the old pod: SIGTERM, then it drains.
    if !ebpf {
        // In flight at SIGTERM for a while, then done within the drain.
        let at = flow.started + Duration::from_secs(4);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
    ensure!(flow.running(), "the flow ended before agent 1 was stopped; it proves nothing");
    if !ebpf {
        let left = Duration::from_secs(total / RATE).saturating_sub(flow.started.elapsed());
        ensure!(left + Duration::from_secs(2) < DRAIN, "the flow ({left:?} left) cannot end within agent 1's drain");
    }
    let t_term = Instant::now();
    let spliced_term = spliced(&pins)?;
    let log1 = ag1.stop()?;
    let t_gone = Instant::now();
    ensure!(log1.contains("shutting down"), "agent 1 shut down on SIGTERM:\n{log1}");
    if ebpf {
        ensure!(
            ag2.stderr().contains("adopted a spliced connection"),
            "agent 2 adopted the spliced flow from the keeper:\n{}",
            ag2.stderr()
        );
        // Still moving with the old agent gone.
        let gone = flow.at(t_gone);
        let moved = wait_for("the flow to move on after agent 1 exited", Duration::from_secs(15), || {
            Ok(flow.now() >= gone + RATE || !flow.running())
        });
        if moved.is_err() || !flow.running() {
            let report = if flow.running() { None } else { Some(flow.finish()) };
            anyhow::bail!(
                "[{mode}] the spliced flow did not outlive agent 1 (SIGTERM, drain, exit): {} bytes verified at \
                 SIGTERM, {gone} when agent 1 had exited, {} now; the client's report: {report:?}; kernel \
                 counters {}\nagent 1:\n{log1}\nagent 2:\n{}",
                flow.at(t_term),
                flow.now(),
                kernel_counters(&pins).map(|c| c.to_string()).unwrap_or_default(),
                ag2.stderr()
            );
        }
    }
    let spliced_gone = spliced(&pins)?;

    // A pod created once the old agent is gone.
    let (after, after_ip, after_add) = f.add_through_cni("after")?;
    ensure_captured_before_start(&after, mode, "when ADD returned, with agent 2 alone")?;
    ensure!(answered_by_2(after.uid()), "agent 2 answered the second ADD:\n{}", ag2.stderr());
    // What agent 2 did during the overlap outlived agent 1's shutdown.
    let (listeners, rules) = capture_state(&surge, mode)?;
    ensure!(listeners && rules, "[{mode}] surge still captured after agent 1 exited: {listeners} {rules}");
    evidence(&format!(
        "[{mode}] CNI ADD through bridge+host-local+sluice-cni: {surge_ip} during the overlap in {surge_add:?}, \
         {after_ip} after agent 1 exited in {after_add:?}; both captured (listeners + {mode}) before any process ran, \
         both answered by agent 2 on the taken-over socket"
    ));

    // Both enrolled in agent 2's view (the only agent on node1 now).
    let dump = config_dump(&f.n1)?;
    for pod in [&surge, &after] {
        ensure!(
            dump["pods"].as_array().into_iter().flatten().any(|p| p["uid"] == pod.uid()),
            "agent 2 lists {} as enrolled: {}",
            pod.name(),
            dump["pods"]
        );
    }

    // A meshed client on node2 reaches each new pod over HBONE only.
    f.report_address(&surge, surge_ip)?;
    f.report_address(&after, after_ip)?;
    wait_known_as_hbone(&f.n2, surge.uid(), T)?;
    wait_known_as_hbone(&f.n2, after.uid(), T)?;
    let (_s1, surge_addr) = echo_server(&surge, &format!("{surge_ip}:8080"), &[])?;
    let (_s2, after_addr) = echo_server(&after, &format!("{after_ip}:8080"), &[])?;
    let wire = Wire::start(&f.topo, &f.data_dir.path().join("wire.pcap"))?;
    send_verified(&f.c2, &surge_addr, 1 << 20, T).context("c2 -> surge")?;
    send_verified(&f.c2, &after_addr, 1 << 20, T).context("c2 -> after")?;
    let (segments, _) = wire.stop()?;
    let hbone_to = |ip: std::net::Ipv4Addr| {
        segments
            .iter()
            .any(|s| s.dst.ip() == std::net::IpAddr::V4(ip) && s.dst.port() == 15008 && !s.payload.is_empty())
    };
    let report = WireReport::from_segments(segments.clone());
    ensure!(
        report.non_hbone_segments == 0 && report.tls13_streams > 0,
        "[{mode}] only HBONE on the wire: {}",
        report.summary()
    );
    ensure!(hbone_to(surge_ip) && hbone_to(after_ip), "HBONE to both new pods: {}", report.summary());
    evidence(&format!("[{mode}] node2 -> surge, after: 1 MiB each echoed byte-exact; wire: {}", report.summary()));

    // The flow ends byte-exact.
    let done = flow.finish()?;
    let t_end = Instant::now();
    ensure!(done.ok && done.bytes_verified == total, "[{mode}] the flow across the handover: {done:?}");
    let spliced_end = spliced(&pins)?;
    let (surge_v, term_v, gone_v) = (flow.at(t_surge), flow.at(t_term), flow.at(t_gone));
    let (ready2_v,) = (flow.at(t_ready2),);
    ensure!(term_v > ready2_v, "[{mode}] bytes arrived while both agents ran ({ready2_v} -> {term_v})");
    if ebpf {
        ensure!(total > gone_v, "[{mode}] bytes arrived after agent 1 exited ({gone_v} of {total} by then)");
    } else {
        ensure!(gone_v > term_v, "[{mode}] bytes arrived during agent 1's drain ({term_v} -> {gone_v})");
    }
    // The flow's own end: its last sample (the report line).
    let t_end = flow.ended_at().unwrap_or(t_end);
    let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
    let ending = if ebpf {
        format!(
            "agent 1 exited {:.1} s after SIGTERM (its drain); {:.1} MiB arrived after that, over {:.1} s",
            secs(t_term, t_gone),
            mib(total - gone_v),
            secs(t_gone, t_end)
        )
    } else {
        format!(
            "the flow ended {:.1} s after SIGTERM, within agent 1's drain, and agent 1 exited {:.1} s after SIGTERM",
            secs(t_term, t_end),
            secs(t_term, t_gone)
        )
    };
    evidence(&format!(
        "[{mode}] same-node flow a1 -> a2 paced at {} MiB/s, {} MiB echoed byte-exact in {} ms: {:.1} MiB before \
         the surge; {:.1} MiB while agent 2 started ({:.1} s); {:.1} MiB while both agents ran ({:.1} s, incl. the \
         ADD); {:.1} MiB after SIGTERM to agent 1 until it exited; {ending}",
        mib(RATE),
        mib(total),
        done.elapsed_ms,
        mib(surge_v),
        mib(ready2_v - surge_v),
        secs(t_surge, t_ready2),
        mib(term_v - ready2_v),
        secs(t_ready2, t_term),
        mib(gone_v - term_v),
    ));
    if ebpf {
        evidence(&format!(
            "[{mode}] kernel spliced_bytes (both directions, pinned counters): {:.1} MiB before agent 2, {:.1} MiB \
             while both ran, {:.1} MiB during agent 1's drain, {:.1} MiB after agent 1 exited",
            mib(spliced_ready2 - spliced0),
            mib(spliced_term - spliced_ready2),
            mib(spliced_gone - spliced_term),
            mib(spliced_end - spliced_gone),
        ));
    }
    ag2.stop()?;
    Ok(())
}

#[test]
fn cni_upgrade_beside_the_old_agent_ebpf() -> Result<()> {
    require_root!(Ok(()));
    upgrade_through_the_daemonset_path("ebpf")
}

#[test]
fn cni_upgrade_beside_the_old_agent_iptables() -> Result<()> {
    require_root!(Ok(()));
    upgrade_through_the_daemonset_path("iptables")
}
