//! `sluice-bench discovery`: what Kubernetes discovery costs at cluster
//! scale. The fake API server (tests/src/fake_api, real REST and watch over
//! TCP) holds N synthetic pods, N/2 services and one EndpointSlice per
//! service; a real `sluice run --kubeconfig` agent on one node of the
//! harness lists and watches them. Per size it reports the agent's RSS once
//! ready (and the same with an empty cluster, measured in the same run, as
//! the baseline), the RSS added per 1,000 objects, the time from start to
//! READY, how long one change takes to reach the agent's state (a new
//! service, seen through `sluice_config_reloads_total`), and the RSS once
//! those changes have replaced the first state.
//!
//! Sizes alternate within each round, so a slow moment of the machine hits
//! every size alike; each figure is the median over rounds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use super::common::{progress, stop, Host};
use super::procstat::{self, mib};
use super::report::table;
use crate::fake_api::objects::{self, EndpointSpec};
use crate::fake_api::FakeApiServer;
use crate::mesh::{http_get, metric_sum, Mesh};
use crate::{Agent, Node, Topology};

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Pods per size; services are half as many.
    pub sizes: Vec<usize>,
    pub rounds: usize,
    /// Changes timed per run.
    pub updates: usize,
}

impl Config {
    /// The scale: 10,000 pods and 5,000 services.
    pub fn full() -> Config {
        Config { sizes: vec![0, 2_000, 10_000], rounds: 3, updates: 5 }
    }

