//! A mesh discovered from Kubernetes: the fake API server
//! ([`crate::fake_api`]) listening inside a topology's lan netns, where every
//! node's agent reaches it and nothing outside the topology can, a
//! kubeconfig pointing at it, a config file holding only `trustDomain`, `ca`
//! and `rootNamespace`, and real `sluice run --kubeconfig` agents.
//!
//! ```text
//!   netns <prefix>-lan:  br0 192.168.10.254/24   <- the fake API server
//!                         │
//!   netns <prefix>-nodeN: eth0 192.168.10.N/24   <- sluice run --kubeconfig
//! ```
//!
//! Also here: Pod objects built from harness pods (UID, node, addresses),
//! a capture on the wire that can be read while it runs, and Istio's TCP
//! metric and label names.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::{
    capture::{Capture, CaptureStats, Pcap, Segment},
    fake_api::{objects, FakeApiServer},
    mesh::{http_get, Mesh},
    netns::{exec_in_ok, listen_in},
    peer_bin, Agent, Node, PinDir, Pod, SendReport, Topology,
};

/// Istio's standard TCP metrics, as ztunnel exports them: every
/// `istio_tcp_*` family an agent emits must be one of these, with all of
/// [`ISTIO_TCP_LABELS`].
pub const ISTIO_TCP_METRICS: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
];

/// Istio's standard TCP metric labels, as ztunnel writes them.
pub const ISTIO_TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The fake API server's address on the lan bridge: inside the nodes'
/// /24, above every node index the topology hands out.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 254);

/// The fake API server, the CA and the agents' files for one topology.
/// Field order is drop order: the agents' pin dirs, then the server, then
/// the temp dir.
pub struct KubeMesh {
    pins: Mutex<Vec<PinDir>>,
    pub api: FakeApiServer,
    /// CA and temp dir (its workload list is unused: the API is the source).
    pub mesh: Mesh,
    pub kubeconfig: PathBuf,
    pub config: PathBuf,
    prefix: String,
}

impl KubeMesh {
    /// Gives the lan bridge [`API_IP`], binds the fake API server there
    /// (inside the lan netns: the host's own interfaces are never touched),
    /// creates a CA and writes the kubeconfig and the mesh-only config.
    pub fn new(topo: &Topology, trust_domain: &str, root_namespace: &str) -> Result<KubeMesh> {
        let lan = topo.lan_netns();
        exec_in_ok(&lan, &["ip", "addr", "add", &format!("{API_IP}/24"), "dev", topo.bridge()])
            .context("giving the lan bridge the API server's address")?;
        let listener = listen_in(&lan, SocketAddr::from((API_IP, 0)))?;
        let api = FakeApiServer::start_on(listener)?;
        // The watches cross the bridge the tests capture on: no bookmarks,
        // so the API traffic stops while nothing changes (tcpdump's counts
        // then stay exact when a capture stops).
        api.set_bookmark_interval(Duration::from_secs(3600));
        let mesh = Mesh::new(topo, trust_domain)?;
        let kubeconfig = mesh.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let config = mesh.dir.path().join("mesh-only.yaml");
        std::fs::write(
            &config,
            format!(
                "trustDomain: {trust_domain}\nrootNamespace: {root_namespace}\nca:\n  dir: {}\n  certTtl: 24h\n",
                mesh.ca_dir().display()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        Ok(KubeMesh { pins: Mutex::default(), api, mesh, kubeconfig, config, prefix: topo.prefix().to_owned() })
    }

    /// Fails unless `node`'s netns reaches the API server (GET /version).
    pub fn check_reachable(&self, node: &Node) -> Result<()> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5", &format!("{}/version", self.api.url())]);
        let out = node.output(curl, Duration::from_secs(10))?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("gitVersion"),
            "node {} cannot reach the fake API server at {}: {}{}",
            node.name(),
            self.api.url(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `sluice run --config <mesh-only> --kubeconfig <kubeconfig> --node
    /// <node> --redirect <redirect> <extra>` in `node`'s netns, once READY.
    pub fn start_agent(&self, node: &Node, redirect: &str, extra: &[&str]) -> Result<Agent> {
        let pins = PinDir::new(&format!("{}-{}", self.prefix, node.name()));
        let root = pins.0.clone();
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).push(pins);
        let mut args = vec![
            "run",
            "--config",
            self.config.to_str().context("config path")?,
            "--kubeconfig",
            self.kubeconfig.to_str().context("kubeconfig path")?,
            "--node",
            node.name(),
            "--redirect",
            redirect,
        ];
        args.extend_from_slice(extra);
        Agent::start(node, &root, &args)
    }
}

/// Where a pod object's addresses come from.
fn pod_ips(pod: &Pod) -> [IpAddr; 2] {
    [IpAddr::V4(pod.ipv4()), IpAddr::V6(pod.ipv6())]
}

/// The Pod object of harness pod `pod` in namespace `ns`: its UID, node and
/// both addresses, service account `sa`, `labels`.
pub fn pod_object(pod: &Pod, ns: &str, sa: &str, labels: &[(&str, &str)]) -> Value {
    objects::pod(ns, pod.name(), pod.uid(), pod.node_name(), sa, &pod_ips(pod), labels)
}

/// Like [`pod_object`], for a pod of Deployment `deployment`: owned by the
/// ReplicaSet `<deployment>-<hash>`, name generated from it, labelled with
/// `pod-template-hash`, as the ReplicaSet controller creates them.
pub fn deployment_pod(pod: &Pod, ns: &str, sa: &str, deployment: &str, labels: &[(&str, &str)]) -> Value {
    const HASH: &str = "5d9c7f8b6";
    let mut all = labels.to_vec();
    all.push(("pod-template-hash", HASH));
    let mut obj = pod_object(pod, ns, sa, &all);
    let rs = format!("{deployment}-{HASH}");
    obj["metadata"]["generateName"] = json!(format!("{rs}-"));
    obj["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0",
        "controller": true, "blockOwnerDeletion": true,
    }]);
    obj
}

