//! The CNI chain end to end, in both capture modes: Debian's reference
//! `bridge` plugin (IPAM `host-local`) and then `sluice-cni`, run exactly as
//! a container runtime runs a conflist (tests/src/cni_chain.rs), against real
//! `sluice run --kubeconfig` agents and the fake API server.
//!
//! ```text
//!   node1: cni0 10.10.1.129/25 (bridge)  <- pod "web", set up by the chain, in ns "shop" (ambient)
//!   node2: c2 (harness pod, enrolled, sa sleep)  --HBONE-->  web:8080
//! ```
//!
//! The pod's object is in the API before ADD, without addresses (kubelet
//! reports them only after the runtime is done): the agent takes them from
//! the chain's prevResult. Capture must be in place when ADD returns,
//! before any process runs in the pod.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{
    capture::{Capture, WireReport},
    cni_chain::{bridge_conflist, capture_state, result_ipv4, wait_enrolled, wait_known_as_hbone, Attachment, Chain},
    evidence,
    fake_api::objects,
    kube_mesh::{config_dump, pod_object, KubeMesh},
    peer::target_bin,
    require_root,
    traffic::{echo_server, send_verified},
    Agent, CniPod, Node, Topology,
};

const T: Duration = Duration::from_secs(60);
const NS: &str = "shop";

struct Fixture {
    topo: Topology,
    n1: Node,
    n2: Node,
    kube: KubeMesh,
    data_dir: tempfile::TempDir,
    cni_path: Vec<PathBuf>,
    socket: PathBuf,
    _pause: sluice_tests::process::ChildGuard,
}

fn fixture(mode: &str) -> Result<(Fixture, Agent, Agent, sluice_tests::Pod)> {
    let topo = Topology::new(&format!("cni{}", &mode[..1]))?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let c2 = n2.add_pod("c2")?;
    let kube = KubeMesh::new(&topo, "cluster.local", "istio-system")?;
    kube.api.apply(objects::namespace(NS, &[("istio.io/dataplane-mode", "ambient")]))?;
    kube.api.apply(pod_object(&c2, NS, "sleep", &[("app", "sleep")]))?;
    // Kept in the fixture: dropping the guard kills it, and the agent
    // finds a running pod's netns through its processes.
    let pause = c2.start_pause()?;
    let data_dir = tempfile::tempdir()?;
    let socket = data_dir.path().join("cni-node1.sock");
    let plugin = target_bin("sluice-cni", "SLUICE_CNI_BIN");
    let cni_path = vec![PathBuf::from("/usr/lib/cni"), plugin.parent().context("plugin dir")?.to_path_buf()];
    let ag1 = kube.start_agent(&n1, mode, &["--cni-socket", socket.to_str().context("socket")?])?;
    let ag2 = kube.start_agent(&n2, mode, &[])?;
    Ok((Fixture { topo, n1, n2, kube, data_dir, cni_path, socket, _pause: pause }, ag1, ag2, c2))
}

impl Fixture {
    fn chain(&self, fail_closed: bool, socket: &std::path::Path) -> Chain {
        let sluice = json!({
            "type": "sluice-cni",
            "agentSocket": socket,
            "failClosed": fail_closed,
            "excludeNamespaces": ["kube-system", "sluice-system"],
            "logFile": self.data_dir.path().join("sluice-cni.log"),
        });
        let conflist = bridge_conflist(
            "k8s-pod-network",
            "10.10.1.128/25",
            ("10.10.1.130", "10.10.1.250"),
            "10.10.1.129",
            &self.data_dir.path().join("ipam"),
            vec![sluice],
        );
        Chain { conflist, cni_path: self.cni_path.clone(), netns: self.n1.netns_name().to_owned() }
    }

