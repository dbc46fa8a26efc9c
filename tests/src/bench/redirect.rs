//! `sluice-bench redirect`: the capture modes side by side, in one run.
//!
//! Two paths, each measured with one iperf3 stream and 1-byte
//! request/response:
//! - same-node: node1/client -> node1/local, one agent carries both ends;
//! - cross-node: node1/client -> node2/remote, an agent on each node.
//!
//! and four ways: direct (no agents), `--redirect iptables`,
//! `--redirect ebpf --splice off` (eBPF capture, then HBONE like any other
//! connection) and `--redirect ebpf --splice on` (a same-node connection
//! between enrolled pods is spliced in the kernel after authorization).
//! The splice changes only the same-node path: the splice way's cross-node
//! figures are measured and kept in the JSON, but that path is the eBPF
//! way's, so the table shows "-" for them. Every way gets a fresh topology,
//! so no capture state (iptables rules left for a successor agent,
//! conntrack entries, TIME_WAIT sockets) carries from one into the next.
//!
//! On a small machine one figure swings by ±20% from run to run, so the
//! ways are measured in rounds (direct, iptables, eBPF, eBPF splice, then
//! again) and the table shows the median of each figure over the rounds:
//! drift hits every way alike, and eBPF vs iptables is not decided by one
//! lucky run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::common::{self, charged, progress, stop, Host, PhaseCpu};
use super::measure::{self, Iperf};
use super::report::{table, verdict};
use crate::mesh::Mesh;
use crate::peer::RrReport;
use crate::{Pod, Topology};

/// Same-node spliced throughput must reach this share of direct.
pub const SPLICE_TARGET: f64 = 0.95;

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7101;

/// One way to run the agents: the name in the report and, unless direct
/// (no agents), the `--redirect` mode and further `sluice run` arguments.
#[derive(Debug, Clone, Copy)]
struct WaySpec {
    name: &'static str,
    agents: Option<(&'static str, &'static [&'static str])>,
}

/// The ways, in the order each round measures them.
const WAYS: [WaySpec; 4] = [
    WaySpec { name: "direct", agents: None },
    WaySpec { name: "iptables", agents: Some(("iptables", &[])) },
    WaySpec { name: "ebpf", agents: Some(("ebpf", &["--splice", "off"])) },
    WaySpec { name: "ebpf-splice", agents: Some(("ebpf", &["--splice", "on"])) },
];

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Every way is measured this many times, alternating.
    pub rounds: usize,
    pub iperf_secs: u32,
    pub rr_count: u64,
    pub rr_warmup: u64,
}

impl Config {
    pub fn full() -> Config {
        Config { rounds: 3, iperf_secs: 5, rr_count: 10_000, rr_warmup: 500 }
    }

    pub fn quick() -> Config {
        Config { rounds: 1, iperf_secs: 2, rr_count: 2_000, rr_warmup: 200 }
    }
}

/// One path measured one way.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub tput: Iperf,
    pub rr: RrReport,
    /// Both agents' CPU over the throughput run; none for direct.
    pub tput_agent_cpu: Option<PhaseCpu>,
}

impl PathResult {
    /// Agent CPU seconds per GB over the throughput run.
    pub fn cpu_per_gb(&self) -> Option<f64> {
        self.tput_agent_cpu.as_ref().map(|c| c.per_gb(self.tput.bytes))
    }
}

/// Both paths measured one way, once.
#[derive(Debug, Clone, Serialize)]
pub struct Way {
    /// "direct", "iptables", "ebpf" or "ebpf-splice".
    pub name: String,
    pub same_node: PathResult,
    pub cross_node: PathResult,
}

/// The medians over the rounds of one path measured one way.
#[derive(Debug, Clone, Serialize)]
pub struct PathMedians {
    pub gbits: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub agent_cpu_s_per_gb: Option<f64>,
}

