//! The first kernel path: two sockets in one enrolled pod's cgroup exchange
//! bytes, and sk_msg moves them socket to socket, not TCP. The same exchange
//! in a pod that is not enrolled takes the normal TCP path.
//!
//! Evidence, both required: the programs' per-CPU counters, and TCP_INFO on
//! the client socket (`bytes_acked` counts only what TCP carried).

use std::time::Duration;

use anyhow::Result;
use sluice_tests::{
    evidence, require_root,
    traffic::{echo_server, send_verified},
    Agent, PinDir, Pod, SendReport, Topology,
};

const BYTES: u64 = 4 * 1024 * 1024;

/// Runs an echo exchange over 127.0.0.1 inside `pod`, returns the client report.
fn loopback_echo(pod: &Pod) -> Result<SendReport> {
    let (_server, addr) = echo_server(pod, "127.0.0.1:0", &[])?;
    send_verified(pod, &addr, BYTES, Duration::from_secs(60))
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
    let fast = loopback_echo(&enrolled)?;
    let mid = sluice_tests::kernel_counters(&pins.0)?;
    let slow = loopback_echo(&plain)?;
    let after = sluice_tests::kernel_counters(&pins.0)?;

    let moved = mid["msg_redirected_bytes"].as_u64().unwrap() - before["msg_redirected_bytes"].as_u64().unwrap();
    evidence(&format!("enrolled pod: sk_msg redirected {moved} bytes; counters {mid}"));
    evidence(&format!("enrolled pod client TCP_INFO: {:?}", fast.tcp_info));
    evidence(&format!("unenrolled pod client TCP_INFO: {:?}", slow.tcp_info));

    // Both directions of the echo went through sk_msg.
    assert!(moved >= 2 * BYTES, "sk_msg redirected only {moved} bytes of {}", 2 * BYTES);
    assert!(mid["sockhash_added"].as_u64().unwrap() >= 2, "both ends must be in the SOCKHASH: {mid}");
    // TCP acked at most the handshake and FIN, not the payload.
    assert!(fast.tcp_info.bytes_acked < BYTES / 100, "TCP carried the payload: {:?}", fast.tcp_info);
    assert!(fast.tcp_info.segs_out < 100, "too many TCP segments for a bypassed socket: {:?}", fast.tcp_info);
    // The unenrolled pod's bytes went through TCP, and no counter moved for it.
    assert!(slow.tcp_info.bytes_acked >= BYTES, "unenrolled pod should use TCP: {:?}", slow.tcp_info);
    assert_eq!(mid["msg_redirected_bytes"], after["msg_redirected_bytes"], "counters moved for an unenrolled pod");

    agent.stop()?;
    assert!(!pins.0.exists(), "the agent left pins behind in {}", pins.0.display());
    Ok(())
}
