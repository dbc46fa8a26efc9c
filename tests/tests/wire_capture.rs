//! What actually crosses the wire between two nodes running `sluice run`
//! (iptables and eBPF capture), seen by tcpdump on the lan bridge that joins them.
//!
//! Topology: node1 has enrolled pod a and unenrolled pod u1; node2 has
//! enrolled pod b and unenrolled pod u2. Between enrolled pods the only TCP
//! on the wire must be HBONE: port 15008, TLS 1.3 from the first byte to the
//! last, no SNI, ALPN h2, and none of the application's bytes in clear. The
//! negative control (u1 -> u2, no agent involved) must show the plaintext,
//! so the same capture and analysis demonstrably can see it.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{ensure, Result};
use sluice_tests::{
    capture::{Capture, StreamKind, WireReport, HBONE_PORT, TLS13},
    evidence,
    mesh::Mesh,
    pattern, require_root,
    traffic::{echo_server, send_verified},
    Agent, Node, Pod, SendReport, Topology,
};

const MIB: u64 = 1 << 20;

struct Fixture {
    topo: Topology,
    mesh: Mesh,
    n1: Node,
    n2: Node,
    a: Pod,
    b: Pod,
    u1: Pod,
    u2: Pod,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let (a, u1) = (n1.add_pod("a")?, n1.add_pod("u1")?);
    let (b, u2) = (n2.add_pod("b")?, n2.add_pod("u2")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&a, "default", "sleep", true);
    mesh.add(&u1, "default", "legacy", false);
    mesh.add(&b, "default", "httpbin", true);
    mesh.add(&u2, "default", "legacy", false);
    mesh.write_config()?;
    Ok(Fixture { topo, mesh, n1, n2, a, b, u1, u2 })
}

fn agents(f: &Fixture, mode: &str) -> Result<(Agent, Agent)> {
    Ok((f.mesh.start_agent(&f.n1, mode)?, f.mesh.start_agent(&f.n2, mode)?))
}

/// 64-byte windows of the `sluice-peer` stream at `offsets`.
fn markers(offsets: &[u64]) -> Vec<(u64, [u8; 64])> {
    offsets
        .iter()
        .map(|&off| {
            let mut w = [0u8; 64];
            pattern::fill(off, &mut w);
            (off, w)
        })
        .collect()
}

/// Captures on the lan bridge while `traffic` runs; returns the analysis.
fn captured(f: &Fixture, label: &str, traffic: impl FnOnce() -> Result<SendReport>) -> Result<WireReport> {
    let file = f.mesh.dir.path().join(format!("{label}.pcap"));
    let cap = Capture::start(&f.topo.lan_netns(), f.topo.bridge(), &file)?;
    let sent = traffic()?;
    let (pcap, stats) = cap.stop_with_stats()?;
    let report = WireReport::from_pcap(&pcap)?;
    evidence(&format!(
        "{label}: {} bytes echoed byte-exact in {} ms; pcap {} bytes, tcpdump {:?}",
        sent.bytes_verified,
        sent.elapsed_ms,
        pcap.len(),
        stats
    ));
    evidence(&format!("{label}: {}", report.summary()));
    for s in report.per_stream.iter().filter(|s| s.kind != StreamKind::Empty) {
        evidence(&format!(
            "{label}:   {:?} -> {:?}: {:?}, {} bytes in {} segments, {} records {:?}, negotiated {:?}, \
             {} application_data bytes{}",
            s.stream.src.unwrap(),
            s.stream.dst.unwrap(),
            s.kind,
            s.stream.data.len(),
            s.stream.segments,
            s.tls.records,
            s.tls.record_types,
            s.negotiated.map(|v| format!("{v:#06x}")),
            s.tls.application_data_bytes,
            s.tls.error.as_ref().map(|e| format!(", parse stopped: {e}")).unwrap_or_default(),
        ));
    }
    // Holes would leave parts of the streams unexamined.
    ensure!(stats.complete(), "{label}: tcpdump lost packets: {stats:?}");
    ensure!(report.gap_bytes == 0, "{label}: {} bytes missing from the capture", report.gap_bytes);
    Ok(report)
}

