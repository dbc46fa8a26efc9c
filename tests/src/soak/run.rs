//! `sluice-soak run`: the soak itself, for each capture mode asked for.
//!
//! Topology, fresh for each mode and path: node1 holds the client pod, and
//! the echo server's pod is on node2 (`cross`: node1's agent, HBONE over
//! mTLS, node2's agent) or on node1 (`same`: node1's agent only, the splice
//! in eBPF mode); both pods enrolled, one real `sluice run` agent per node.
//!
//! Per path: phase 1 opens N connections, each with a checked round trip,
//! holds them all open, measures the agents, then does a second checked
//! round trip on every one (all were alive at once) and closes them (the
//! client closes first). Phase 2 makes M short connections in a row, a few
//! in flight, each with its bytes checked, closed by the server first.
//! Then the agents get up to `settle` to come back: descriptors, VmRSS and
//! per-connection map entries within 10% of the baseline (plus a small
//! absolute slack, see [`Config::tolerance`]), or the soak fails.
//!
//! The agents start with a soft RLIMIT_NOFILE of 1024, what containerd 2.x
//! gives a container (the hard limit stays this machine's: raising it needs
//! CAP_SYS_RESOURCE): an agent that does not raise its own soft limit fails
//! phase 1. A spliced connection holds two descriptors in the agent, so the
//! same-node path holds at most (hard limit - 1,000) / 2 connections.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use sluice_tests::bench::common::{progress, Host};
use sluice_tests::mesh::{http_get, Mesh};
use sluice_tests::{Agent, ChildGuard, Node, Pod, Topology};

use crate::load::ClientReport;
use crate::probe::{self, Peak, Sampler, Snapshot, Tolerance, Watched};

/// The soft RLIMIT_NOFILE the agents start with: what containerd 2.x and
/// systemd give a container. The hard limit stays this machine's.
pub const AGENT_SOFT_NOFILE: u64 = 1024;

const ECHO_PORT: u16 = 9000;
const CLOSE_PORT: u16 = 9001;

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Connections held open at once in phase 1.
    pub concurrent: u64,
    /// Connections opening at once in phase 1.
    pub open_parallel: usize,
    /// Bytes each held connection sends per round trip (two round trips).
    pub hold_bytes: usize,
    /// Short connections in phase 2.
    pub short: u64,
    /// Short connections in flight at once.
    pub short_parallel: usize,
    /// Bytes each short connection sends.
    pub short_bytes: usize,
    /// Longest wait for the agents to come back after a path.
    pub settle_secs: u64,
    /// Rounds of both phases per path against the same agents, each checked
    /// against the first baseline: a leak grows round after round.
    pub rounds: u32,
    pub tolerance: Tolerance,
    /// When VmRSS did not come back, ask the agent's allocator to return
    /// its free memory (`malloc_trim(0)` through gdb) and measure again: a
    /// leak stays, memory glibc merely kept goes. Diagnosis only.
    pub trim_probe: bool,
    /// Where each agent's log goes when it stops (`agent-<mode>-<node>.log`).
    #[serde(skip)]
    pub log_dir: Option<PathBuf>,
}

impl Config {
    pub fn full() -> Config {
        Config {
            concurrent: 10_000,
            open_parallel: 256,
            hold_bytes: 64,
            short: 200_000,
            short_parallel: 16,
            short_bytes: 32,
            settle_secs: 75,
            rounds: 1,
            tolerance: Self::tolerance(),
            trim_probe: false,
            log_dir: None,
        }
    }

    /// For CI: the same shape at a tenth and a twentieth of the load.
    pub fn short() -> Config {
        Config { concurrent: 1_000, short: 10_000, ..Self::full() }
    }

