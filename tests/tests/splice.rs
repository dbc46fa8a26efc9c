//! Same-node splice in eBPF mode: two enrolled pods on one node, one real
//! agent. After authorization the kernel moves the bytes; these tests prove
//! the bytes arrive exactly (from the first one the client writes, through
//! both half-closes), that they did not pass through the agent process
//! (/proc/<pid>/io), and that they are still counted.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    output_in, peer_bin, require_root,
    traffic::{echo_server, send_verified},
    Agent, Node, PinDir, Pod, SendReport, Topology,
};

const T: Duration = Duration::from_secs(120);

struct Fixture {
    mesh: Mesh,
    node: Node,
    a1: Pod,
    a2: Pod,
    _topo: Topology,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let node = topo.add_node("node1")?;
    let (a1, a2) = (node.add_pod("a1")?, node.add_pod("a2")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&a1, "default", "sleep", true);
    mesh.add(&a2, "default", "httpbin", true);
    mesh.write_config()?;
    Ok(Fixture { mesh, node, a1, a2, _topo: topo })
}

fn counter(c: &serde_json::Value, name: &str) -> u64 {
    c[name].as_u64().unwrap_or(0)
}

/// Bytes the agent process itself read and wrote through syscalls.
fn agent_io(agent: &Agent) -> Result<(u64, u64)> {
    let path = format!("/proc/{}/io", agent.pid());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        let line = text.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} in {path}"))?;
        Ok(line[name.len()..].trim().parse()?)
    };
    Ok((field("rchar:")?, field("wchar:")?))
}

#[test]
fn same_node_100mb_is_spliced_byte_exact_and_counted() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("splice")?;
    let agent = f.mesh.start_agent(&f.node, "ebpf")?;
    let (mut srv, addr) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &["--print-peer"])?;
    let before = agent.counters()?;
    let (r0, w0) = agent_io(&agent)?;
    let report = send_verified(&f.a1, &addr, 100 << 20, T)?;
    let (r1, w1) = agent_io(&agent)?;
    let after = agent.counters()?;
    let peer = srv.wait_for_line("PEER ", Duration::from_secs(5))?;
    let spliced = counter(&after, "spliced_bytes") - counter(&before, "spliced_bytes");
    let missing = counter(&after, "splice_target_missing") - counter(&before, "splice_target_missing");
    evidence(&format!(
        "a1 -> a2 same node: 100 MiB echoed byte-exact in {} ms; app saw {peer}; kernel spliced {spliced} bytes, \
         {missing} send(s) found the agent's socket gone; agent read {} and wrote {} bytes itself",
        report.elapsed_ms,
        r1 - r0,
        w1 - w0
    ));
    assert!(peer.starts_with(&format!("PEER {}:", f.a1.ipv4())), "the app must see the client pod's IP, saw {peer}");
    assert!(spliced >= 190 << 20, "nearly all of the 200 MiB (both ways) must be spliced, got {spliced}: {after}");
    assert_eq!(missing, 0, "no send may find the agent's socket gone: {after}");
    // 200 MiB crossed the node; the agent itself copied only what the client
    // sent before the splice was armed.
    assert!(
        r1 - r0 < 16 << 20 && w1 - w0 < 16 << 20,
        "the agent copied bytes itself: read {} wrote {}",
        r1 - r0,
        w1 - w0
    );

    let m = http_get(&f.node, 15020, "/metrics")?;
    for reporter in ["source", "destination"] {
        let got = metric_sum(&m, "istio_tcp_received_bytes_total", &[&format!("reporter=\"{reporter}\"")]);
        let sent = metric_sum(&m, "istio_tcp_sent_bytes_total", &[&format!("reporter=\"{reporter}\"")]);
        assert_eq!((got, sent), (100 << 20, 100 << 20), "{reporter} must count every byte each way:\n{m}");
    }
    let dump: serde_json::Value = serde_json::from_str(&http_get(&f.node, 15000, "/config_dump")?)?;
    assert_eq!(dump["splice"]["enabled"], true, "config_dump must say the splice is on: {dump}");
    // The kernel's own count, on the same metrics page.
    let kernel = metric_sum(&m, "sluice_datapath_events_total", &["event=\"spliced_bytes\""]);
    assert!(kernel >= spliced, "sluice_datapath_events_total{{event=\"spliced_bytes\"}} = {kernel}:\n{m}");
    agent.stop()?;
    Ok(())
}

