//! End to end through two real `sluice run` agents on two simulated nodes.
//!
//! Topology: node1 has enrolled pods a1 (sa sleep), a2 (sa sleep2) and the
//! unenrolled pod u1; node2 has enrolled pods b1 (sa httpbin), b2 (namespace
//! other) and the unenrolled pod u2. Everything is observed from outside the
//! agents: bytes at the apps, the client IP the app saw, metrics, config dumps
//! and the rules inside pod netns.
//!
//! Every test runs once per capture mode in `MODES`; the eBPF mode joins the
//! list when its backend lands, with the same assertions.
//!
//! A transfer that must survive a change (drain, upgrade, rotation) is paced
//! ([`RATE`]) and its progress read while it runs ([`Flow`]): the test proves
//! bytes were verified before the change and after it, not merely that a
//! transfer which may have ended first came out whole. A refusal is checked
//! as one ([`assert_reset`]): the client is reset at once with 0 bytes, the
//! app never sees the connection, the refusal's counter moves by exactly
//! one, and the agents are still alive; a crash or a timeout does not pass.

use std::{
    process::Command,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, write_atomic, Mesh},
    peer_bin, require_root, spawn_in,
    traffic::{echo_server, send, send_verified},
    Agent, ChildGuard, Node, Pod, SendReport, Topology,
};

const MODES: &[&str] = &["iptables", "ebpf"];
const T: Duration = Duration::from_secs(60);
/// The pace of the transfers that must be in flight across a change (drain,
/// upgrade, rotation), bytes per second: slow enough that the change lands
/// mid-transfer, fast enough to finish within the agent's 10 s drain.
const RATE: u64 = 1 << 20;

struct Fixture {
    mesh: Mesh,
    n1: Node,
    n2: Node,
    a1: Pod,
    a2: Pod,
    u1: Pod,
    b1: Pod,
    u2: Pod,
    // Dropped last: agents and servers die with it.
    _topo: Topology,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let (a1, a2, u1) = (n1.add_pod("a1")?, n1.add_pod("a2")?, n1.add_pod("u1")?);
    let (b1, b2, u2) = (n2.add_pod("b1")?, n2.add_pod("b2")?, n2.add_pod("u2")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&a1, "default", "sleep", true);
    mesh.add(&a2, "default", "sleep2", true);
    mesh.add(&u1, "default", "legacy", false);
    mesh.add(&b1, "default", "httpbin", true);
    mesh.add(&b2, "other", "httpbin", true);
    mesh.add(&u2, "default", "legacy", false);
    mesh.write_config()?;
    Ok(Fixture { mesh, n1, n2, a1, a2, u1, b1, u2, _topo: topo })
}

fn agents(f: &Fixture, mode: &str) -> Result<(Agent, Agent)> {
    Ok((f.mesh.start_agent(&f.n1, mode)?, f.mesh.start_agent(&f.n2, mode)?))
}

/// Waits for `cond` (a config reload is polled every 250 ms).
fn eventually(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("timed out waiting for {what}")
}

fn metrics(node: &Node) -> Result<String> {
    http_get(node, 15020, "/metrics")
}

/// One counter of `node`'s agent, summed over the samples whose labels
/// contain every `needle`.
fn count(node: &Node, name: &str, needles: &[&str]) -> Result<u64> {
    Ok(metric_sum(&metrics(node)?, name, needles))
}

/// A refusal as the client sees it: the connection was reset (ECONNRESET;
/// EPIPE or ENOTCONN when the writer met the reset first), no byte came
/// back, and it came at once. A timeout, a refused connect (no agent
/// listening) or a clean close (an empty echo) are not refusals.
fn assert_reset(what: &str, r: &SendReport) -> Result<String> {
    let error = r.error.clone().unwrap_or_default();
    ensure!(!r.ok && r.bytes_verified == 0, "{what}: must fail with 0 bytes back: {r:?}");
    ensure!(
        ["os error 104", "os error 32", "os error 107"].iter().any(|e| error.contains(e)),
        "{what}: the client must see a reset (ECONNRESET/EPIPE/ENOTCONN), not: {r:?}"
    );
    ensure!(r.elapsed_ms < 5_000, "{what}: the reset took {} ms: a timeout, not a refusal: {r:?}", r.elapsed_ms);
    Ok(error.rsplit(": ").next().unwrap_or(&error).to_owned())
}

/// The `PEER` lines `server` (started with `--print-peer`) printed within
/// `wait`: one per connection its app accepted.
fn app_connections(server: &mut ChildGuard, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match server.next_line(Duration::from_millis(100)) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {}
        }
    }
    server.lines_seen().iter().filter(|l| l.starts_with("PEER ")).count()
}