    /// Within 10%, plus: 8 descriptors (an idle HBONE connection the pool
    /// has not reaped yet, a timer), 2 MiB of RSS (allocator slack on a
    /// baseline of ~10 MiB) and 16 map entries (connections the kernel has
    /// not finished closing).
    fn tolerance() -> Tolerance {
        Tolerance { ratio: 0.10, fds: 8, rss_kib: 2048, map_entries: 16 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// client (node1) -> remote (node2): HBONE between the agents.
    Cross,
    /// client (node1) -> local (node1): one agent (the splice in eBPF mode).
    Same,
}

impl Path {
    pub fn label(self) -> &'static str {
        match self {
            Path::Cross => "cross-node",
            Path::Same => "same-node",
        }
    }
}

/// One agent through one path.
#[derive(Debug, Clone, Serialize)]
pub struct AgentFigures {
    pub agent: String,
    pub before: Snapshot,
    /// With every phase-1 connection open and checked.
    pub held: Snapshot,
    /// Highest fds and VmRSS polled during phase 1 and phase 2.
    pub peak_concurrent: Peak,
    pub peak_short: Peak,
    /// Right after phase 2, before any settling.
    pub after_short: Snapshot,
    /// After settling.
    pub after: Snapshot,
    /// (VmHWM after phase 1 - VmRSS before) / concurrent connections.
    pub rss_per_conn_kib: f64,
    /// What did not come back, empty when everything did.
    pub excess: Vec<String>,
    /// VmRSS after `malloc_trim(0)` (with `trim_probe`, when RSS was over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_trim_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    pub mode: String,
    pub path: Path,
    /// 1, or the round of `--rounds`.
    pub round: u32,
    pub concurrent: ClientReport,
    pub concurrent_close: ClientReport,
    pub short: ClientReport,
    pub settle_s: f64,
    /// node1's HBONE pool (`/config_dump` "pool") with every phase-1
    /// connection open.
    pub pool_held: serde_json::Value,
    pub agents: Vec<AgentFigures>,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub config: Config,
    #[serde(flatten)]
    pub host: Host,
    /// Soft and hard RLIMIT_NOFILE the agents started with.
    pub agent_nofile: (u64, u64),
    pub elapsed_s: f64,
    pub paths: Vec<PathReport>,
}

/// What the signal watcher removes if the soak is interrupted: the
/// topology (processes, netns, cgroups) and the agents' pin dirs.
static LIVE: Mutex<Option<(Topology, Vec<PathBuf>)>> = Mutex::new(None);

/// SIGINT/SIGTERM: tear the live topology down, then exit 130. A handler
/// that writes to a pipe, read by a watcher thread: a blocked signal mask
/// would be inherited by the agents (std does not reset it), and a handler
/// is reset to the default at exec.
pub fn cleanup_on_signal() -> Result<()> {
    static WAKE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
    extern "C" fn on_signal(_: libc::c_int) {
        let fd = WAKE.load(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: write(2) is async-signal-safe; the byte is a constant.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two fds it is given.
    ensure!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0, "pipe2");
    WAKE.store(fds[1], std::sync::atomic::Ordering::SeqCst);
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reads into a buffer we own from the pipe we made.
        while unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) } != 1 {}
        eprintln!("sluice-soak: interrupted: removing the topology");
        let live = LIVE.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((topo, pins)) = live {
            let _ = topo.close();
            for p in pins {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        std::process::exit(130);
    });
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only calls write(2).
        let old = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        ensure!(old != libc::SIG_ERR, "signal({sig})");
    }
    Ok(())
}

/// The agents inherit this process's limit: soft [`AGENT_SOFT_NOFILE`],
/// hard unchanged. Returns (soft, hard).
fn set_agent_nofile() -> Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0, "getrlimit(NOFILE)");
    lim.rlim_cur = AGENT_SOFT_NOFILE.min(lim.rlim_max);
    // SAFETY: setrlimit reads the struct it is given.
    ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0,
        "setrlimit(NOFILE, {lim:?}): {}",
        std::io::Error::last_os_error()
    );
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// This binary, for the load processes in the pods: /proc/self/exe, which
/// the forked child resolves to the binary this process runs even if cargo
/// has replaced the file since (others build in the same target dir).
fn soak_bin() -> Result<PathBuf> {
    Ok(PathBuf::from("/proc/self/exe"))
}