    fn attachment(&self, pod: &CniPod, ns: &str) -> Attachment {
        Attachment {
            container_id: format!("c0ffee{}", &pod.uid()[..8]),
            netns: pod.netns_path(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), ns.into()),
                ("K8S_POD_NAME".into(), pod.name().into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), format!("c0ffee{}", &pod.uid()[..8])),
                ("K8S_POD_UID".into(), pod.uid().into()),
            ],
        }
    }

    /// The pod's object as the API has it while the runtime sets it up:
    /// scheduled, Pending, no addresses yet.
    fn pending_pod(&self, pod: &CniPod, ns: &str, labels: &[(&str, &str)]) -> Value {
        let mut obj = objects::pod(ns, pod.name(), pod.uid(), pod.node_name(), "web", &[], labels);
        obj["status"] = json!({"phase": "Pending"});
        obj
    }
}

fn plugin_log(f: &Fixture) -> String {
    std::fs::read_to_string(f.data_dir.path().join("sluice-cni.log")).unwrap_or_default()
}

fn captured_from_the_first_packet(mode: &str) -> Result<()> {
    let (f, _ag1, _ag2, c2) = fixture(mode)?;
    let web = f.n1.add_cni_pod("web")?;
    f.kube.api.apply(f.pending_pod(&web, NS, &[("app", "web")]))?;
    let chain = f.chain(true, &f.socket);
    let att = f.attachment(&web, NS);

    let t = Instant::now();
    let result = chain.add(&att).map_err(|e| anyhow::anyhow!("ADD: {e}\nplugin log:\n{}", plugin_log(&f)))?;
    let add_time = t.elapsed();
    let ip = result_ipv4(&result)?;
    ensure!(ip.octets()[..3] == [10, 10, 1] && ip.octets()[3] >= 130, "the pod's address is host-local's: {ip}");
    let addr = web.exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    ensure!(addr.contains(&format!("{ip}/25")), "eth0 in the pod holds {ip}: {addr}");
    // No process has run in the pod yet: whatever it sends first is captured.
    ensure!(sluice_tests::cgroup::procs(&web.cgroup_path())?.is_empty(), "nothing runs in the pod yet");
    let (listeners, rules) = capture_state(&web, mode)?;
    ensure!(listeners && rules, "[{mode}] capture in place when ADD returns: listeners {listeners}, rules {rules}");
    evidence(&format!(
        "[{mode}] CNI ADD {ip} took {add_time:?}; listeners and {mode} capture in place before the app starts"
    ));

    // The kubelet reports the sandbox's address once the runtime is done;
    // only then can other nodes' agents know the pod is meshed.
    f.kube.api.apply(objects::pod(
        NS,
        web.name(),
        web.uid(),
        web.node_name(),
        "web",
        &[ip.into()],
        &[("app", "web")],
    ))?;
    wait_known_as_hbone(&f.n2, web.uid(), T)?;
    wait_enrolled(&f.n2, &[c2.uid()], T)?;

    // The app starts; a meshed client on the other node reaches it through HBONE only.
    let (_srv, server) = echo_server(&web, &format!("{ip}:8080"), &[])?;
    let file = f.data_dir.path().join("wire.pcap");
    let cap = Capture::start(&f.topo.lan_netns(), f.n1.lan_veth(), &file)?;
    let sent = send_verified(&c2, &server, 1 << 20, T)?;
    let (pcap, _) = cap.stop_with_stats()?;
    let wire = WireReport::from_pcap(&pcap)?;
    ensure!(sent.bytes_verified == 1 << 20, "1 MiB echoed byte-exact: {sent:?}");
    ensure!(
        wire.non_hbone_segments == 0 && wire.tls13_streams > 0,
        "[{mode}] only HBONE on the wire: {}",
        wire.summary()
    );
    let dump = config_dump(&f.n1)?;
    let enrolled = dump["pods"].as_array().into_iter().flatten().any(|p| p["uid"] == web.uid());
    ensure!(enrolled, "node1's agent lists the pod as enrolled: {}", dump["pods"]);

    chain.check(&att, &result).map_err(|e| anyhow::anyhow!("CHECK: {e}"))?;

    chain.del(&att, Some(&result)).map_err(|e| anyhow::anyhow!("DEL: {e}"))?;
    let (listeners, rules) = capture_state(&web, mode)?;
    ensure!(
        !listeners && !rules,
        "[{mode}] nothing of the pod's capture left after DEL: listeners {listeners}, rules {rules}"
    );
    let links = web.exec_ok(&["ip", "-o", "link", "show"])?;
    ensure!(!links.contains("eth0"), "the bridge plugin removed eth0: {links}");
    let leases = std::fs::read_dir(f.data_dir.path().join("ipam/k8s-pod-network"))
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("10.")).count())
        .unwrap_or(0);
    ensure!(leases == 0, "host-local released the address ({leases} leases left)");
    // DEL again, as runtimes do: idempotent.
    chain.del(&att, None).map_err(|e| anyhow::anyhow!("second DEL: {e}"))?;
    let log = plugin_log(&f);
    ensure!(log.contains(web.uid()) || log.contains("web"), "the plugin log names the pod:\n{log}");
    Ok(())
}