/// The takeover and both half-closes, with the client writing from its first
/// instant. Many connections of varied size, so the takeover lands at every
/// point of a transfer, including before the first byte:
/// - discard-then-report: the client writes everything, half-closes, then
///   reads the server's answer, which the server sends after the client's
///   EOF and follows with its own half-close;
/// - echo: a reader thread takes the bytes back while the writer is still
///   writing. Only bulk sizes here: an app blocked in read() in one thread
///   while another thread half-closes gets EAGAIN from the kernel once its
///   socket is in a sockmap (README, "Same-node splice", limits).
#[test]
fn takeover_and_half_close_lose_nothing() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("splicehc")?;
    let agent = f.mesh.start_agent(&f.node, "ebpf")?;
    let (_srv, addr) = report_server(&f.a2, &format!("{}:8081", f.a2.ipv4()))?;
    let (echo, echo_addr) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &[])?;
    let sizes = [0u64, 1, 100, 4096, 65_536, 65_537, 1 << 20, 3 << 20, 7_777_777, 16 << 20];
    for (i, bytes) in sizes.iter().enumerate() {
        let report = send_expect(&f.a1, &addr, *bytes, "report", true)?;
        ensure!(
            report.ok && report.bytes_verified == *bytes,
            "discard-then-report #{i} ({bytes} bytes): {report:?}\nagent:\n{}",
            agent.stderr()
        );
        if *bytes >= 1 << 20 {
            send_verified(&f.a1, &echo_addr, *bytes, T)
                .with_context(|| format!("echo #{i} ({bytes} bytes)\nagent:\n{}", agent.stderr()))?;
        }
    }
    let c = agent.counters()?;
    let total: u64 = sizes.iter().sum();
    evidence(&format!(
        "{} connections of 0..16 MiB (the client writing from its first instant, then half-closing): every \
         byte and both EOFs arrived; {} directions switched, {} bytes spliced",
        sizes.len() + sizes.iter().filter(|b| **b >= 1 << 20).count(),
        counter(&c, "splice_switched"),
        counter(&c, "spliced_bytes")
    ));
    // Each size goes to the reporting server, and the bulk ones to the echo
    // and back: at least the total once. A client that is done before the
    // agent arms the splice (the smallest ones) is copied by the agent.
    assert!(counter(&c, "spliced_bytes") >= total, "the kernel must have moved the bytes: {c}");
    assert!(counter(&c, "splice_left_on_half_close") >= sizes.len() as u64, "half-closed ends must leave: {c}");
    drop(echo);
    agent.stop()?;
    Ok(())
}

