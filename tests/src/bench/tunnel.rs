//! `sluice-bench tunnel`: two nodes, one enrolled pod on each, measured
//! first with no agents (direct) and then through two `sluice run` agents
//! with iptables capture (sluice), in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::common::{self, charged, mems, progress, stop, Host, PhaseCpu};
use super::measure::{self, Iperf};
use super::procstat::{mib, Mem, RssSampler};
use super::report::{agent_only, compare, Row, Target};
use crate::mesh::Mesh;
use crate::peer::{ConnRateReport, RrReport};
use crate::{Pod, Topology};

/// How long and how much; `quick` is for trying the bench out.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub iperf_secs: u32,
    pub rr_count: u64,
    pub rr_warmup: u64,
    pub conn_count: u64,
    pub conn_max_secs: u64,
    pub conn_slice: u64,
}

impl Config {
    pub fn full() -> Config {
        Config {
            iperf_secs: 8,
            rr_count: 20_000,
            rr_warmup: 1_000,
            conn_count: 25_000,
            conn_max_secs: 60,
            conn_slice: 2_500,
        }
    }

    pub fn quick() -> Config {
        Config { iperf_secs: 2, rr_count: 2_000, rr_warmup: 200, conn_count: 3_000, conn_max_secs: 10, conn_slice: 500 }
    }
}

/// Everything measured on one path (direct or through Sluice).
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub tput_1: Iperf,
    pub tput_4: Iperf,
    pub rr: RrReport,
    pub conn: ConnRateReport,
    /// TIME_WAIT sockets in the client and the server pod netns, before and
    /// after the connection-rate run.
    pub time_wait_before: [u64; 2],
    pub time_wait_after: [u64; 2],
}

/// What the two agents cost.
#[derive(Debug, Clone, Serialize)]
pub struct AgentCost {
    pub pids: [u32; 2],
    pub idle: [Mem; 2],
    /// VmHWM after the throughput runs: the peak so far.
    pub after_throughput: [Mem; 2],
    /// Highest VmRSS polled every 50 ms during the throughput runs.
    pub sampled_peak_rss_kib: [u64; 2],
    pub at_end: [Mem; 2],
    pub phases: Vec<PhaseCpu>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelReport {
    pub config: Config,
    #[serde(flatten)]
    pub host: Host,
    pub elapsed_s: f64,
    pub direct: Side,
    pub sluice: Side,
    pub agents: AgentCost,
    pub rows: Vec<Row>,
}

/// Ports per path, fresh servers each time, so that sockets left in
/// TIME_WAIT by the direct run never share a 4-tuple with the sluice run.
struct Ports {
    iperf: u16,
    rr: u16,
    conn: u16,
}

pub fn run(cfg: &Config) -> Result<TunnelReport> {
    common::preflight()?;
    let start = Instant::now();
    progress(start, "topology: node1/client, node2/server, both enrolled");
    let topo = Topology::new("bench")?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let client = n1.add_pod("client")?;
    let server = n2.add_pod("server")?;
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&client, "default", "bench-client", true);
    mesh.add(&server, "default", "bench-server", true);
    mesh.write_config()?;

    progress(start, "direct (no agents, no capture)");
    let direct_ports = Ports { iperf: 5201, rr: 7101, conn: 7201 };
    let direct = side(cfg, &client, &server, &direct_ports, None, start)?;