/// A host-network pod on `pod`'s node: the API gives it the node's address.
pub fn host_network_pod(pod: &Pod, node: &Node, ns: &str, labels: &[(&str, &str)]) -> Value {
    let mut obj = objects::pod(ns, pod.name(), pod.uid(), pod.node_name(), "default", &[IpAddr::V4(node.ip())], labels);
    obj["spec"]["hostNetwork"] = json!(true);
    obj
}

/// One endpoint of a slice, for harness pod `pod` (IPv4).
pub fn endpoint(pod: &Pod, ready: bool) -> objects::EndpointSpec {
    objects::EndpointSpec {
        ip: IpAddr::V4(pod.ipv4()),
        ready,
        node: Some(pod.node_name().to_owned()),
        pod: Some((pod.name().to_owned(), pod.uid().to_owned())),
    }
}

/// `/config_dump` of the agent in `node`.
pub fn config_dump(node: &Node) -> Result<Value> {
    let text = http_get(node, 15000, "/config_dump")?;
    serde_json::from_str(&text).with_context(|| format!("/config_dump is not JSON: {text}"))
}

/// `/metrics` of the agent in `node`.
pub fn metrics(node: &Node) -> Result<String> {
    http_get(node, 15020, "/metrics")
}

/// `sluice-peer send --sequential`: writes everything, half-closes, then
/// reads the echo (see tests/tests/services.rs for why same-node spliced
/// connections use it).
pub fn send_sequential(pod: &Pod, addr: &str, bytes: u64) -> Result<SendReport> {
    let mut c = Command::new(peer_bin());
    c.args(["send", "--connect", addr, "--bytes", &bytes.to_string(), "--sequential", "--timeout-secs", "30"]);
    let out = crate::output_in(pod, c, Duration::from_secs(35))?;
    let r: SendReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("sluice-peer send: {}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(r.ok && r.bytes_verified == bytes, "echo to {addr} not byte-exact: {r:?}");
    Ok(r)
}

/// One Prometheus sample line's labels, in order.
pub fn prom_labels(line: &str) -> Vec<(String, String)> {
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

/// tcpdump on the lan bridge, readable while it runs: [`Wire::segments`]
/// parses what was written so far (tcpdump writes packet by packet). The
/// agents' own traffic with the API server is left out.
pub struct Wire {
    cap: Option<Capture>,
    file: PathBuf,
}

impl Wire {
    pub fn start(topo: &Topology, file: &Path) -> Result<Wire> {
        let cap = Capture::start(&topo.lan_netns(), topo.bridge(), file)?;
        Ok(Wire { cap: Some(cap), file: file.to_owned() })
    }

    /// Every TCP segment captured so far, but those to or from the API server.
    pub fn segments(&self) -> Result<Vec<Segment>> {
        let bytes = std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))?;
        if bytes.len() < 24 {
            return Ok(Vec::new());
        }
        Ok(without_api(Pcap::parse(&bytes)?.segments))
    }

    /// Stops tcpdump; returns every segment (but the API server's) and its statistics.
    pub fn stop(mut self) -> Result<(Vec<Segment>, CaptureStats)> {
        let cap = self.cap.take().context("the capture is running until stop")?;
        let (bytes, stats) = cap.stop_with_stats()?;
        Ok((without_api(Pcap::parse(&bytes)?.segments), stats))
    }
}

fn without_api(segments: Vec<Segment>) -> Vec<Segment> {
    let api = IpAddr::V4(API_IP);
    segments.into_iter().filter(|s| s.src.ip() != api && s.dst.ip() != api).collect()
}