/// The agent process is still alive (not exited, not a zombie): a refusal
/// must not be a crash.
fn alive(agent: &Agent) -> Result<()> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid()))
        .with_context(|| format!("agent {} is gone", agent.pid()))?;
    let state = stat.rsplit(") ").next().and_then(|r| r.chars().next()).unwrap_or('?');
    ensure!(!matches!(state, 'Z' | 'X'), "agent {} has exited (state {state}):\n{}", agent.pid(), agent.stderr());
    Ok(())
}

/// One `PROGRESS` line of a [`Flow`].
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// When the test read it: it was printed before this.
    read: Instant,
    /// The peer's clock: ms since it started receiving.
    ms: u64,
    verified: u64,
}

/// A paced `sluice-peer send` (echo, checked byte for byte) whose progress
/// is read while it runs, so a test can prove the transfer was in flight
/// across a change: bytes verified before it and bytes verified after it.
struct Flow {
    total: u64,
    /// Taken just before the spawn: the peer's clock starts later, so a line
    /// stamped `ms` was printed no earlier than `spawned + ms`.
    spawned: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    done: Option<JoinHandle<Result<SendReport>>>,
}

impl Flow {
    fn start(from: &Pod, addr: &str, total: u64) -> Result<Flow> {
        let mut cmd = Command::new(peer_bin());
        cmd.args(["send", "--connect", addr, "--bytes", &total.to_string(), "--rate", &RATE.to_string()]).args([
            "--progress-ms",
            "100",
            "--timeout-secs",
            "120",
        ]);
        let spawned = Instant::now();
        let mut child = spawn_in(from, cmd)?;
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let sink = samples.clone();
        let done = std::thread::spawn(move || -> Result<SendReport> {
            let mut report = None;
            while let Some(line) = child.next_line(Duration::from_secs(130))? {
                if let Some(rest) = line.strip_prefix("PROGRESS ") {
                    let f: Vec<u64> = rest.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                    if let [ms, _sent, verified] = f[..] {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push(Sample {
                            read: Instant::now(),
                            ms,
                            verified,
                        });
                    }
                } else if line.starts_with('{') {
                    report = Some(serde_json::from_str::<SendReport>(&line).with_context(|| format!("report {line}"))?);
                }
            }
            let out = child.finish(Duration::from_secs(10))?;
            report.with_context(|| format!("sluice-peer printed no report: {}", String::from_utf8_lossy(&out.stderr)))
        });
        Ok(Flow { total, spawned, samples, done: Some(done) })
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn wait_verified(&self, bytes: u64) -> Result<()> {
        let deadline = Instant::now() + T;
        while self.samples().last().map_or(0, |s| s.verified) < bytes {
            ensure!(Instant::now() < deadline, "the flow did not reach {bytes} verified bytes: {:?}", self.samples());
            ensure!(self.done.as_ref().is_some_and(|d| !d.is_finished()), "the flow ended before {bytes} bytes");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Bytes certainly verified before `t`: the last line read by then.
    fn verified_before(&self, t: Instant) -> u64 {
        self.samples().iter().filter(|s| s.read <= t).map(|s| s.verified).max().unwrap_or(0)
    }

    /// Bytes certainly verified after `t`: everything past the first line
    /// printed after `t` (that line's count is at least the count at `t`).
    fn verified_after(&self, t: Instant) -> u64 {
        let first_after = self.samples().into_iter().find(|s| self.spawned + Duration::from_millis(s.ms) > t);
        first_after.map_or(0, |s| self.total - s.verified)
    }

    /// Waits for the end; the report must be byte-exact.
    fn finish(&mut self) -> Result<SendReport> {
        let done = self.done.take().context("finished once")?;
        let report = done.join().map_err(|_| anyhow::anyhow!("flow thread panicked"))??;
        ensure!(report.ok && report.bytes_verified == self.total, "paced transfer not byte-exact: {report:?}");
        Ok(report)
    }

    /// After [`Flow::finish`]: the transfer was in flight across `t` (`what`):
    /// bytes verified before it and after it. Returns both counts.
    fn spanned(&self, what: &str, t: Instant) -> Result<(u64, u64)> {
        let (before, after) = (self.verified_before(t), self.verified_after(t));
        ensure!(
            before > 0 && after > 0,
            "the transfer was not in flight across {what}: {before} bytes verified before it, {after} after \
             (of {}); samples: {:?}",
            self.total,
            self.samples().iter().map(|s| (s.ms, s.verified)).collect::<Vec<_>>()
        );
        Ok((before, after))
    }
}

/// Whether `pod`'s IPv4 address is in the agent's pinned WORKLOADS map, as
/// `bpftool` shows it to an operator (BTF-described: named fields).
fn mirrored(agent: &Agent, pod: &Pod) -> Result<bool> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(agent.pin_root.join("workloads"))
        .output()?;
    ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ip = pod.ipv4();
    let word = u32::from_ne_bytes(ip.octets()) as u64;
    Ok(entries.as_array().into_iter().flatten().any(|e| {
        let f = &e["formatted"];
        f["key"]["ip"][3].as_u64() == Some(word) && f["value"]["flags"].as_u64().is_some_and(|x| x & 1 == 1)
    }))
}

/// Whether capture is installed in `pod`'s netns, the way `mode` installs it.
fn captured(pod: &Pod, mode: &str) -> Result<bool> {
    let iptables = pod.exec_ok(&["iptables-save"])?.contains("SLUICE");
    if mode == "ebpf" {
        // eBPF mode must leave no iptables rules at all in the pod.
        ensure!(!iptables, "eBPF mode installed iptables rules in {}", pod.name());
        return Ok(pod.exec_ok(&["tc", "filter", "show", "dev", "eth0", "ingress"])?.contains("sluice_tc_ingress"));
    }
    Ok(iptables)
}

#[test]
fn cross_node_100mb_byte_exact_with_real_client_ip() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let f = fixture("hbone")?;
        let (ag1, ag2) = agents(&f, mode)?;
        let (mut srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &["--print-peer"])?;
        let report = send_verified(&f.a1, &addr, 100 << 20, Duration::from_secs(180))?;
        let peer = srv.wait_for_line("PEER ", Duration::from_secs(5))?;
        evidence(&format!(
            "[{mode}] a1 -> b1 over HBONE: {} bytes echoed byte-exact in {} ms; app saw {peer}",
            report.bytes_verified, report.elapsed_ms
        ));
        assert!(
            peer.starts_with(&format!("PEER {}:", f.a1.ipv4())),
            "the app must see the client pod's IP, saw {peer}"
        );

        let (m1, m2) = (metrics(&f.n1)?, metrics(&f.n2)?);
        let src_bytes = metric_sum(
            &m1,
            "istio_tcp_received_bytes_total",
            &["reporter=\"source\"", "connection_security_policy=\"mutual_tls\""],
        );
        let dst_conns = metric_sum(
            &m2,
            "istio_tcp_connections_closed_total",
            &[
                "reporter=\"destination\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
                "destination_principal=\"spiffe://cluster.local/ns/default/sa/httpbin\"",
            ],
        );
        evidence(&format!("[{mode}] node1 counted {src_bytes} bytes sent by a1; node2 counted {dst_conns} mTLS connections from sleep to httpbin"));
        assert!(src_bytes >= 100 << 20, "source agent did not count the bytes");
        assert_eq!(dst_conns, 1, "destination agent did not record exactly one mTLS connection:\n{m2}");
        let dump = http_get(&f.n1, 15000, "/config_dump")?;
        assert!(dump.contains(&format!("\"mode\": \"{mode}\"")), "config_dump must show the mode:\n{dump}");
        assert!(captured(&f.a1, mode)? && captured(&f.b1, mode)?, "capture must be installed the {mode} way");
        if *mode == "ebpf" {
            // The path taken: connect4 rewrote, getsockopt answered.
            let c = ag1.counters()?;
            evidence(&format!("[ebpf] node1 kernel counters: {c}"));
            assert!(c["outbound_captured"].as_u64() >= Some(1) && c["orig_dst_answered"].as_u64() >= Some(1), "{c}");
        }
        ag1.stop()?;
        ag2.stop()?;
    }
    Ok(())
}