    progress(start, "starting the agents (--redirect iptables)");
    let ag1 = mesh.start_agent(&n1, "iptables")?;
    let ag2 = mesh.start_agent(&n2, "iptables")?;
    let pids = [ag1.pid(), ag2.pid()];
    std::thread::sleep(Duration::from_secs(1));
    let mut cost = AgentCost {
        pids,
        idle: mems(pids)?,
        after_throughput: Default::default(),
        sampled_peak_rss_kib: [0; 2],
        at_end: Default::default(),
        phases: Vec::new(),
    };
    progress(start, "through Sluice");
    let sluice_ports = Ports { iperf: 5202, rr: 7102, conn: 7202 };
    let sluice = side(cfg, &client, &server, &sluice_ports, Some(&mut cost), start)?;
    cost.at_end = mems(pids)?;
    progress(start, "stopping the agents");
    stop(ag1, "node1");
    stop(ag2, "node2");
    topo.close().context("tearing the topology down")?;
    let rows = rows(&direct, &sluice, &cost, cfg);
    Ok(TunnelReport {
        config: cfg.clone(),
        host: Host::this(),
        elapsed_s: start.elapsed().as_secs_f64(),
        direct,
        sluice,
        agents: cost,
        rows,
    })
}

/// Runs `f`, and with agents, records their CPU over it as `phase`.
fn phase<T>(cost: &mut Option<&mut AgentCost>, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(cost) = cost else { return f() };
    let (out, phase) = charged(cost.pids, name, f)?;
    cost.phases.push(phase);
    Ok(out)
}

fn side(
    cfg: &Config,
    client: &Pod,
    server: &Pod,
    ports: &Ports,
    mut cost: Option<&mut AgentCost>,
    start: Instant,
) -> Result<Side> {
    let sampler = cost.as_ref().map(|c| RssSampler::start(&c.pids));
    progress(start, "  iperf3, 1 stream");
    let tput_1 =
        phase(&mut cost, "throughput 1 stream", || measure::iperf(client, server, ports.iperf, 1, cfg.iperf_secs))?;
    progress(start, &format!("    {:.2} Gbit/s", tput_1.gbits()));
    progress(start, "  iperf3, 4 streams");
    let tput_4 =
        phase(&mut cost, "throughput 4 streams", || measure::iperf(client, server, ports.iperf, 4, cfg.iperf_secs))?;
    progress(start, &format!("    {:.2} Gbit/s", tput_4.gbits()));
    if let (Some(c), Some(s)) = (cost.as_mut(), sampler) {
        let peak = s.finish();
        c.sampled_peak_rss_kib = [peak[0], peak[1]];
        c.after_throughput = mems(c.pids)?;
    }
    progress(start, "  1-byte request/response");
    let rr = phase(&mut cost, "rr", || measure::rr(client, server, ports.rr, cfg.rr_count, cfg.rr_warmup))?;
    progress(start, &format!("    p50 {:.1} us, p99 {:.1} us", rr.p50_us, rr.p99_us));
    progress(start, "  new connections");
    let time_wait_before = [measure::time_wait(client)?, measure::time_wait(server)?];
    let conn = phase(&mut cost, "connections", || {
        measure::connrate(client, server, ports.conn, cfg.conn_count, cfg.conn_max_secs, cfg.conn_slice)
    })?;
    let time_wait_after = [measure::time_wait(client)?, measure::time_wait(server)?];
    progress(
        start,
        &format!(
            "    {} conns in {:.1} s ({:.0}/s), {} errors; TIME_WAIT client {} server {}",
            conn.conns, conn.secs, conn.per_sec, conn.errors, time_wait_after[0], time_wait_after[1]
        ),
    );
    Ok(Side { tput_1, tput_4, rr, conn, time_wait_before, time_wait_after })
}

/// First and last slice that hold at least half a slice of connections.
fn first_last(c: &ConnRateReport, slice: u64) -> (f64, f64) {
    let full: Vec<f64> = c.slices.iter().filter(|s| s.conns * 2 >= slice).map(|s| s.per_sec).collect();
    (full.first().copied().unwrap_or(0.0), full.last().copied().unwrap_or(0.0))
}