fn agent_down_fails_closed_or_passes(mode: &str) -> Result<()> {
    let (f, _ag1, _ag2, _c2) = fixture(mode)?;
    let nobody = f.data_dir.path().join("no-agent.sock");

    let a = f.n1.add_cni_pod("closed")?;
    f.kube.api.apply(f.pending_pod(&a, NS, &[]))?;
    let err = match f.chain(true, &nobody).add(&f.attachment(&a, NS)) {
        Ok(r) => bail!("failClosed with no agent must fail ADD; got {r}"),
        Err(e) => e,
    };
    ensure!(err.plugin == "sluice-cni" && err.code == Some(11), "code 11 from sluice-cni: {err}");
    ensure!(err.msg.contains("no-agent.sock"), "the message names the socket: {err}");
    let _ = f.chain(true, &nobody).del(&f.attachment(&a, NS), None);

    let b = f.n1.add_cni_pod("open")?;
    f.kube.api.apply(f.pending_pod(&b, NS, &[]))?;
    let r = f.chain(false, &nobody).add(&f.attachment(&b, NS)).map_err(|e| anyhow::anyhow!("failClosed false: {e}"))?;
    result_ipv4(&r).context("prevResult passed through")?;
    ensure!(plugin_log(&f).to_lowercase().contains("not meshed"), "logged as not meshed:\n{}", plugin_log(&f));
    let _ = f.chain(false, &nobody).del(&f.attachment(&b, NS), Some(&r));

    let c = f.n1.add_cni_pod("kubesys")?;
    let r =
        f.chain(true, &nobody).add(&f.attachment(&c, "kube-system")).map_err(|e| anyhow::anyhow!("excluded: {e}"))?;
    result_ipv4(&r).context("excluded namespace passes")?;
    let _ = f.chain(true, &nobody).del(&f.attachment(&c, "kube-system"), Some(&r));
    evidence(&format!("[{mode}] agent down: failClosed -> code 11 naming the socket; open -> passed and logged; kube-system -> passed"));
    Ok(())
}

#[test]
fn cni_chain_captures_from_the_first_packet_iptables() -> Result<()> {
    require_root!(Ok(()));
    captured_from_the_first_packet("iptables")
}

#[test]
fn cni_chain_captures_from_the_first_packet_ebpf() -> Result<()> {
    require_root!(Ok(()));
    captured_from_the_first_packet("ebpf")
}

#[test]
fn cni_chain_with_the_agent_down_iptables() -> Result<()> {
    require_root!(Ok(()));
    agent_down_fails_closed_or_passes("iptables")
}

#[test]
fn cni_chain_with_the_agent_down_ebpf() -> Result<()> {
    require_root!(Ok(()));
    agent_down_fails_closed_or_passes("ebpf")
}