impl PathMedians {
    fn of(runs: &[&PathResult]) -> PathMedians {
        let m = |f: &dyn Fn(&PathResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
        PathMedians {
            gbits: m(&|r| r.tput.gbits()),
            rr_p50_us: m(&|r| r.rr.p50_us),
            rr_p99_us: m(&|r| r.rr.p99_us),
            agent_cpu_s_per_gb: runs.iter().map(|r| r.cpu_per_gb()).collect::<Option<Vec<f64>>>().map(median),
        }
    }
}

/// One way: every round, and the medians the table shows.
#[derive(Debug, Clone, Serialize)]
pub struct WayRuns {
    pub name: String,
    pub same_node: PathMedians,
    pub cross_node: PathMedians,
    pub rounds: Vec<Way>,
}

impl WayRuns {
    fn new(name: &str, rounds: Vec<Way>) -> WayRuns {
        let same: Vec<&PathResult> = rounds.iter().map(|w| &w.same_node).collect();
        let cross: Vec<&PathResult> = rounds.iter().map(|w| &w.cross_node).collect();
        WayRuns { name: name.into(), same_node: PathMedians::of(&same), cross_node: PathMedians::of(&cross), rounds }
    }
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One line of the table, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct RedirectRow {
    pub metric: String,
    pub direct: String,
    pub iptables: String,
    pub ebpf: String,
    pub ebpf_splice: String,
    /// eBPF's figure (splice off) over iptables'.
    pub ebpf_vs_iptables: String,
    pub target: String,
    pub result: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedirectReport {
    pub config: Config,
    #[serde(flatten)]
    pub host: Host,
    pub elapsed_s: f64,
    pub direct: WayRuns,
    pub iptables: WayRuns,
    /// `--redirect ebpf --splice off`.
    pub ebpf: WayRuns,
    /// `--redirect ebpf --splice on`; its cross-node path is the eBPF way's.
    pub ebpf_splice: WayRuns,
    pub rows: Vec<RedirectRow>,
}

pub fn run(cfg: &Config) -> Result<RedirectReport> {
    common::preflight()?;
    let start = Instant::now();
    let mut runs: [Vec<Way>; WAYS.len()] = Default::default();
    for round in 1..=cfg.rounds {
        progress(start, &format!("round {round} of {}", cfg.rounds));
        for (spec, runs) in WAYS.iter().zip(&mut runs) {
            runs.push(way(cfg, spec, start).with_context(|| format!("way {}", spec.name))?);
        }
    }
    let [direct, iptables, ebpf, ebpf_splice] =
        std::array::from_fn(|i| WayRuns::new(WAYS[i].name, std::mem::take(&mut runs[i])));
    let rows = rows(&direct, &iptables, &ebpf, &ebpf_splice);
    Ok(RedirectReport {
        config: cfg.clone(),
        host: Host::this(),
        elapsed_s: start.elapsed().as_secs_f64(),
        direct,
        iptables,
        ebpf,
        ebpf_splice,
        rows,
    })
}

/// A fresh topology (node1: client, local; node2: remote; all enrolled),
/// agents run as `spec` says (none for direct), both paths measured, all
/// removed.
fn way(cfg: &Config, spec: &WaySpec, start: Instant) -> Result<Way> {
    let name = spec.name;
    progress(start, &format!("{name}: topology node1/client+local, node2/remote"));
    let topo = Topology::new("redirect")?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let client = n1.add_pod("client")?;
    let local = n1.add_pod("local")?;
    let remote = n2.add_pod("remote")?;
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&client, "default", "bench-client", true);
    mesh.add(&local, "default", "bench-local", true);
    mesh.add(&remote, "default", "bench-remote", true);
    mesh.write_config()?;
    let agents = match spec.agents {
        Some((mode, extra)) => {
            let flags = std::iter::once(format!("--redirect {mode}")).chain(extra.iter().map(|a| a.to_string()));
            progress(start, &format!("{name}: starting the agents ({})", flags.collect::<Vec<_>>().join(" ")));
            let a1 = mesh.start_agent_args(&n1, mode, extra)?;
            let a2 = mesh.start_agent_args(&n2, mode, extra)?;
            std::thread::sleep(Duration::from_millis(500));
            Some((a1, a2))
        }
        None => None,
    };
    let pids = agents.as_ref().map(|(a1, a2)| [a1.pid(), a2.pid()]);
    progress(start, &format!("{name}: same-node"));
    let same_node = path(cfg, &client, &local, pids, start)?;
    progress(start, &format!("{name}: cross-node"));
    let cross_node = path(cfg, &client, &remote, pids, start)?;
    if let Some((a1, a2)) = agents {
        stop(a1, "node1");
        stop(a2, "node2");
    }
    topo.close().context("tearing the topology down")?;
    Ok(Way { name: name.into(), same_node, cross_node })
}

fn path(cfg: &Config, client: &Pod, server: &Pod, agents: Option<[u32; 2]>, start: Instant) -> Result<PathResult> {
    let iperf = || measure::iperf(client, server, IPERF_PORT, 1, cfg.iperf_secs);
    let (tput, tput_agent_cpu) = match agents {
        Some(pids) => {
            let (t, c) = charged(pids, "throughput", iperf)?;
            (t, Some(c))
        }
        None => (iperf()?, None),
    };
    let rr = measure::rr(client, server, RR_PORT, cfg.rr_count, cfg.rr_warmup)?;
    let cpu = tput_agent_cpu.as_ref().map(|c| format!(", agents {}", c.per_gb_text(tput.bytes))).unwrap_or_default();
    progress(
        start,
        &format!("    {:.2} Gbit/s{cpu}; RR p50 {:.1} us, p99 {:.1} us", tput.gbits(), rr.p50_us, rr.p99_us),
    );
    Ok(PathResult { tput, rr, tput_agent_cpu })
}

/// Whether a figure is better higher (throughput) or lower (latency, CPU).
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// One path's medians out of a way's.
type Pick = fn(&WayRuns) -> &PathMedians;

fn rows(d: &WayRuns, i: &WayRuns, e: &WayRuns, s: &WayRuns) -> Vec<RedirectRow> {
    let mut rows = Vec::new();
    let paths: [(&str, Pick); 2] = [("same-node", |w| &w.same_node), ("cross-node", |w| &w.cross_node)];
    for (label, pick) in paths {
        // The splice applies to the same node only; cross-node it is the eBPF way.
        let same = label == "same-node";
        let (d, i, e, s) = (pick(d), pick(i), pick(e), same.then(|| pick(s)));
        let mut tput = row(
            &format!("{label} throughput, 1 stream (Gbit/s)"),
            Some(d.gbits),
            i.gbits,
            e.gbits,
            s.map(|s| s.gbits),
            2,
            Better::Higher,
        );
        if let Some(s) = s {
            tput.target += &format!("; splice >= {SPLICE_TARGET:.2}x direct");
            tput.result += &format!("; {}", verdict(s.gbits / d.gbits >= SPLICE_TARGET));
        }
        rows.push(tput);
        rows.push(row(
            &format!("{label} RR 1 byte p50 (us)"),
            Some(d.rr_p50_us),
            i.rr_p50_us,
            e.rr_p50_us,
            s.map(|s| s.rr_p50_us),
            1,
            Better::Lower,
        ));
        rows.push(row(
            &format!("{label} RR 1 byte p99 (us)"),
            Some(d.rr_p99_us),
            i.rr_p99_us,
            e.rr_p99_us,
            s.map(|s| s.rr_p99_us),
            1,
            Better::Lower,
        ));
    }
    for (label, pick) in paths {
        let (Some(ic), Some(ec)) = (pick(i).agent_cpu_s_per_gb, pick(e).agent_cpu_s_per_gb) else { continue };
        let sc = if label == "same-node" { pick(s).agent_cpu_s_per_gb } else { None };
        let mut r = row(&format!("{label} agent CPU (s/GB, both agents)"), None, ic, ec, sc, 2, Better::Lower);
        // Lower, strictly: the point of eBPF capture is to cost less.
        r.target = "eBPF < iptables".into();
        r.result = verdict(ec < ic);
        rows.push(r);
    }
    rows
}

/// A row: each way with its ratio to direct (the splice's, or "-" where it
/// does not apply), eBPF over iptables, and whether eBPF is at least as good
/// as iptables.
fn row(
    metric: &str,
    direct: Option<f64>,
    ipt: f64,
    ebpf: f64,
    splice: Option<f64>,
    prec: usize,
    better: Better,
) -> RedirectRow {
    let cell = |v: f64| match direct {
        Some(d) => format!("{v:.prec$} ({:.2}x)", v / d),
        None => format!("{v:.prec$}"),
    };
    let (target, ok) = match better {
        Better::Higher => ("eBPF >= iptables", ebpf >= ipt),
        Better::Lower => ("eBPF <= iptables", ebpf <= ipt),
    };
    RedirectRow {
        metric: metric.into(),
        direct: direct.map_or_else(|| "-".into(), |d| format!("{d:.prec$}")),
        iptables: cell(ipt),
        ebpf: cell(ebpf),
        ebpf_splice: splice.map_or_else(|| "-".into(), cell),
        ebpf_vs_iptables: format!("{:.2}x", ebpf / ipt),
        target: target.into(),
        result: verdict(ok),
    }
}

/// The rows as an aligned markdown table.
pub fn markdown(rows: &[RedirectRow]) -> String {
    let header = ["metric", "direct", "iptables", "eBPF", "eBPF splice", "eBPF / iptables", "target", "result"];
    let cells: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| {
            vec![
                r.metric.as_str(),
                &r.direct,
                &r.iptables,
                &r.ebpf,
                &r.ebpf_splice,
                &r.ebpf_vs_iptables,
                &r.target,
                &r.result,
            ]
        })
        .collect();
    table(&header, &cells)
}