fn rows(d: &Side, s: &Side, cost: &AgentCost, cfg: &Config) -> Vec<Row> {
    let mut rows = vec![
        compare("throughput 1 stream (Gbit/s)", d.tput_1.gbits(), s.tput_1.gbits(), 2, Target::RatioAtLeast(0.32)),
        compare("throughput 4 streams (Gbit/s)", d.tput_4.gbits(), s.tput_4.gbits(), 2, Target::None),
        compare("RR 1 byte p50 (us)", d.rr.p50_us, s.rr.p50_us, 1, Target::AddedAtMost(35.0)),
        compare("RR 1 byte p90 (us)", d.rr.p90_us, s.rr.p90_us, 1, Target::Added),
        compare("RR 1 byte p99 (us)", d.rr.p99_us, s.rr.p99_us, 1, Target::AddedAtMost(50.0)),
        compare(
            &format!(
                "conn/s overall ({}{} / {}{} conns, 4 in flight)",
                d.conn.conns,
                if d.conn.truncated { " (time bound)" } else { "" },
                s.conn.conns,
                if s.conn.truncated { " (time bound)" } else { "" },
            ),
            d.conn.per_sec,
            s.conn.per_sec,
            0,
            Target::RatioAtLeast(0.4),
        ),
    ];
    let (df, dl) = first_last(&d.conn, cfg.conn_slice);
    let (sf, sl) = first_last(&s.conn, cfg.conn_slice);
    rows.push(compare(&format!("conn/s first {} conns", cfg.conn_slice), df, sf, 0, Target::None));
    rows.push(compare(&format!("conn/s last {} conns", cfg.conn_slice), dl, sl, 0, Target::None));
    let tw = |v: &[u64; 2]| format!("{} / {}", v[0], v[1]);
    rows.push(Row {
        metric: "TIME_WAIT after conn run (client / server pod)".into(),
        direct: tw(&d.time_wait_after),
        sluice: tw(&s.time_wait_after),
        compare: "-".into(),
        target: "-".into(),
        result: "-".into(),
    });
    // The kernel's own rate falls as TIME_WAIT fills the port range, so
    // Sluice "holds" when its last/first keeps up with direct's.
    let (dh, sh) = (dl / df, sl / sf);
    rows.push(Row {
        metric: "conn/s holds: last / first slice".into(),
        direct: format!("{dh:.2}"),
        sluice: format!("{sh:.2}"),
        compare: format!("{:.2}x", sh / dh),
        target: ">= 0.80x direct's".into(),
        result: if sh >= 0.8 * dh { "PASS" } else { "MISS" }.into(),
    });
    let errors = Row {
        metric: "failed connections".into(),
        direct: d.conn.errors.to_string(),
        sluice: s.conn.errors.to_string(),
        compare: "-".into(),
        target: "0".into(),
        result: if s.conn.errors == 0 { "PASS" } else { "MISS" }.into(),
    };
    rows.push(errors);
    for (i, t) in [(0, &s.tput_1), (1, &s.tput_4)] {
        let Some(p) = cost.phases.get(i) else {
            continue;
        };
        rows.push(agent_only(
            &format!("agent CPU s/GB, {} stream(s) (both agents)", t.streams),
            p.per_gb_text(t.bytes),
            p.per_gb(t.bytes),
            Some((1.0, "s/GB")),
        ));
    }
    let max_mib = |m: &[Mem; 2], f: fn(&Mem) -> u64| mib(f(&m[0]).max(f(&m[1])));
    let idle = max_mib(&cost.idle, |m| m.rss_kib);
    rows.push(agent_only(
        "agent RSS idle (MiB, max of 2)",
        format!("{idle:.1} ({:.1} / {:.1})", mib(cost.idle[0].rss_kib), mib(cost.idle[1].rss_kib)),
        idle,
        Some((10.0, "MiB")),
    ));
    let peak = max_mib(&cost.after_throughput, |m| m.hwm_kib);
    rows.push(agent_only(
        "agent RSS peak in throughput (MiB, max of 2)",
        format!(
            "{peak:.1} ({:.1} / {:.1})",
            mib(cost.after_throughput[0].hwm_kib),
            mib(cost.after_throughput[1].hwm_kib)
        ),
        peak,
        Some((24.0, "MiB")),
    ));
    rows
}