#[test]
fn ipv6_pod_to_pod() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let f = fixture("v6")?;
        let _agents = agents(&f, mode)?;
        let (mut srv, addr) = echo_server(&f.b1, &format!("[{}]:8080", f.b1.ipv6()), &["--print-peer"])?;
        let report = send_verified(&f.a1, &addr, 8 << 20, T)?;
        let peer = srv.wait_for_line("PEER ", Duration::from_secs(5))?;
        evidence(&format!("[{mode}] IPv6 a1 -> b1: {} bytes verified; app saw {peer}", report.bytes_verified));
        assert!(peer.starts_with(&format!("PEER [{}]:", f.a1.ipv6())), "app saw {peer}");
        let m2 = metrics(&f.n2)?;
        assert!(
            metric_sum(&m2, "istio_tcp_connections_opened_total", &["reporter=\"destination\"", "mutual_tls"]) >= 1
        );
    }
    Ok(())
}

#[test]
fn policy_deny_then_allow_after_config_edit_without_restart() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let mut f = fixture("policy")?;
        let policy = |action: &str| {
            format!(
                "  - name: sleep-to-httpbin\n    namespace: default\n    action: {action}\n    rules:\n      - from: [{{ principals: [\"cluster.local/ns/default/sa/sleep\"] }}]\n        to: [{{ ports: [8080] }}]\n"
            )
        };
        f.mesh.policies_yaml = policy("DENY");
        f.mesh.write_config()?;
        let (ag1, ag2) = agents(&f, mode)?;
        let pid = ag2.pid();
        let (mut srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &["--print-peer"])?;
        // The refusal itself: node2 denies by the policy (counted once), node1
        // gets 401 for the CONNECT (counted once) and resets the client, the
        // app never sees a connection, and both agents live on.
        let denials = || count(&f.n2, "sluice_auth_denials_total", &["policy=\"default/sleep-to-httpbin\""]);
        let unauthorized = || count(&f.n1, "sluice_hbone_errors_total", &["direction=\"outbound\"", "status=\"401\""]);
        let (d0, u0) = (denials()?, unauthorized()?);
        let denied = send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
        let how = assert_reset("DENY a1 -> b1", &denied)?;
        let (d1, u1) = (denials()? - d0, unauthorized()? - u0);
        ensure!((d1, u1) == (1, 1), "one denied connection: node2 denials +{d1}, node1 outbound 401s +{u1}");
        ensure!(app_connections(&mut srv, Duration::from_millis(300)) == 0, "a denied client reached the app");
        alive(&ag1)?;
        alive(&ag2)?;
        // Another principal is not matched by the DENY rule.
        send_verified(&f.a2, &addr, 64 << 10, T)?;
        let reached = app_connections(&mut srv, Duration::from_millis(300));
        ensure!(reached == 1, "the allowed client must reach the app once, saw {reached}");

        f.mesh.policies_yaml = policy("ALLOW");
        f.mesh.write_config()?;
        eventually("the ALLOW policy to apply", || Ok(send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?.ok))?;
        send_verified(&f.a1, &addr, 1 << 20, T)?;
        // Once an ALLOW applies, anything it does not match is denied.
        let any_denial = || count(&f.n2, "sluice_auth_denials_total", &["reporter=\"destination\""]);
        let (d0, u0, seen) = (any_denial()?, unauthorized()?, app_connections(&mut srv, Duration::from_millis(300)));
        let other = send(&f.a2, &addr, 64 << 10, Duration::from_secs(10))?;
        assert_reset("sleep2, not matched by the ALLOW", &other)?;
        let (d1, u1) = (any_denial()? - d0, unauthorized()? - u0);
        ensure!((d1, u1) == (1, 1), "sleep2 refused once: node2 denials +{d1}, node1 outbound 401s +{u1}");
        let after = app_connections(&mut srv, Duration::from_millis(300));
        ensure!(after == seen, "sleep2 reached the app ({seen} -> {after} connections)");
        assert_eq!(ag2.pid(), pid, "the agent must not restart");
        let reloads = metric_sum(&metrics(&f.n2)?, "sluice_config_reloads_total", &["result=\"ok\""]);
        evidence(&format!(
            "[{mode}] DENY: a1 reset ({how}), 0 connections at the app, node2 denials +1, node1 outbound 401 +1; \
             ALLOW applied after {reloads} reload(s), same agent pid {pid}, sleep2 then refused the same way"
        ));
        assert!(reloads >= 1);
    }
    Ok(())
}