pub fn run(cfg: &Config, modes: &[String], paths: &[Path]) -> Result<SoakReport> {
    ensure!(nix::unistd::geteuid().is_root(), "the soak builds network namespaces and runs agents: run it as root");
    let agent_nofile = set_agent_nofile()?;
    let start = Instant::now();
    let mut reports = Vec::new();
    for mode in modes {
        for &path in paths {
            reports.extend(run_agents(cfg, mode, path, agent_nofile.1, start)?);
        }
    }
    Ok(SoakReport {
        config: cfg.clone(),
        host: Host::this(),
        agent_nofile,
        elapsed_s: start.elapsed().as_secs_f64(),
        paths: reports,
    })
}

fn echo_server(pod: &Pod, cfg: &Config) -> Result<ChildGuard> {
    let mut cmd = Command::new(soak_bin()?);
    cmd.args(["echo", "--ip", &pod.ipv4().to_string()])
        .args(["--echo-port", &ECHO_PORT.to_string(), "--close-port", &CLOSE_PORT.to_string()])
        .args(["--close-after", &cfg.short_bytes.to_string()]);
    let mut g = pod.spawn(cmd)?;
    g.wait_for_line("LISTENING ", Duration::from_secs(10))?;
    Ok(g)
}

/// A fresh topology and agents for `path` in `mode`, so each path's
/// baseline is an agent that has carried nothing else; `cfg.rounds` rounds.
fn run_agents(cfg: &Config, mode: &str, path: Path, hard_nofile: u64, start: Instant) -> Result<Vec<PathReport>> {
    let tag = format!("[{mode} {}]", path.label());
    let topo = Topology::new("soak")?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let client = n1.add_pod("client")?;
    let dst = match path {
        Path::Cross => n2.add_pod("remote")?,
        Path::Same => n1.add_pod("local")?,
    };
    progress(start, &format!("{tag} topology: node1/client -> {}/{}, both enrolled", dst.node_name(), dst.name()));
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&client, "default", "soak-client", true);
    mesh.add(&dst, "default", "soak-server", true);
    mesh.write_config()?;
    *LIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some((topo, Vec::new()));
    // Declared after the mesh, so dropped before it, also during a panic.
    let live = Live;

    let result = (|| {
        progress(start, &format!("{tag} starting the agents (--redirect {mode})"));
        let ag1 = mesh.start_agent(&n1, mode)?;
        let ag2 = mesh.start_agent(&n2, mode)?;
        if let Some((_, pins)) = LIVE.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            pins.extend([ag1.pin_root.clone(), ag2.pin_root.clone()]);
        }
        let pin = |a: &Agent| (mode == "ebpf").then(|| a.pin_root.clone());
        let watched = vec![
            Watched { name: "node1".into(), pid: ag1.pid(), pin_root: pin(&ag1) },
            Watched { name: "node2".into(), pid: ag2.pid(), pin_root: pin(&ag2) },
        ];
        for w in &watched {
            if let Some(root) = &w.pin_root {
                probe::check_pins(root)?;
            }
        }
        let _server = echo_server(&dst, cfg)?;
        let mut cfg = cfg.clone();
        if path == Path::Same {
            let most = hard_nofile.saturating_sub(1_000) / 2;
            if cfg.concurrent > most {
                progress(
                    start,
                    &format!(
                        "{tag} holding {most} at once, not {}: two descriptors each in the agent, hard limit {hard_nofile}",
                        cfg.concurrent
                    ),
                );
                cfg.concurrent = most;
            }
        }
        let mut out: Vec<PathReport> = Vec::new();
        for round in 1..=cfg.rounds.max(1) {
            let baseline = out.first().map(|r| r.agents.iter().map(|a| a.before.clone()).collect());
            let setup = Setup { mode, path, client: &client, dst: &dst, node1: &n1, watched: &watched };
            let r = run_path(&cfg, &setup, round, baseline, start);
            out.push(r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", log_tails(&[("node1", &ag1), ("node2", &ag2)])))?);
        }
        progress(start, &format!("{tag} stopping the agents (SIGTERM)"));
        for (agent, name) in [(ag1, "node1"), (ag2, "node2")] {
            let t = Instant::now();
            let (how, log) = match agent.stop() {
                Ok(log) => ("exited".to_string(), log),
                // The error carries the whole log: its first line is enough here.
                Err(e) => {
                    let text = format!("{e:#}");
                    (format!("did not stop cleanly: {}", text.lines().next().unwrap_or_default()), text)
                }
            };
            if let Some(dir) = &cfg.log_dir {
                let _ = std::fs::create_dir_all(dir);
                let file = format!("agent-{mode}-{}-{name}.log", path.label());
                let _ = std::fs::write(dir.join(file), strip_ansi(&log));
            }
            progress(start, &format!("{tag}   {name} agent {how} ({:.1} s)", t.elapsed().as_secs_f64()));
        }
        Ok(out)
    })();
    live.close()?;
    drop(mesh);
    result
}

