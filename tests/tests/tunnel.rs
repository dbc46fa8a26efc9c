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

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, write_atomic, Mesh},
    require_root,
    traffic::{echo_server, send, send_verified},
    Agent, Node, Pod, Topology,
};

const MODES: &[&str] = &["iptables", "ebpf"];
const T: Duration = Duration::from_secs(60);

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
        let (_ag1, ag2) = agents(&f, mode)?;
        let pid = ag2.pid();
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;

        let denied = send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
        assert!(!denied.ok && denied.bytes_verified == 0, "DENY must stop the connection: {denied:?}");
        let denials =
            metric_sum(&metrics(&f.n2)?, "sluice_auth_denials_total", &["policy=\"default/sleep-to-httpbin\""]);
        assert!(denials >= 1, "the denial must be counted");
        // Another principal is not matched by the DENY rule.
        send_verified(&f.a2, &addr, 64 << 10, T)?;

        f.mesh.policies_yaml = policy("ALLOW");
        f.mesh.write_config()?;
        eventually("the ALLOW policy to apply", || Ok(send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?.ok))?;
        send_verified(&f.a1, &addr, 1 << 20, T)?;
        // Once an ALLOW applies, anything it does not match is denied.
        let other = send(&f.a2, &addr, 64 << 10, Duration::from_secs(10))?;
        assert!(!other.ok && other.bytes_verified == 0, "sleep2 is not allowed by the ALLOW policy: {other:?}");
        assert_eq!(ag2.pid(), pid, "the agent must not restart");
        let reloads = metric_sum(&metrics(&f.n2)?, "sluice_config_reloads_total", &["result=\"ok\""]);
        evidence(&format!(
            "[{mode}] DENY held ({denials} denials), ALLOW applied after {reloads} reload(s), same agent pid {pid}"
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
        // Read every PEER line printed so far, then count what one more
        // denied attempt adds: nothing.
        while let Ok(Some(_)) = srv.next_line(Duration::from_millis(300)) {}
        let before = srv.lines_seen().iter().filter(|l| l.starts_with("PEER")).count();
        let denied = send(&f.u2, &addr, 4096, Duration::from_secs(10))?;
        assert!(!denied.ok && denied.bytes_verified == 0);
        while let Ok(Some(_)) = srv.next_line(Duration::from_millis(300)) {}
        let after = srv.lines_seen().iter().filter(|l| l.starts_with("PEER")).count();
        assert_eq!(before, after, "a denied plaintext client must never reach the app");
        // The meshed client is still allowed.
        send_verified(&f.b1, &addr, 1 << 20, T)?;
        evidence(&format!("[{mode}] u2->a1 via 15006 with real IP, u2->u1 untouched, b1->u1 passthrough, mtls-only policy shut u2 out"));
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
        let (_srv, addr) = echo_server(&f.b1, &format!("{}:8080", f.b1.ipv4()), &[])?;
        let r = send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
        assert!(!r.ok && r.bytes_verified == 0, "a server with the wrong SAN must be refused: {r:?}");
        let errors = metric_sum(&metrics(&f.n1)?, "sluice_hbone_errors_total", &["direction=\"outbound\""]);
        assert!(errors >= 1, "the refusal must be counted:\n{}\nagent log:\n{}", metrics(&f.n1)?, ag1.stderr());
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
        let _ag1 = f.mesh.start_agent_with(&f.n1, mode, &foreign_path)?;
        let r = send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
        assert!(!r.ok && r.bytes_verified == 0, "a client from another trust domain must be refused: {r:?}");
        // Control: a pod of node2's own mesh still gets through.
        let (_srv3, addr3) = echo_server(&f.b1, &format!("{}:8081", f.b1.ipv4()), &[])?;
        send_verified(&f.u2, &addr3, 64 << 10, T)?;
        evidence(&format!("[{mode}] wrong SAN refused ({errors} outbound HBONE errors), foreign trust domain refused"));
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
        let first = cert_not_after(&f.n2, "default/b1")?;
        // A transfer that spans several rotations of both ends' certificates.
        let (a1, addr2) = (f.a1.clone(), addr.clone());
        let long = std::thread::spawn(move || send_verified(&a1, &addr2, 150 << 20, Duration::from_secs(120)));
        std::thread::sleep(Duration::from_secs(3));
        let second = cert_not_after(&f.n2, "default/b1")?;
        let report = long.join().expect("transfer thread")?;
        send_verified(&f.a1, &addr, 64 << 10, T)?;
        evidence(&format!(
            "[{mode}] b1 certificate not_after {first} -> {second} while a {} byte transfer ran uninterrupted ({} ms)",
            report.bytes_verified, report.elapsed_ms
        ));
        assert!(!first.is_empty() && second > first, "b1's certificate was not rotated: {first} -> {second}");
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
        let (a1, addr2) = (f.a1.clone(), addr.clone());
        let transfer = std::thread::spawn(move || send_verified(&a1, &addr2, 60 << 20, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(700));
        // SIGTERM the destination agent mid-transfer: GOAWAY, then the open
        // stream runs to completion before the agent exits.
        let log = ag2.stop()?;
        let report = transfer.join().expect("transfer thread")?;
        evidence(&format!(
            "[{mode}] destination agent stopped mid-transfer; {} bytes still arrived byte-exact",
            report.bytes_verified
        ));
        assert!(log.contains("shutting down"), "agent log:\n{log}");
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
        // A transfer in flight through the old agent.
        let (a1, addr2) = (f.a1.clone(), addr.clone());
        let inflight = std::thread::spawn(move || send_verified(&a1, &addr2, 60 << 20, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(300));
        // The new agent binds beside the old one (SO_REUSEPORT everywhere) and
        // adopts the pinned maps; then the old one is stopped.
        let new = f.mesh.start_agent(&f.n1, mode)?;
        let old_log = old.stop()?;
        let report = inflight.join().expect("transfer thread")?;
        // Connections opened after the handover go through the new agent.
        for _ in 0..5 {
            send_verified(&f.a1, &addr, 256 << 10, T)?;
        }
        let m = metrics(&f.n1)?;
        assert!(metric_sum(&m, "istio_tcp_connections_opened_total", &["reporter=\"source\""]) >= 5, "{m}");
        assert!(old_log.contains("shutting down"));
        evidence(&format!(
            "[{mode}] upgrade: {} bytes in flight through the old agent arrived byte-exact; new agent pid {} carried the next 5 connections",
            report.bytes_verified,
            new.pid()
        ));
    }
    Ok(())
}
