//! The opt-in loopback bypass: two sockets in one enrolled pod's cgroup
//! exchange bytes, and sk_msg moves them socket to socket, not TCP. The same
//! exchange in a pod that is not enrolled takes the normal TCP path.
//!
//! The exchange is request/response (each byte checked), not a half-closing
//! echo: on a socket in a sockmap the kernel answers a blocking read() woken
//! without data with EAGAIN, which a reader blocked while its own socket
//! half-closes can hit (README, "Same-node splice", limits) - the reason this
//! bypass is opt-in.

use std::{process::Command, time::Duration};

use anyhow::{ensure, Result};
use sluice_tests::{evidence, require_root, traffic::echo_server, Agent, PinDir, Pod, Topology};

const ROUND_TRIPS: u64 = 20_000;

/// Runs 1-byte request/response round trips over 127.0.0.1 inside `pod`.
fn loopback_rr(pod: &Pod) -> Result<()> {
    let (_server, addr) = echo_server(pod, "127.0.0.1:0", &[])?;
    let mut rr = Command::new(sluice_tests::peer_bin());
    rr.args(["rr", "--connect", &addr, "--count", &ROUND_TRIPS.to_string(), "--warmup", "0"]);
    let out = sluice_tests::output_in(pod, rr, Duration::from_secs(60))?;
    ensure!(out.status.success(), "rr in {}: {}", pod.name(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn sk_msg_moves_bytes_for_enrolled_cgroup_only() -> Result<()> {
    require_root!(Ok(()));
    let topo = Topology::new("bypass")?;
    let node = topo.add_node("node1")?;
    let enrolled = node.add_pod("enrolled")?;
    let plain = node.add_pod("plain")?;
    let pins = PinDir::new(topo.prefix());
    let cgroup = enrolled.cgroup_path();
    let agent = Agent::start(&node, &pins.0, &["run", "--cgroup", cgroup.to_str().unwrap()])?;

    let before = sluice_tests::kernel_counters(&pins.0)?;
    loopback_rr(&enrolled)?;
    let mid = sluice_tests::kernel_counters(&pins.0)?;
    loopback_rr(&plain)?;
    let after = sluice_tests::kernel_counters(&pins.0)?;

    let moved = mid["msg_redirected_bytes"].as_u64().unwrap() - before["msg_redirected_bytes"].as_u64().unwrap();
    let passed = mid["msg_passed"].as_u64().unwrap() - before["msg_passed"].as_u64().unwrap();
    evidence(&format!("enrolled pod: {ROUND_TRIPS} round trips, sk_msg redirected {moved} bytes; counters {mid}"));

    // Every byte, both ways, went socket to socket, none through TCP.
    assert_eq!(moved, 2 * ROUND_TRIPS, "sk_msg must redirect every byte both ways: {mid}");
    assert_eq!(passed, 0, "no message may fall back to TCP: {mid}");
    assert!(mid["sockhash_added"].as_u64().unwrap() >= 2, "both ends must be in the SOCKHASH: {mid}");
    // The unenrolled pod's bytes went through TCP, and no counter moved for it.
    assert_eq!(mid["msg_redirected_bytes"], after["msg_redirected_bytes"], "counters moved for an unenrolled pod");
    assert_eq!(mid["sockhash_added"], after["sockhash_added"], "an unenrolled pod's socket joined the SOCKHASH");

    agent.stop()?;
    assert!(!pins.0.exists(), "the agent left pins behind in {}", pins.0.display());
    Ok(())
}