#[test]
fn unenrolled_pods_reach_enrolled_and_plain_pods() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let mut f = fixture("plain")?;
        let (ag1, _ag2) = agents(&f, mode)?;
        // Unenrolled u2 -> enrolled a1: captured at a1's 15006, policy applied.
        let (mut srv, addr) = echo_server(&f.a1, &format!("{}:8080", f.a1.ipv4()), &["--print-peer"])?;
        send_verified(&f.u2, &addr, 4 << 20, T)?;
        let peer = srv.wait_for_line("PEER ", Duration::from_secs(5))?;
        assert!(peer.starts_with(&format!("PEER {}:", f.u2.ipv4())), "app saw {peer}");
        let m1 = metrics(&f.n1)?;
        assert!(
            metric_sum(
                &m1,
                "istio_tcp_connections_opened_total",
                &["reporter=\"destination\"", "connection_security_policy=\"unknown\""]
            ) >= 1,
            "15006 path not taken:\n{m1}"
        );
        if *mode == "ebpf" {
            let c = ag1.counters()?;
            evidence(&format!("[ebpf] node1 kernel counters after plaintext inbound: {c}"));
            assert!(c["inbound_assigned"].as_u64() >= Some(1), "tc did not hand the SYN to 15006: {c}");
        }
        // Unenrolled -> unenrolled, across nodes: untouched.
        let (_srv2, addr2) = echo_server(&f.u1, &format!("{}:9090", f.u1.ipv4()), &[])?;
        send_verified(&f.u2, &addr2, 4 << 20, T)?;
        // Enrolled -> unenrolled: passthrough from inside the pod.
        send_verified(&f.b1, &addr2, 4 << 20, T)?;
        let m2 = metrics(&f.n2)?;
        assert!(
            metric_sum(
                &m2,
                "istio_tcp_connections_opened_total",
                &["reporter=\"source\"", "destination_workload=\"u1\"", "connection_security_policy=\"unknown\""]
            ) >= 1,
            "passthrough not counted:\n{m2}"
        );

        // Policy applies to plaintext clients: an ALLOW for mTLS principals
        // only shuts out u2 before any byte reaches the app.
        f.mesh.policies_yaml = "  - name: mtls-only\n    namespace: default\n    action: ALLOW\n    rules:\n      - from: [{ principals: [\"*\"] }]\n".into();
        f.mesh.write_config()?;
        eventually("the mtls-only policy to deny u2", || Ok(!send(&f.u2, &addr, 4096, Duration::from_secs(10))?.ok))?;
        // Count what one more denied attempt adds: a reset at u2, one denial
        // on node1, no connection at the app.
        let denials = || count(&f.n1, "sluice_auth_denials_total", &["reporter=\"destination\""]);
        let (before, d0) = (app_connections(&mut srv, Duration::from_millis(300)), denials()?);
        let denied = send(&f.u2, &addr, 4096, Duration::from_secs(10))?;
        let how = assert_reset("plaintext u2 -> a1 under mtls-only", &denied)?;
        let moved = denials()? - d0;
        ensure!(moved == 1, "the denied plaintext connection must be counted once on node1, moved {moved}");
        let after = app_connections(&mut srv, Duration::from_millis(300));
        ensure!(before == after, "a denied plaintext client reached the app ({before} -> {after})");
        alive(&ag1)?;
        // The meshed client is still allowed.
        send_verified(&f.b1, &addr, 1 << 20, T)?;
        evidence(&format!("[{mode}] u2->a1 via 15006 with real IP, u2->u1 untouched, b1->u1 passthrough, mtls-only policy shut u2 out (reset: {how}; node1 denials +1; app reached 0 times)"));
    }
    Ok(())
}