/// Tears the topology in [`LIVE`] down when dropped (a panic included), or
/// by [`Live::close`], which reports the first error.
struct Live;

impl Live {
    fn close(self) -> Result<()> {
        let live = LIVE.lock().unwrap_or_else(|p| p.into_inner()).take();
        match live {
            Some((topo, _)) => topo.close().context("tearing the topology down"),
            None => Ok(()),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // The agents' pin dirs go with the mesh.
        let live = LIVE.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(live);
    }
}

/// The agents' warnings and errors (the last 15 each), for a failure.
fn log_tails(agents: &[(&str, &Agent)]) -> String {
    let mut out = String::new();
    for (name, a) in agents {
        let text = a.stderr();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        out.push_str(&format!("--- {name} agent: {} warnings/errors, the last ones:\n", lines.len()));
        for l in &lines[lines.len().saturating_sub(15)..] {
            out.push_str(&strip_ansi(l));
            out.push('\n');
        }
    }
    out
}

/// The text without terminal colour sequences (ESC [ ... m).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn snapshots(watched: &[Watched]) -> Result<Vec<Snapshot>> {
    watched.iter().map(|w| probe::snapshot(w.pid, w.pin_root.as_deref())).collect()
}

fn parse_report(line: &str, prefix: &str) -> Result<ClientReport> {
    let json = line.strip_prefix(prefix).unwrap_or(line).trim();
    serde_json::from_str(json).with_context(|| format!("client printed {line:?}"))
}

fn check_client(what: &str, r: &ClientReport, want: u64) -> Result<()> {
    ensure!(
        r.failed == 0 && r.ok == want,
        "{what}: {} of {want} connections checked out, {} failed: {:?}",
        r.ok,
        r.failed,
        r.error_samples
    );
    Ok(())
}

/// Where one round runs: from `client` to `dst` through the `watched`
/// agents; node1 is the client's node.
struct Setup<'a> {
    mode: &'a str,
    path: Path,
    client: &'a Pod,
    dst: &'a Pod,
    node1: &'a Node,
    watched: &'a [Watched],
}

