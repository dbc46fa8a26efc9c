//! `cargo xtask demo`: Sluice on a simulated node. Builds a node with an
//! enrolled and an unenrolled pod, starts a real `sluice run`, moves real
//! bytes in both pods, shows what bpftool sees and what the counters say,
//! then stops the agent and checks nothing is left behind.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use sluice_tests::{
    agent_bin,
    traffic::{echo_server, send_verified},
    Agent, Topology,
};

const BYTES: u64 = 16 * 1024 * 1024;
const PIN_ROOT: &str = "/sys/fs/bpf/sluice";

fn main() {
    if let Err(e) = demo() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn say(s: &str) {
    println!("--- {s}");
}

fn demo() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    if Path::new(PIN_ROOT).exists() {
        bail!("{PIN_ROOT} exists: another Sluice agent is running on this machine; stop it first");
    }
    say("building a simulated node: one enrolled pod, one plain pod (netns + veth + cgroup v2 each)");
    let topo = Topology::new("demo")?;
    let node = topo.add_node("node1")?;
    let enrolled = node.add_pod("enrolled")?;
    let plain = node.add_pod("plain")?;
    println!("    enrolled pod {} cgroup {}", enrolled.ipv4(), enrolled.cgroup_path().display());
    println!("    plain pod    {} cgroup {}", plain.ipv4(), plain.cgroup_path().display());

    say("starting `sluice run` on the node, enrolling the pod's cgroup");
    let cgroup = enrolled.cgroup_path();
    let agent =
        Agent::start(&node, Path::new(PIN_ROOT), &["run", "--cgroup", cgroup.to_str().context("cgroup path")?])?;
    println!("    agent pid {}", agent.pid());
    let progs = run(Command::new("bpftool").args(["prog", "show"]))?;
    for line in progs.lines().filter(|l| l.contains("sluice")) {
        println!("    bpftool prog: {}", line.trim());
    }
    for map in ["counters", "sock_pairs"] {
        let shown = run(Command::new("bpftool").args(["map", "show", "pinned"]).arg(Path::new(PIN_ROOT).join(map)))?;
        println!("    bpftool map:  {}", shown.lines().next().unwrap_or("").trim());
    }

    say(&format!("moving {} MiB each way over 127.0.0.1 in both pods", BYTES >> 20));
    let mut rows = Vec::new();
    for (name, pod) in [("enrolled", &enrolled), ("plain", &plain)] {
        let (_server, addr) = echo_server(pod, "127.0.0.1:0", &[])?;
        let report = send_verified(pod, &addr, BYTES, Duration::from_secs(60))?;
        rows.push((name, report));
    }
    println!("    {:<9} {:>10} {:>12} {:>14} {:>10}", "pod", "verified", "tcp segs_out", "tcp bytes_acked", "ms");
    for (name, r) in &rows {
        println!(
            "    {:<9} {:>10} {:>12} {:>14} {:>10}",
            name, r.bytes_verified, r.tcp_info.segs_out, r.tcp_info.bytes_acked, r.elapsed_ms
        );
    }

    say("kernel counters (sluice inspect)");
    for line in run(Command::new(agent_bin()).args(["inspect", "--pin-root", PIN_ROOT]))?.lines() {
        println!("    {line}");
    }

    say("stopping the agent (SIGTERM)");
    agent.stop()?;
    ensure!(!Path::new(PIN_ROOT).exists(), "pins left behind in {PIN_ROOT}");
    let left = run(Command::new("bpftool").args(["prog", "show"]))?;
    ensure!(!left.contains("sluice_"), "programs still loaded after stop:\n{left}");
    let names = topo.netns_names();
    drop(topo);
    let netns = run(Command::new("ip").args(["netns", "list"]))?;
    ensure!(!names.iter().any(|n| netns.contains(n.as_str())), "network namespaces left behind");
    say("done: programs detached, pins removed, namespaces and cgroups deleted");
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