#[test]
fn wrong_san_and_foreign_trust_domain_are_refused() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let f = fixture("authn")?;
        // node1's agent believes b1 runs as "impostor": the certificate b1's
        // agent presents (sa httpbin) does not carry the SAN it expects.
        let wrong = f.mesh.render().replace("serviceAccount: httpbin", "serviceAccount: impostor");
        let wrong_path = f.mesh.dir.path().join("wrong-san.yaml");
        write_atomic(&wrong_path, &wrong)?;
        let ag1 = f.mesh.start_agent_with(&f.n1, mode, &wrong_path)?;
        let ag2 = f.mesh.start_agent(&f.n2, mode)?;
        let (mut srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &["--print-peer"])?;
        // node1 checks the server's SAN in the handshake and refuses the dial:
        // connect_failed, once; the client is reset; b1's app sees nothing.
        let failed =
            || count(&f.n1, "sluice_hbone_errors_total", &["direction=\"outbound\"", "status=\"connect_failed\""]);
        let e0 = failed()?;
        let r = send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
        let how_san = assert_reset("a server with the wrong SAN", &r)?;
        let errors = failed()? - e0;
        ensure!(
            errors == 1,
            "the refused dial must be counted once as connect_failed, moved {errors}:\n{}\nagent log:\n{}",
            metrics(&f.n1)?,
            ag1.stderr()
        );
        ensure!(app_connections(&mut srv, Duration::from_millis(300)) == 0, "the wrong-SAN attempt reached the app");
        alive(&ag2)?;
        ag1.stop()?;

        // node1's agent now runs in trust domain other.local with its own CA:
        // node2 refuses its client certificates.
        let other_ca = f.mesh.dir.path().join("other-ca");
        let out = std::process::Command::new(sluice_tests::agent_bin())
            .args(["ca", "init", "--dir"])
            .arg(&other_ca)
            .output()?;
        ensure!(out.status.success());
        let foreign = f
            .mesh
            .render()
            .replace("trustDomain: cluster.local", "trustDomain: other.local")
            .replace(&f.mesh.ca_dir().display().to_string(), &other_ca.display().to_string());
        let foreign_path = f.mesh.dir.path().join("foreign.yaml");
        write_atomic(&foreign_path, &foreign)?;
        let ag1 = f.mesh.start_agent_with(&f.n1, mode, &foreign_path)?;
        // node2 refuses the client certificate in the handshake; node1 counts
        // the failed dial once and resets the client; the app sees nothing.
        let e0 = failed()?;
        let r = send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
        let how_td = assert_reset("a client from another trust domain", &r)?;
        let errors_td = failed()? - e0;
        ensure!(
            errors_td == 1,
            "the refused dial must be counted once as connect_failed, moved {errors_td}:\n{}\nagent log:\n{}",
            metrics(&f.n1)?,
            ag1.stderr()
        );
        ensure!(app_connections(&mut srv, Duration::from_millis(300)) == 0, "the foreign client reached the app");
        alive(&ag1)?;
        alive(&ag2)?;
        // Control: a pod of node2's own mesh still gets through.
        let (_srv3, addr3) = echo_server(&f.b1, &format!("{}:8081", f.b1.ipv4()), &[])?;
        send_verified(&f.u2, &addr3, 64 << 10, T)?;
        evidence(&format!("[{mode}] wrong SAN refused (reset: {how_san}; connect_failed +{errors}), foreign trust domain refused (reset: {how_td}; connect_failed +{errors_td}); the app saw neither"));
        drop(ag2);
    }
    Ok(())
}