/// The wire carried only HBONE between `client` and `server` for a transfer
/// of `bytes` each way, and none of `secret` in clear.
fn assert_hbone(label: &str, r: &WireReport, bytes: u64, client: IpAddr, server: IpAddr, secret: &[(u64, [u8; 64])]) {
    assert!(r.segments > 0, "{label}: nothing captured");
    assert_eq!(r.non_hbone_segments, 0, "{label}: TCP without port {HBONE_PORT} between the nodes: {r:#?}");
    assert!(r.ports_seen.contains(&HBONE_PORT), "{label}: ports {:?}", r.ports_seen);
    assert_eq!(r.addrs_seen, BTreeSet::from([client, server]), "{label}: unexpected addresses on the wire");
    for s in &r.per_stream {
        let (src, dst) = (s.stream.src.unwrap(), s.stream.dst.unwrap());
        assert!(
            (dst.ip() == server && dst.port() == HBONE_PORT) || (src.ip() == server && src.port() == HBONE_PORT),
            "{label}: stream {src} -> {dst} is not to or from the destination pod's {HBONE_PORT}"
        );
    }
    assert!(r.nonempty_streams() >= 2, "{label}: expected a connection with data both ways: {}", r.summary());
    assert_eq!(
        (r.tls13_streams, r.tls_other_streams, r.non_tls_streams),
        (r.nonempty_streams(), 0, 0),
        "{label}: not every stream is TLS 1.3 from first byte to last: {:#?}",
        r.per_stream.iter().map(|s| (&s.stream, &s.tls, s.kind)).collect::<Vec<_>>()
    );
    assert_eq!(r.tls_versions, BTreeSet::from([TLS13]), "{label}: ServerHello versions");
    assert!(r.client_hellos >= 1 && r.server_hellos >= 1, "{label}: {}", r.summary());
    assert!(!r.sni_seen, "{label}: HBONE must send no SNI, saw {:?}", r.sni);
    assert_eq!(r.alpn, BTreeSet::from(["h2".to_string()]), "{label}: ALPN offered");
    for (off, w) in secret {
        assert!(!r.contains(w), "{label}: application bytes at offset {off} are visible on the wire");
    }
    assert!(
        r.total_payload as u64 >= 2 * bytes,
        "{label}: captured {} payload bytes, less than the {} that moved",
        r.total_payload,
        2 * bytes
    );
}

/// The wire carried the transfer in clear, without HBONE.
fn assert_plaintext(label: &str, r: &WireReport, bytes: u64, visible: &[(u64, [u8; 64])]) {
    assert!(!r.ports_seen.contains(&HBONE_PORT), "{label}: port {HBONE_PORT} involved: {}", r.summary());
    assert!(r.non_tls_streams >= 2, "{label}: expected plaintext both ways: {}", r.summary());
    assert_eq!((r.tls13_streams, r.client_hellos), (0, 0), "{label}: {}", r.summary());
    for (off, w) in visible {
        assert!(r.contains(w), "{label}: marker at offset {off} not found; the capture cannot see plaintext");
    }
    assert!(r.total_payload as u64 >= 2 * bytes, "{label}: captured only {} bytes", r.total_payload);
}

#[test]
fn only_hbone_tls13_crosses_the_wire() -> Result<()> {
    require_root!(Ok(()));
    // Same wire, whichever way the pods' traffic was captured.
    for mode in ["iptables", "ebpf"] {
        wire_in_mode(mode)?;
    }
    Ok(())
}

fn wire_in_mode(mode: &str) -> Result<()> {
    let f = fixture(&format!("wire{}", &mode[..2]))?;
    let (ag1, ag2) = agents(&f, mode)?;
    let (_b4, b4) = echo_server(&f.b, &format!("{}:8080", f.b.ipv4()), &[])?;
    let (_b6, b6) = echo_server(&f.b, &format!("[{}]:8080", f.b.ipv6()), &[])?;
    let (_u4, u4) = echo_server(&f.u2, &format!("{}:8080", f.u2.ipv4()), &[])?;
    let (_u6, u6) = echo_server(&f.u2, &format!("[{}]:8080", f.u2.ipv6()), &[])?;
    let t = Duration::from_secs(120);

    // Enrolled a -> b over IPv4: 20 MiB each way.
    let big = 20 * MIB;
    let label = format!("{mode}-hbone-v4");
    let r = captured(&f, &label, || send_verified(&f.a, &b4, big, t))?;
    let secret = markers(&[0, MIB, 10 * MIB, big - 64]);
    assert_hbone(&label, &r, big, f.a.ipv4().into(), f.b.ipv4().into(), &secret);

    // Enrolled a -> b over IPv6.
    let small = 2 * MIB;
    let label = format!("{mode}-hbone-v6");
    let r = captured(&f, &label, || send_verified(&f.a, &b6, small, t))?;
    let secret_small = markers(&[0, MIB, small - 64]);
    assert_hbone(&label, &r, small, f.a.ipv6().into(), f.b.ipv6().into(), &secret_small);

    // Negative controls: unenrolled u1 -> u2, plain TCP, no agent involved.
    // The same capture and analysis must see the bytes in clear.
    let r = captured(&f, "plain-v4", || send_verified(&f.u1, &u4, small, t))?;
    assert_plaintext("plain-v4", &r, small, &secret_small);
    assert_eq!(r.addrs_seen, BTreeSet::from([f.u1.ipv4().into(), f.u2.ipv4().into()]));
    let r = captured(&f, "plain-v6", || send_verified(&f.u1, &u6, MIB, t))?;
    assert_plaintext("plain-v6", &r, MIB, &markers(&[0, MIB / 2, MIB - 64]));
    assert_eq!(r.addrs_seen, BTreeSet::from([f.u1.ipv6().into(), f.u2.ipv6().into()]));

    ag1.stop()?;
    ag2.stop()?;
    f.topo.close()?;
    Ok(())
}
