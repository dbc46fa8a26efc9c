//! Tests of the harness itself: topologies carry real traffic, processes
//! land in the right netns and cgroup, and nothing is left behind.

use anyhow::{ensure, Context, Result};
use sluice_tests::{
    cgroup2_mount, cgroup_of, netns, peer_bin, require_root, sweep_stale, ChildGuard, Pod, SendReport, Topology,
};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn peer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice-peer"))
}

/// Start an echo server on `ip` in `pod`; returns the guard and its address.
fn echo_server(pod: &Pod, ip: IpAddr) -> Result<(ChildGuard, SocketAddr)> {
    let mut cmd = peer();
    cmd.args(["serve", "--print-peer", "--listen"]).arg(SocketAddr::new(ip, 0).to_string());
    let mut server = pod.spawn(cmd)?;
    let line = server.wait_for_line("LISTENING ", WAIT)?;
    let addr = line["LISTENING ".len()..].parse().with_context(|| format!("parse {line:?}"))?;
    Ok((server, addr))
}

/// Run `sluice-peer send` in `pod` and return its report.
fn send_from(pod: &Pod, to: SocketAddr, bytes: u64) -> Result<SendReport> {
    let mut cmd = peer();
    cmd.args(["send", "--timeout-secs", "20", "--connect", &to.to_string()]).args(["--bytes", &bytes.to_string()]);
    let out = pod.output(cmd, Duration::from_secs(30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: SendReport = serde_json::from_str(stdout.trim())
        .with_context(|| format!("send output {stdout:?}, stderr {:?}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(out.status.success() && report.ok, "send failed: {report:?}");
    Ok(report)
}

/// Bytes received by a device in a netns (`ip -s -j link`).
fn rx_bytes(ns: &str, dev: &str) -> Result<u64> {
    let json = netns::exec_in_ok(ns, &["ip", "-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    v[0]["stats64"]["rx"]["bytes"].as_u64().with_context(|| format!("no rx bytes in {json}"))
}

fn alive(pid: u32) -> bool {
    // A zombie (e.g. an orphan waiting for a non-reaping pid 1) is dead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Everything a topology made is gone: netns names, cgroup dir.
fn assert_gone(netns_names: &[String], cgroup: &Path) {
    let listed = netns::list().expect("ip netns list");
    for name in netns_names {
        assert!(!listed.contains(name), "netns {name} left behind: {listed:?}");
        assert!(!netns::netns_path(name).exists(), "{name} file left behind");
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
}

fn two_by_two(name: &str) -> Result<(Topology, Vec<Pod>)> {
    let topo = Topology::new(name)?;
    let mut pods = Vec::new();
    for n in ["node1", "node2"] {
        let node = topo.add_node(n)?;
        pods.push(node.add_pod("pod1")?);
        pods.push(node.add_pod("pod2")?);
    }
    Ok((topo, pods))
}

#[test]
fn cross_node_echo_ipv4_and_ipv6_root() -> Result<()> {
    require_root!(Ok(()));
    let (topo, pods) = two_by_two("echo")?;
    let server = &pods[0]; // node1/pod1
    let nodes = topo.nodes();
    let lan = topo.lan_netns();
    for v6 in [false, true] {
        let ip = |p: &Pod| -> IpAddr {
            if v6 {
                p.ipv6().into()
            } else {
                p.ipv4().into()
            }
        };
        let (mut srv, addr) = echo_server(server, ip(server))?;
        // Across nodes (over the bridge), then same node.
        for client in [&pods[2], &pods[3], &pods[1]] {
            let wire_before = rx_bytes(&lan, nodes[1].lan_veth())?;
            let report = send_from(client, addr, MIB)?;
            assert_eq!((report.bytes_sent, report.bytes_verified), (MIB, MIB), "{report:?}");
            assert!(report.tcp_info.bytes_acked >= MIB, "{report:?}");
            let peer_line = srv.wait_for_line("PEER ", WAIT)?;
            let seen: SocketAddr = peer_line["PEER ".len()..].parse()?;
            assert_eq!(seen.ip(), ip(client), "app must see the real client IP");
            let wire = rx_bytes(&lan, nodes[1].lan_veth())? - wire_before;
            if client.node_name() == "node2" {
                assert!(wire >= MIB, "only {wire} bytes crossed {}", nodes[1].lan_veth());
            } else {
                assert!(wire < MIB / 4, "same-node traffic crossed the lan ({wire} bytes)");
            }
        }
    }
    topo.close()
}

#[test]
fn spawned_process_is_in_pod_cgroup_and_netns_root() -> Result<()> {
    require_root!(Ok(()));
    let (topo, pods) = two_by_two("place")?;
    let mount = cgroup2_mount()?;
    let node = &topo.nodes()[1];
    let places: [(&dyn sluice_tests::Place, PathBuf, PathBuf); 2] =
        [(&pods[3], pods[3].cgroup_path(), pods[3].netns_path()), (node, node.cgroup_path(), node.netns_path())];
    for (place, cgroup, ns_path) in places {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let guard = sluice_tests::spawn_in(place, cmd)?;
        let pid = guard.pid();
        let rel = format!("/{}", cgroup.strip_prefix(&mount)?.display());
        assert_eq!(cgroup_of(pid)?, rel);
        assert!(sluice_tests::cgroup::procs(&cgroup)?.contains(&(pid as i32)));
        let ns_ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
        assert_eq!(ns_ino, std::fs::metadata(&ns_path)?.ino(), "netns of {pid}");
        assert_ne!(ns_ino, std::fs::metadata("/proc/self/ns/net")?.ino());
        drop(guard);
        assert!(!alive(pid), "guard drop must kill {pid}");
    }
    topo.close()
}

#[test]
fn drop_removes_netns_cgroups_and_processes_root() -> Result<()> {
    require_root!(Ok(()));
    let (topo, pods) = two_by_two("drop")?;
    let names = topo.netns_names();
    assert_eq!(names.len(), 7, "lan + 2 nodes + 4 pods: {names:?}");
    let listed = netns::list()?;
    assert!(names.iter().all(|n| listed.contains(n)), "{names:?} not in {listed:?}");
    let cgroup = topo.cgroup_path();
    // A forgotten guard and a grandchild outside any guard.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 100 & echo $!; wait"]);
    let mut sh = pods[0].spawn(cmd)?;
    let grandchild: u32 = sh.next_line(WAIT)?.context("grandchild pid")?.parse()?;
    let child = sh.pid();
    std::mem::forget(sh);
    assert!(alive(child) && alive(grandchild));
    drop(topo);
    assert_gone(&names, &cgroup);
    assert!(!alive(child), "child {child} survived");
    assert!(!alive(grandchild), "grandchild {grandchild} survived");
    Ok(())
}

#[test]
fn panic_inside_still_cleans_up_root() {
    require_root!();
    let made = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let (topo, pods) = two_by_two("panic").expect("topology");
        let mut cmd = Command::new("sleep");
        cmd.arg("100");
        let guard = pods[1].spawn(cmd).expect("spawn");
        *made.lock().unwrap() = Some((topo.netns_names(), topo.cgroup_path(), guard.pid()));
        panic!("deliberate panic with a live topology");
    });
    assert!(result.is_err());
    let (names, cgroup, pid) = made.into_inner().unwrap().expect("topology was built");
    assert_gone(&names, &cgroup);
    assert!(!alive(pid));
}

#[test]
fn concurrent_topologies_do_not_clash_root() -> Result<()> {
    require_root!(Ok(()));
    let run = || -> Result<(String, Vec<String>, PathBuf)> {
        let (topo, pods) = two_by_two("conc")?;
        let (_srv, addr) = echo_server(&pods[0], pods[0].ipv6().into())?;
        send_from(&pods[2], addr, 256 * 1024)?;
        Ok((topo.prefix().to_owned(), topo.netns_names(), topo.cgroup_path()))
    };
    let threads: Vec<_> = (0..2).map(|_| std::thread::spawn(run)).collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().expect("thread panicked")).collect::<Result<_>>()?;
    assert_ne!(results[0].0, results[1].0);
    for (_, names, cgroup) in &results {
        assert_gone(names, cgroup);
    }
    Ok(())
}

#[test]
fn sweep_removes_only_dead_owners_root() -> Result<()> {
    require_root!(Ok(()));
    let dead_pid = {
        let mut c = Command::new("true").spawn()?;
        c.wait()?;
        c.id()
    };
    let b36 = |mut n: u32| {
        let mut s = Vec::new();
        loop {
            s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
            n /= 36;
            if n == 0 {
                break String::from_utf8(s.into_iter().rev().collect()).unwrap();
            }
        }
    };
    let stale = format!("sl-{}-zz-stale", b36(dead_pid));
    let live = format!("sl-{}-zz-live", b36(std::process::id()));
    let mount = cgroup2_mount()?;
    for name in [&stale, &live] {
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        ensure!(out.status.success(), "ip netns add {name}: {out:?}");
        std::fs::create_dir(mount.join(name).as_path())?;
        std::fs::create_dir(mount.join(name).join("child"))?;
    }
    let removed = sweep_stale(&format!("sl-{}-", b36(dead_pid)));
    let still = netns::list()?;
    let live_left = still.contains(&live) && mount.join(&live).exists();
    // Clean the live one by hand whatever happened.
    let _ = Command::new("ip").args(["netns", "del", &live]).status();
    let _ = std::fs::remove_dir(mount.join(&live).join("child"));
    let _ = std::fs::remove_dir(mount.join(&live));
    // Another test process starting now may sweep it first: check it is
    // gone, not who removed it.
    removed?;
    assert!(!still.contains(&stale) && !mount.join(&stale).exists());
    assert!(live_left, "a live owner's names must survive the sweep");
    assert!(sweep_stale("cni-").is_err(), "foreign prefixes are refused");
    Ok(())
}

#[test]
fn peer_bin_is_the_cargo_built_binary() -> Result<()> {
    let found = std::fs::canonicalize(peer_bin())?;
    assert_eq!(found, std::fs::canonicalize(env!("CARGO_BIN_EXE_sluice-peer"))?);
    Ok(())
}

/// The traffic tool on loopback in the current netns (no root needed).
#[test]
fn peer_modes_on_loopback() -> Result<()> {
    for (mode, expect) in [("echo", "echo"), ("discard-then-report", "report"), ("sink", "none")] {
        let mut server = peer()
            .args(["serve", "--once", "--listen", "127.0.0.1:0", "--mode", mode])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().context("stdout")?), &mut line)?;
        let addr = line.trim().strip_prefix("LISTENING ").context("LISTENING line")?;
        let out = peer()
            .args(["send", "--connect", addr, "--bytes", "300001", "--chunk", "7777"])
            .args(["--expect", expect])
            .output()?;
        let report: SendReport = serde_json::from_slice(&out.stdout)?;
        assert!(out.status.success() && report.ok, "{mode}: {report:?} {out:?}");
        assert_eq!(report.bytes_sent, 300001);
        if expect != "none" {
            assert_eq!(report.bytes_verified, 300001, "{mode}");
        }
        assert!(server.wait()?.success(), "{mode}: --once server must exit cleanly");
    }
    Ok(())
}

/// A corrupting echo server: `send` must report the exact offset and fail.
#[test]
fn peer_send_detects_corruption() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let corrupter = std::thread::spawn(move || -> std::io::Result<()> {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept()?;
        let mut all = Vec::new();
        s.read_to_end(&mut all)?;
        all[12345] ^= 1;
        s.write_all(&all)
    });
    let out = peer().args(["send", "--connect", &addr.to_string(), "--bytes", "50000"]).output()?;
    corrupter.join().expect("corrupter")?;
    let report: SendReport = serde_json::from_slice(&out.stdout)?;
    assert!(!out.status.success() && !report.ok);
    assert_eq!(report.first_mismatch_offset, Some(12345));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mismatch at offset 12345"));
    Ok(())
}