#[test]
fn pod_leaving_takes_its_rules_listeners_and_certificate() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let mut f = fixture("leave")?;
        let (ag1, _ag2) = agents(&f, mode)?;
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
        send_verified(&f.a2, &addr, 64 << 10, T)?;
        let listening =
            |pod: &Pod| -> Result<bool> { Ok(pod.exec_ok(&["ss", "-Hltn", "sport = :15001"])?.contains("15001")) };
        let rules = |pod: &Pod| captured(pod, mode);
        assert!(listening(&f.a2)? && rules(&f.a2)?, "a2 must be enrolled first");
        assert!(http_get(&f.n1, 15000, "/config_dump")?.contains("sa/sleep2"));

        if *mode == "ebpf" {
            assert!(mirrored(&ag1, &f.a2)?, "a2's address must be in the WORKLOADS map while enrolled");
        }

        f.mesh.pods.retain(|p| p.pod.name() != "a2");
        f.mesh.write_config()?;
        eventually("a2 to be unenrolled", || Ok(!listening(&f.a2)?))?;
        if *mode == "ebpf" {
            assert!(!mirrored(&ag1, &f.a2)?, "a2's address must leave the WORKLOADS map with it");
            assert!(mirrored(&ag1, &f.a1)?, "a1 must stay in the WORKLOADS map");
        }
        assert!(!rules(&f.a2)?, "iptables rules left in a2's netns");
        assert!(!f.a2.exec_ok(&["ip", "rule"])?.contains("0x111"), "ip rule left in a2's netns");
        let dump = http_get(&f.n1, 15000, "/config_dump")?;
        assert!(!dump.contains("sa/sleep2"), "a2's certificate is still cached:\n{dump}");
        // a1 is untouched.
        send_verified(&f.a1, &addr, 64 << 10, T)?;
        evidence(&format!("[{mode}] a2 left: no listeners, no rules, no ip rule, no certificate; a1 still meshed"));
    }
    Ok(())
}