    pub fn quick() -> Config {
        Config { sizes: vec![0, 1_000], rounds: 1, updates: 3 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub pods: usize,
    pub services: usize,
    pub slices: usize,
    pub ready_ms: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub update_ms: Vec<f64>,
    /// VmRSS 1 s after the last timed change: what the agent holds once
    /// its state has been replaced.
    pub changed_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeSummary {
    pub pods: usize,
    pub objects: usize,
    pub ready_ms: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// RSS above the empty cluster's, per 1,000 objects (pods + services +
    /// slices); `None` for the empty cluster itself.
    pub kib_per_1000_objects: Option<f64>,
    pub update_ms: f64,
    /// RSS once the timed changes were applied.
    pub changed_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiscoveryReport {
    pub config: Config,
    #[serde(flatten)]
    pub host: Host,
    pub elapsed_s: f64,
    pub runs: Vec<Run>,
    pub sizes: Vec<SizeSummary>,
}

const NODE: &str = "node1";
/// Synthetic pods are spread over this many other nodes: this agent
/// enrolls none of them, as on a node of a large cluster where almost every
/// pod is elsewhere.
const OTHER_NODES: usize = 50;
const NAMESPACES: usize = 20;

pub fn run(cfg: &Config) -> Result<DiscoveryReport> {
    super::common::preflight()?;
    let start = Instant::now();
    let topo = Topology::new("bdisc")?;
    let node = topo.add_node(NODE)?;
    let mesh = Mesh::new(&topo, "cluster.local")?;
    let config = mesh.ca_dir().with_file_name("mesh-only.yaml");
    std::fs::write(&config, format!("trustDomain: cluster.local\nca:\n  dir: {}\n", mesh.ca_dir().display()))
        .with_context(|| format!("writing {}", config.display()))?;

    let mut runs = Vec::new();
    for round in 0..cfg.rounds {
        // Alternate the order too, so no size always runs first.
        let mut sizes = cfg.sizes.clone();
        if round % 2 == 1 {
            sizes.reverse();
        }
        for pods in sizes {
            progress(start, &format!("round {}/{}: {pods} pods, {} services", round + 1, cfg.rounds, pods / 2));
            runs.push(one(cfg, &topo, &node, &mesh, &config, pods)?);
        }
    }
    let sizes = summarize(&cfg.sizes, &runs);
    Ok(DiscoveryReport {
        config: cfg.clone(),
        host: Host::this(),
        elapsed_s: start.elapsed().as_secs_f64(),
        runs,
        sizes,
    })
}

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

fn populate(api: &FakeApiServer, pods: usize) -> Result<(usize, usize)> {
    for n in 0..NAMESPACES {
        let labels: &[(&str, &str)] = if n % 2 == 0 { &[("istio.io/dataplane-mode", "ambient")] } else { &[] };
        api.apply(objects::namespace(&format!("ns{n}"), labels))?;
    }
    for i in 0..pods {
        let ns = format!("ns{}", i % NAMESPACES);
        let node = format!("other-{}", i % OTHER_NODES);
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        let labels =
            [("app", format!("app{}", i / 2)), ("version", "v1".into()), ("pod-template-hash", "5d9c7".into())];
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut pod =
            objects::pod(&ns, &format!("app{}-5d9c7-{i}", i / 2), &uid, &node, "default", &[pod_ip(i)], &labels);
        // What real pods carry and the agent must not keep.
        pod["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(600)});
        pod["metadata"]["managedFields"] =
            json!([{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {"f:conditions": {}}}}]);
        pod["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "b"}, {"name": "C", "value": "d"}]);
        api.apply(pod)?;
    }
    let services = pods / 2;
    for s in 0..services {
        let ns = format!("ns{}", (2 * s) % NAMESPACES);
        let name = format!("app{s}");
        let vip = IpAddr::V4(Ipv4Addr::new(10, 96 + (s >> 16) as u8, (s >> 8) as u8, s as u8));
        api.apply(objects::service(&ns, &name, &[vip], &[("http", 80, json!(8080))]))?;
        let endpoints: Vec<EndpointSpec> = (2 * s..2 * s + 2)
            .map(|i| EndpointSpec {
                ip: pod_ip(i),
                ready: true,
                node: Some(format!("other-{}", i % OTHER_NODES)),
                pod: Some((format!("app{s}-5d9c7-{i}"), format!("00000000-0000-4000-8000-{i:012}"))),
            })
            .collect();
        api.apply(objects::endpoint_slice(
            &ns,
            &format!("{name}-abcde"),
            &name,
            "IPv4",
            &endpoints,
            &[("http", 8080)],
        ))?;
    }
    Ok((services, services))
}

fn one(cfg: &Config, topo: &Topology, node: &Node, mesh: &Mesh, config: &std::path::Path, pods: usize) -> Result<Run> {
    let listener = crate::netns::listen_in(node.netns_name(), SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let api = FakeApiServer::start_on(listener)?;
    let (services, slices) = populate(&api, pods)?;
    let kubeconfig = config.with_file_name(format!("kubeconfig-{pods}"));
    api.write_kubeconfig(&kubeconfig)?;
    let pins = crate::PinDir::new(&format!("{}-{NODE}-{pods}", topo.prefix()));
    let args = [
        "run",
        "--config",
        config.to_str().context("config path")?,
        "--kubeconfig",
        kubeconfig.to_str().context("kubeconfig path")?,
        "--node",
        NODE,
        "--redirect",
        "iptables",
    ];
    let t0 = Instant::now();
    let agent = Agent::start(node, &pins.0, &args)?;
    let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Let the allocator settle after the initial lists.
    std::thread::sleep(Duration::from_secs(1));
    let mem = procstat::mem(agent.pid())?;

    let mut update_ms = Vec::new();
    let result = (|| -> Result<()> {
        for u in 0..cfg.updates {
            let before = reloads(node)?;
            let t = Instant::now();
            let vip = IpAddr::V4(Ipv4Addr::new(10, 250, 0, u as u8));
            api.apply(objects::service("ns0", &format!("added-{u}"), &[vip], &[("http", 80, json!(8080))]))?;
            loop {
                if reloads(node)? > before {
                    break;
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("{pods} pods: a new service did not reach the agent's state within 30 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            update_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    })();
    std::thread::sleep(Duration::from_secs(1));
    let changed = procstat::mem(agent.pid());
    stop(agent, NODE);
    result?;
    drop(pins);
    let _ = std::fs::remove_file(&kubeconfig);
    let _ = mesh;
    let changed_rss_kib = changed?.rss_kib;
    Ok(Run { pods, services, slices, ready_ms, rss_kib: mem.rss_kib, hwm_kib: mem.hwm_kib, update_ms, changed_rss_kib })
}

fn reloads(node: &Node) -> Result<u64> {
    Ok(metric_sum(&http_get(node, 15020, "/metrics")?, "sluice_config_reloads_total", &["result=\"ok\""]))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn summarize(sizes: &[usize], runs: &[Run]) -> Vec<SizeSummary> {
    let of = |pods: usize| runs.iter().filter(move |r| r.pods == pods);
    let base_rss = median(of(0).map(|r| r.rss_kib as f64).collect());
    sizes
        .iter()
        .map(|&pods| {
            let first = of(pods).next();
            let objects = first.map_or(0, |r| r.pods + r.services + r.slices);
            let rss = median(of(pods).map(|r| r.rss_kib as f64).collect());
            SizeSummary {
                pods,
                objects,
                ready_ms: median(of(pods).map(|r| r.ready_ms).collect()),
                rss_mib: mib(rss as u64),
                hwm_mib: mib(median(of(pods).map(|r| r.hwm_kib as f64).collect()) as u64),
                kib_per_1000_objects: (objects > 0 && base_rss.is_finite())
                    .then(|| (rss - base_rss) / (objects as f64 / 1000.0)),
                update_ms: median(of(pods).flat_map(|r| r.update_ms.iter().copied()).collect()),
                changed_rss_mib: mib(median(of(pods).map(|r| r.changed_rss_kib as f64).collect()) as u64),
            }
        })
        .collect()
}

pub fn markdown(sizes: &[SizeSummary]) -> String {
    let rows: Vec<Vec<String>> = sizes
        .iter()
        .map(|s| {
            vec![
                format!("{} pods, {} services", s.pods, s.pods / 2),
                s.objects.to_string(),
                format!("{:.0}", s.ready_ms),
                format!("{:.1}", s.rss_mib),
                format!("{:.1}", s.hwm_mib),
                s.kib_per_1000_objects.map_or("(baseline)".into(), |k| format!("{k:.0}")),
                format!("{:.0}", s.update_ms),
                format!("{:.1}", s.changed_rss_mib),
            ]
        })
        .collect();
    table(
        &[
            "cluster",
            "objects",
            "start to READY (ms)",
            "RSS (MiB)",
            "peak RSS (MiB)",
            "KiB per 1,000 objects",
            "change seen (ms)",
            "RSS after the changes (MiB)",
        ],
        &rows,
    )
}