fn send_expect(place: &Pod, addr: &str, bytes: u64, expect: &str, sequential: bool) -> Result<SendReport> {
    let mut send = Command::new(peer_bin());
    send.args(["send", "--connect", addr, "--bytes", &bytes.to_string(), "--expect", expect])
        .args(["--timeout-secs", &T.as_secs().to_string()]);
    if sequential {
        send.arg("--sequential");
    }
    let out = output_in(place, send, T + Duration::from_secs(5))?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!("sluice-peer send: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// An agent for `f` with the keeper at `keeper`, on the pins at `pins`.
fn agent_with_keeper(f: &Fixture, pins: &PinDir, keeper: &std::path::Path) -> Result<Agent> {
    let config = f.mesh.config_path();
    Agent::start(
        &f.node,
        &pins.0,
        &[
            "run",
            "--config",
            config.to_str().context("config path")?,
            "--node",
            f.node.name(),
            "--redirect",
            "ebpf",
            "--keeper",
            keeper.to_str().context("keeper path")?,
        ],
    )
}

/// SIGKILL the agent in the middle of a same-node transfer: the bytes keep
/// flowing in the kernel while no agent runs (the keeper holds the agent's
/// two sockets), a new agent adopts the pinned maps and the connection, the
/// transfer completes byte-exact with both EOFs, and new connections work.
#[test]
fn sigkill_during_spliced_transfer_then_new_agent_adopts() -> Result<()> {
    require_root!(Ok(()));
    const TOTAL: u64 = 400 << 20;
    let f = fixture("splicekill")?;
    let pins = PinDir::new(&format!("sl-splicekill-{}", std::process::id()));
    let sock = f.mesh.dir.path().join("keeper.sock");
    let mut keep = Command::new(sluice_tests::agent_bin());
    keep.args(["keeper", "--socket"]).arg(&sock);
    let mut keeper = sluice_tests::spawn_in(&f.node, keep)?;
    keeper.wait_for_line("READY", Duration::from_secs(10))?;

    let agent = agent_with_keeper(&f, &pins, &sock)?;
    let (mut srv, addr) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &["--print-peer"])?;
    let mut send = Command::new(peer_bin());
    // Paced (at least 6 s for the whole transfer), so the kill lands early
    // in it whatever the machine's speed, and most of it crosses after.
    send.args(["send", "--connect", &addr, "--bytes", &TOTAL.to_string(), "--timeout-secs", "120"])
        .args(["--rate", &(64u64 << 20).to_string()]);
    let client = sluice_tests::spawn_in(&f.a1, send)?;
    srv.wait_for_line("PEER ", Duration::from_secs(10))?;
    let spliced = |agent_pins: &PinDir| -> Result<u64> {
        Ok(counter(&sluice_tests::kernel_counters(&agent_pins.0)?, "spliced_bytes"))
    };
    // Both directions taken over by the kernel: before that, the few bytes
    // the agent holds in memory would die with it (README, limits).
    wait_until("the kernel to take both directions over", || {
        let c = sluice_tests::kernel_counters(&pins.0)?;
        Ok(counter(&c, "splice_switched") >= 2 && counter(&c, "spliced_bytes") > 16 << 20)
    })?;
    let at_kill = spliced(&pins)?;
    let pid = agent.pid();
    drop(agent); // SIGKILL, then reap
    ensure!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "agent {pid} still alive");
    // In flight at the kill: counted after the agent is gone, so these are
    // all the bytes that had crossed by then (the kernel's and the agent's).
    let crossed_at_kill = spliced(&pins)? + agent_written(&pins)?;
    ensure!(
        crossed_at_kill < 2 * TOTAL,
        "the transfer was over before the kill ({crossed_at_kill} of {} bytes crossed): nothing to prove",
        2 * TOTAL
    );
    // No agent runs now: every byte still has to cross, both ways: what the
    // kernel spliced plus what the agent copied before the splice took over
    // (its published counts in the pinned splice_written map).
    wait_until(
        "all bytes to cross with no agent running",
        || Ok(spliced(&pins)? + agent_written(&pins)? >= 2 * TOTAL),
    )?;
    let while_dead = spliced(&pins)? - at_kill;
    ensure!(client.try_status()?.is_none(), "the client ended before a new agent passed the EOF on");
    // Capture outlived the agent too (pinned links): a new connection is
    // refused at the pod's 15001 (nothing listens there now: ECONNREFUSED at
    // once, not a timeout), never sent to a2 around the mesh.
    let around = sluice_tests::traffic::send(&f.a1, &addr, 4096, Duration::from_secs(5))?;
    let refused = around.error.as_deref().unwrap_or_default();
    ensure!(
        !around.ok && around.bytes_verified == 0 && refused.contains("os error 111"),
        "with no agent, a new connection must be refused at once: {around:?}"
    );
    let reached = matches!(srv.next_line(Duration::from_millis(500)), Ok(Some(_)));
    ensure!(!reached, "with no agent, a new connection reached a2's app around the mesh: {:?}", srv.lines_seen());

    let agent2 = agent_with_keeper(&f, &pins, &sock)?;
    let out = client.finish(Duration::from_secs(60))?;
    let report: SendReport = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("client: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })?;
    evidence(&format!(
        "SIGKILL with {crossed_at_kill} of {} bytes crossed ({at_kill} spliced); {while_dead} more crossed with no \
         agent running; the new agent adopted the connection and passed the EOFs on: {} of {TOTAL} bytes echoed \
         byte-exact; a new connection while no agent ran was refused (ECONNREFUSED, capture pinned)",
        2 * TOTAL,
        report.bytes_verified
    ));
    ensure!(report.ok && report.bytes_verified == TOTAL, "transfer after the restart: {report:?}\n{}", agent2.stderr());
    ensure!(
        agent2.stderr().contains("adopted a spliced connection"),
        "the new agent must adopt it:\n{}",
        agent2.stderr()
    );
    send_verified(&f.a1, &addr, 1 << 20, T).context("a new connection through the new agent")?;
    agent2.stop()?;
    Ok(())
}

/// The sum of the pinned splice_written map: bytes agents wrote themselves
/// to their splice sockets, before the kernel took each direction over.
fn agent_written(pins: &PinDir) -> Result<u64> {
    let out =
        Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(pins.0.join("splice_written")).output()?;
    ensure!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(entries.as_array().into_iter().flatten().filter_map(|e| e["formatted"]["value"].as_u64()).sum())
}

fn wait_until(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("timed out waiting for {what}")
}

/// Loopback inside an enrolled pod is left to TCP unless the operator asks
/// for the bypass: a client that half-closes and then blocks in read() for
/// its answer (HTTP/1.0, `nc -N`) must get it. In a sockmap that read fails
/// with EAGAIN as soon as the client's FIN is acknowledged.
#[test]
fn half_closing_loopback_client_gets_its_answer() -> Result<()> {
    require_root!(Ok(()));
    let f = fixture("loophc")?;
    let agent = f.mesh.start_agent(&f.node, "ebpf")?;
    let (_srv, addr) = report_server(&f.a1, "127.0.0.1:0")?;
    for i in 0..20 {
        let report = send_expect(&f.a1, &addr, 1000, "report", false)?;
        ensure!(report.ok && report.bytes_verified == 1000, "#{i}: {report:?}");
    }
    let c = agent.counters()?;
    assert_eq!(counter(&c, "sockhash_added"), 0, "loopback sockets must stay out of the sockmap by default: {c}");
    evidence("20 half-closing loopback clients in an enrolled pod got their answers; no socket entered the sockmap");
    agent.stop()?;
    Ok(())
}

/// A `sluice-peer` server that reads to EOF, then answers with a report of
/// what it got and half-closes; returns it and the address it bound.
fn report_server(pod: &Pod, listen: &str) -> Result<(sluice_tests::ChildGuard, String)> {
    let mut serve = Command::new(peer_bin());
    serve.args(["serve", "--listen", listen, "--mode", "discard-then-report"]);
    let mut srv = sluice_tests::spawn_in(pod, serve)?;
    let line = srv.wait_for_line("LISTENING ", Duration::from_secs(5))?;
    let addr = line.trim_start_matches("LISTENING ").trim().to_owned();
    Ok((srv, addr))
}

/// Policy is decided at connection setup, as the destination's agent would:
/// a DENY for the client's identity stops a same-node connection before the
/// app sees a byte, and is counted; no splice happens for it.
#[test]
fn same_node_policy_deny_never_reaches_the_app() -> Result<()> {
    require_root!(Ok(()));
    let mut f = fixture("splicedeny")?;
    f.mesh.policies_yaml = "  - name: no-sleep\n    namespace: default\n    selector: { names: [a2] }\n    action: DENY\n    rules:\n      - from: [{ principals: [\"cluster.local/ns/default/sa/sleep\"] }]\n".into();
    f.mesh.write_config()?;
    let agent = f.mesh.start_agent(&f.node, "ebpf")?;
    let (mut srv, addr) = echo_server(&f.a2, &format!("{}:8080", f.a2.ipv4()), &["--print-peer"])?;
    let denials = || -> Result<u64> {
        let m = http_get(&f.node, 15020, "/metrics")?;
        Ok(metric_sum(&m, "sluice_auth_denials_total", &["policy=\"default/no-sleep\"", "reporter=\"destination\""]))
    };
    let d0 = denials()?;
    let denied = sluice_tests::traffic::send(&f.a1, &addr, 64 << 10, Duration::from_secs(10))?;
    // The refusal itself: a reset at once (ECONNRESET, or EPIPE/ENOTCONN for
    // the writer), not a timeout, a refused connect or a clean close.
    let error = denied.error.clone().unwrap_or_default();
    ensure!(!denied.ok && denied.bytes_verified == 0, "DENY must stop the connection: {denied:?}");
    ensure!(
        ["os error 104", "os error 32", "os error 107"].iter().any(|e| error.contains(e)) && denied.elapsed_ms < 5_000,
        "the denied client must be reset at once: {denied:?}"
    );
    let reached = matches!(srv.next_line(Duration::from_millis(500)), Ok(Some(_)));
    ensure!(!reached, "a denied client must never reach the app");
    let moved = denials()? - d0;
    ensure!(moved == 1, "the one denial must be counted once, moved {moved}");
    ensure!(counter(&agent.counters()?, "splice_switched") == 0, "a denied connection must not be spliced");
    // Not a crash: the agent is still ready (and stops cleanly below).
    ensure!(http_get(&f.node, 15021, "/healthz/ready")?.contains("mode: ebpf"), "the agent must still be ready");
    evidence(&format!(
        "same node: DENY for sa sleep reset a1 -> a2 at once ({}), the app saw no connection, denials +{moved}",
        error.rsplit(": ").next().unwrap_or(&error)
    ));
    agent.stop()?;
    Ok(())
}