/// The `cert_not_after` of pod `uid` in an agent's /config_dump.
fn cert_not_after(node: &Node, uid: &str) -> Result<String> {
    let dump: serde_json::Value = serde_json::from_str(&http_get(node, 15000, "/config_dump")?)?;
    let pod = dump["pods"].as_array().and_then(|p| p.iter().find(|p| p["uid"] == uid)).cloned().unwrap_or_default();
    Ok(pod["cert_not_after"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn certificates_rotate_at_half_life_without_dropping_connections() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let mut f = fixture("rotate")?;
        f.mesh.cert_ttl = "4s".into();
        f.mesh.write_config()?;
        let _agents = agents(&f, mode)?;
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
        send_verified(&f.a1, &addr, 64 << 10, T)?;
        // A paced transfer that outlives a rotation of both ends' certificates
        // (TTL 4 s: a new one every 2 s or so).
        let mut flow = Flow::start(&f.a1, &addr, 8 * RATE)?;
        flow.wait_verified(256 << 10)?;
        // Bytes verified before `t_first` crossed under `first` (or older).
        let t_first = Instant::now();
        let first = (cert_not_after(&f.n1, "default/a1")?, cert_not_after(&f.n2, "default/b1")?);
        ensure!(!first.0.is_empty() && !first.1.is_empty(), "no certificates in /config_dump: {first:?}");
        let mut second = first.clone();
        let deadline = Instant::now() + Duration::from_secs(15);
        while second.0 == first.0 || second.1 == first.1 {
            ensure!(Instant::now() < deadline, "the certificates were not rotated: {first:?} -> {second:?}");
            std::thread::sleep(Duration::from_millis(100));
            second = (cert_not_after(&f.n1, "default/a1")?, cert_not_after(&f.n2, "default/b1")?);
        }
        // Both ends rotated before `t_rotated`.
        let t_rotated = Instant::now();
        let report = flow.finish()?;
        let (before, after) = flow.spanned("the rotation of both certificates", t_rotated)?;
        ensure!(flow.verified_before(t_first) > 0, "no byte verified before the old certificates were read");
        send_verified(&f.a1, &addr, 64 << 10, T)?;
        evidence(&format!(
            "[{mode}] a1 not_after {} -> {}, b1 {} -> {} while a {} byte transfer at {} KiB/s ran on: {} bytes \
             verified before the old certificates were read, {before} before both had rotated, {after} after; \
             byte-exact in {} ms",
            first.0,
            second.0,
            first.1,
            second.1,
            report.bytes_verified,
            RATE >> 10,
            flow.verified_before(t_first),
            report.elapsed_ms
        ));
        ensure!(
            second.0 > first.0 && second.1 > first.1,
            "rotation must move not_after forward: {first:?} -> {second:?}"
        );
    }
    Ok(())
}

#[test]
fn sigterm_drains_in_flight_streams() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let f = fixture("drain")?;
        let (_ag1, ag2) = agents(&f, mode)?;
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
        // 8 s at the pace: SIGTERM lands early in it, and the rest must cross
        // during the destination agent's 10 s drain.
        let mut flow = Flow::start(&f.a1, &addr, 8 * RATE)?;
        flow.wait_verified(512 << 10)?;
        // SIGTERM the destination agent mid-transfer: GOAWAY, then the open
        // stream runs to completion before the agent exits. The signal goes
        // out within microseconds of `t_term`; 100 ms of margin.
        let t_term = Instant::now();
        let log = ag2.stop()?;
        let exited = t_term.elapsed();
        let report = flow.finish()?;
        let (before, after) = flow.spanned("SIGTERM of the destination agent", t_term + Duration::from_millis(100))?;
        evidence(&format!(
            "[{mode}] destination agent SIGTERMed mid-transfer: {before} bytes verified before, {after} after it \
             (at {} KiB/s); all {} byte-exact; the agent exited {} ms after the signal",
            RATE >> 10,
            report.bytes_verified,
            exited.as_millis()
        ));
        assert!(log.contains("shutting down"), "agent log:\n{log}");
        assert!(!log.contains("drain period over"), "the drain must not cut the transfer:\n{log}");
    }
    Ok(())
}

#[test]
fn missing_kernel_feature_falls_back_to_iptables_with_the_reason() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("fallback")?;
    // The test-only switch makes the probe report bpf_sk_assign as missing.
    let env = [("SLUICE_TEST_PROBE_MISSING", "sk_assign@sched_cls")];
    let config = f.mesh.config_path();
    let refused = f.mesh.start_agent_env(&f.n1, "ebpf", &config, &env);
    let err = format!("{:#}", refused.err().expect("--redirect ebpf must refuse to start without sk_assign"));
    assert!(
        err.contains("sk_assign@sched_cls") && err.contains("kernel"),
        "the refusal must name the piece and the kernel: {err}"
    );

    let ag1 = f.mesh.start_agent_env(&f.n1, "auto", &config, &env)?;
    let _ag2 = f.mesh.start_agent(&f.n2, "auto")?;
    let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
    send_verified(&f.a1, &addr, 1 << 20, T)?;
    assert!(captured(&f.a1, "iptables")?, "the fallback must capture with iptables");
    assert!(http_get(&f.n1, 15021, "/healthz/ready")?.contains("mode: iptables"));
    assert!(http_get(&f.n2, 15021, "/healthz/ready")?.contains("mode: ebpf"), "node2 has everything: eBPF");
    let log = ag1.stderr();
    let line = log.lines().find(|l| l.contains("falling back to iptables")).unwrap_or_default().to_owned();
    assert!(line.contains("sk_assign@sched_cls"), "the fallback must be logged with its reason:\n{log}");
    assert!(metric_sum(&metrics(&f.n1)?, "sluice_redirect_mode", &["mode=\"iptables\""]) == 1);
    evidence(&format!("fallback: node1 meshed through iptables; logged: {}", line.trim()));
    Ok(())
}