/// One round of both phases; the first round warms up and takes the
/// baseline, later ones are checked against that same `baseline`.
fn run_path(
    cfg: &Config,
    setup: &Setup,
    round: u32,
    baseline: Option<Vec<Snapshot>>,
    start: Instant,
) -> Result<PathReport> {
    let Setup { mode, path, client, dst, node1, watched } = *setup;
    let tag = if round > 1 {
        format!("[{mode} {} round {round}]", path.label())
    } else {
        format!("[{mode} {}]", path.label())
    };
    let pids: Vec<u32> = watched.iter().map(|w| w.pid).collect();
    let hold_addr = format!("{}:{ECHO_PORT}", dst.ipv4());
    let short_addr = format!("{}:{CLOSE_PORT}", dst.ipv4());

    // Warm up: certificates issued, the pool dialled, the first-use
    // allocations made; then the baseline.
    let before = match baseline {
        Some(b) => b,
        None => {
            progress(start, &format!("{tag} warm-up: 200 short connections"));
            let warm = burst(client, &short_addr, 200, cfg, Duration::from_secs(60))?;
            check_client("warm-up", &warm, 200)?;
            std::thread::sleep(Duration::from_secs(2));
            let before = snapshots(watched)?;
            if cfg.trim_probe {
                for w in watched {
                    probe::malloc_stats(w.pid)?;
                }
            }
            before
        }
    };

    progress(start, &format!("{tag} phase 1: opening {} connections, {} at a time", cfg.concurrent, cfg.open_parallel));
    let sampler = Sampler::start(pids.clone());
    let mut cmd = Command::new(soak_bin()?);
    cmd.args(["hold", "--connect", &hold_addr, "--count", &cfg.concurrent.to_string()])
        .args(["--parallel", &cfg.open_parallel.to_string(), "--bytes", &cfg.hold_bytes.to_string()])
        .stdin(Stdio::piped());
    let mut holder = client.spawn(cmd)?;
    let open_timeout = Duration::from_secs(60 + cfg.concurrent / 20);
    let held_line = holder.wait_for_line("HELD ", open_timeout)?;
    let concurrent = parse_report(&held_line, "HELD ")?;
    progress(
        start,
        &format!(
            "{tag}   {} open and checked in {:.1} s ({:.0}/s)",
            concurrent.ok, concurrent.secs, concurrent.per_sec
        ),
    );
    // node1's HBONE pool: a connection carries at most 100 streams (the
    // peer's SETTINGS_MAX_CONCURRENT_STREAMS); more streams than 100 per
    // connection means some wait in h2 for a slot.
    let pool_held = http_get(node1, 15000, "/config_dump")
        .ok()
        .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
        .map(|d| d["pool"].clone())
        .unwrap_or_default();
    if let (Some(c), Some(s)) = (pool_held["connections"].as_u64(), pool_held["active_streams"].as_u64()) {
        if c > 0 {
            progress(start, &format!("{tag}   node1 HBONE pool: {s} streams on {c} connections"));
        }
    }
    check_client("phase 1 (open)", &concurrent, cfg.concurrent)
        .with_context(|| format!("node1 HBONE pool then: {pool_held}"))?;
    let held = snapshots(watched)?;
    // Every connection really is open through the agent(s) now.
    let through: &[usize] = if path == Path::Cross { &[0, 1] } else { &[0] };
    for &i in through {
        let grew = held[i].fds.saturating_sub(before[i].fds);
        ensure!(
            grew * 100 >= cfg.concurrent * 95,
            "{tag} {} agent: {grew} more descriptors with {} connections held; they did not all go through it",
            watched[i].name,
            cfg.concurrent
        );
    }
    progress(start, &format!("{tag}   held: {}", brief(watched, &held)));
    let mut stdin = holder.take_stdin().context("the holder's stdin")?;
    writeln!(stdin, "go").context("telling the holder to finish")?;
    let done_line = holder.wait_for_line("DONE ", open_timeout)?;
    let concurrent_close = parse_report(&done_line, "DONE ")?;
    check_client("phase 1 (second round trip and close)", &concurrent_close, cfg.concurrent)?;
    let _ = holder.finish(Duration::from_secs(10));
    let peak_concurrent = sampler.finish();

    progress(start, &format!("{tag} phase 2: {} short connections, {} in flight", cfg.short, cfg.short_parallel));
    let sampler = Sampler::start(pids.clone());
    let short = burst(client, &short_addr, cfg.short, cfg, Duration::from_secs(480))?;
    let peak_short = sampler.finish();
    progress(
        start,
        &format!("{tag}   {} in {:.1} s ({:.0}/s), {} failed", short.ok, short.secs, short.per_sec, short.failed),
    );
    check_client("phase 2", &short, cfg.short)?;
    let after_short = snapshots(watched)?;

    progress(start, &format!("{tag} settling: up to {} s for the agents to come back", cfg.settle_secs));
    let t0 = Instant::now();
    // VmRSS of each agent 15 s ago (one sample a second).
    let mut rss_history: Vec<Vec<u64>> = Vec::new();
    let (after, excess) = loop {
        let now = snapshots(watched)?;
        let excess: Vec<Vec<String>> =
            before.iter().zip(&now).map(|(b, a)| probe::excess(b, a, &cfg.tolerance)).collect();
        if excess.iter().all(Vec::is_empty) || t0.elapsed() > Duration::from_secs(cfg.settle_secs) {
            break (now, excess);
        }
        // Only RSS is still over, and it has not moved by 1% in 15 s: more
        // waiting would not change the verdict.
        rss_history.push(now.iter().map(|s| s.rss_kib).collect());
        let only_rss = excess.iter().flatten().all(|e| e.starts_with("VmRSS"));
        if only_rss && rss_history.len() > 15 {
            let then = &rss_history[rss_history.len() - 16];
            let flat = now.iter().zip(then).all(|(n, t)| n.rss_kib.abs_diff(*t) * 100 <= *t);
            if flat {
                break (now, excess);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let settle_s = t0.elapsed().as_secs_f64();
    progress(start, &format!("{tag}   after {settle_s:.0} s: {}", brief(watched, &after)));

    let agents: Vec<AgentFigures> = watched
        .iter()
        .enumerate()
        .map(|(i, w)| AgentFigures {
            agent: w.name.clone(),
            before: before[i].clone(),
            held: held[i].clone(),
            peak_concurrent: peak_concurrent.get(i).copied().unwrap_or_default(),
            peak_short: peak_short.get(i).copied().unwrap_or_default(),
            after_short: after_short[i].clone(),
            after: after[i].clone(),
            rss_per_conn_kib: held[i]
                .hwm_kib
                .max(peak_concurrent.get(i).map_or(0, |p| p.rss_kib))
                .saturating_sub(before[i].rss_kib) as f64
                / cfg.concurrent as f64,
            excess: excess[i].clone(),
            rss_after_trim_kib: None,
        })
        .collect();
    let mut agents = agents;
    if cfg.trim_probe {
        for (a, w) in agents.iter_mut().zip(watched) {
            if a.excess.iter().any(|e| e.starts_with("VmRSS")) {
                a.rss_after_trim_kib = Some(probe::rss_after_malloc_trim(w.pid)?);
                progress(
                    start,
                    &format!(
                        "{tag}   {} agent: VmRSS {:.1} MiB, {:.1} MiB after malloc_trim(0)",
                        w.name,
                        a.after.rss_kib as f64 / 1024.0,
                        a.rss_after_trim_kib.unwrap_or(0) as f64 / 1024.0
                    ),
                );
            }
        }
    }
    let pass = agents.iter().all(|a| a.excess.is_empty());
    for a in &agents {
        if !a.excess.is_empty() {
            eprintln!("{tag} {} agent did not come back: {}", a.agent, a.excess.join("; "));
        }
    }
    Ok(PathReport {
        mode: mode.into(),
        path,
        round,
        concurrent,
        concurrent_close,
        short,
        settle_s,
        pool_held,
        agents,
        pass,
    })
}

fn burst(client: &Pod, addr: &str, count: u64, cfg: &Config, max: Duration) -> Result<ClientReport> {
    let mut cmd = Command::new(soak_bin()?);
    cmd.args(["burst", "--connect", addr, "--count", &count.to_string()])
        .args(["--parallel", &cfg.short_parallel.to_string(), "--bytes", &cfg.short_bytes.to_string()])
        .args(["--max-secs", &max.as_secs().to_string()]);
    let out = client.output(cmd, max + Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("burst client failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    parse_report(stdout.trim(), "")
}

/// "node1 fds 10052 rss 61.2 MiB, node2 ..." for the progress lines.
fn brief(watched: &[Watched], s: &[Snapshot]) -> String {
    watched
        .iter()
        .zip(s)
        .map(|(w, s)| {
            let maps: Vec<String> = s.maps.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
            let maps = if maps.is_empty() { String::new() } else { format!(", {}", maps.join(", ")) };
            format!("{} fds {} rss {:.1} MiB{maps}", w.name, s.fds, s.rss_kib as f64 / 1024.0)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The union of map names across snapshots, in order.
pub fn map_names(r: &PathReport) -> Vec<String> {
    let mut names = BTreeMap::new();
    for a in &r.agents {
        for k in a.before.maps.keys() {
            names.insert(k.clone(), ());
        }
    }
    names.into_keys().collect()
}