#[test]
fn upgrade_starts_new_agent_beside_old_without_dropping_connections() -> Result<()> {
    require_root!(Ok(()));
    for mode in MODES {
        let f = fixture("upgrade")?;
        let (old, _ag2) = agents(&f, mode)?;
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
        // A paced transfer in flight through the old agent: under way before
        // the new agent starts, still running when the old one is stopped,
        // and done within the old one's 10 s drain.
        let mut flow = Flow::start(&f.a1, &addr, 8 * RATE)?;
        flow.wait_verified(256 << 10)?;
        // The new agent binds beside the old one (SO_REUSEPORT everywhere) and
        // adopts the pinned maps; then the old one is stopped.
        let t_new = Instant::now();
        let new = f.mesh.start_agent(&f.n1, mode)?;
        let t_term = Instant::now();
        let old_log = old.stop()?;
        let report = flow.finish()?;
        let before_new = flow.verified_before(t_new);
        ensure!(before_new > 0, "no byte was verified before the new agent started: {:?}", flow.samples());
        let (before, after) = flow.spanned("SIGTERM of the old agent", t_term + Duration::from_millis(100))?;
        // Connections opened after the handover go through the new agent.
        for _ in 0..5 {
            send_verified(&f.a1, &addr, 256 << 10, T)?;
        }
        let m = metrics(&f.n1)?;
        assert!(metric_sum(&m, "istio_tcp_connections_opened_total", &["reporter=\"source\""]) >= 5, "{m}");
        assert!(old_log.contains("shutting down"));
        assert!(!old_log.contains("drain period over"), "the drain must not cut the transfer:\n{old_log}");
        evidence(&format!(
            "[{mode}] upgrade: of a {} byte transfer at {} KiB/s through the old agent, {before_new} bytes were \
             verified before the new agent started, {before} before the old one got SIGTERM and {after} after; \
             byte-exact; new agent pid {} carried the next 5 connections",
            report.bytes_verified,
            RATE >> 10,
            new.pid()
        ));
    }
    Ok(())
}

/// The checks above can fail: a timeout, a refused connect or a clean close
/// is not a refusal, and a change that missed the transfer is not an overlap
/// (no root needed: synthetic reports and samples).
#[test]
fn refusal_and_overlap_checks_fail_when_they_should() {
    let report = |ok: bool, verified: u64, error: &str, elapsed_ms: u64| SendReport {
        ok,
        bytes_verified: verified,
        error: (!error.is_empty()).then(|| error.to_owned()),
        elapsed_ms,
        ..Default::default()
    };
    let reset = "read after 0 bytes back: Connection reset by peer (os error 104)";
    assert!(assert_reset("reset", &report(false, 0, reset, 40)).is_ok());
    for (what, r) in [
        ("timeout", report(false, 0, "timed out after 0 bytes back", 10_000)),
        ("slow reset", report(false, 0, reset, 9_000)),
        ("connect refused", report(false, 0, "connect 10.0.0.1:80: Connection refused (os error 111)", 1)),
        ("clean close", report(false, 0, "verified 0 of 65536 bytes", 5)),
        ("bytes came back", report(false, 4096, reset, 40)),
        ("success", report(true, 65536, "", 40)),
    ] {
        assert!(assert_reset(what, &r).is_err(), "{what} passed as a refusal");
    }

    let flow = |samples: &[(u64, u64)]| {
        let spawned = Instant::now();
        let s = samples
            .iter()
            .map(|&(ms, verified)| Sample { read: spawned + Duration::from_millis(ms + 5), ms, verified })
            .collect();
        (Flow { total: 1000, spawned, samples: Arc::new(Mutex::new(s)), done: None }, spawned)
    };
    let (f, t0) = flow(&[(100, 100), (200, 300), (300, 600), (400, 1000)]);
    assert_eq!(f.spanned("mid", t0 + Duration::from_millis(250)).unwrap(), (300, 400));
    // The change came after the last byte, or before the first.
    assert!(f.spanned("after the end", t0 + Duration::from_millis(450)).is_err());
    assert!(f.spanned("before the start", t0 + Duration::from_millis(50)).is_err());
    // A line read after the change but printed before it proves nothing after it.
    let (f, t0) = flow(&[(100, 100), (200, 1000)]);
    assert!(f.spanned("late read", t0 + Duration::from_millis(203)).is_err());
}
