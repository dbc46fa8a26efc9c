//! tc ingress fails closed (issue 9, item 3): a SYN the classifier cannot
//! read must never reach the app around 15006 and its policy.
//!
//! ```text
//!   node1: b1 (enrolled, sa httpbin), echo servers on b1:8080 (v4 and v6)
//!          printing each peer; u1 (not enrolled), the attacker
//!   policy: DENY from u1's addresses to port 8080
//! ```
//!
//! u1 writes whole Ethernet frames on its eth0 (AF_PACKET, checksums
//! computed here), so nothing in u1's own stack reassembles or rewrites
//! them, and reads every frame that comes back. Its kernel's RSTs are
//! dropped (a stateless OUTPUT rule in u1), so when a SYN-ACK comes the
//! test finishes the handshake itself: a SYN that reached the app directly
//! then shows up as a `PEER` line of a denied source. Each case records
//! whether a SYN-ACK came back from b1:8080, whether the app accepted, and
//! how the kernel counters (`inbound_assigned`, `tc_unclassifiable_dropped`)
//! and the agent's denial counter moved.
//!
//! Cases: a plain IPv4 and IPv6 SYN (controls, also proving the frames are
//! well formed), an IPv4 SYN in two fragments whose first carries only the
//! ports and sequence number (the flags are in the second), one whose first
//! fragment holds the flags (tc could assign it, but reassembly orphans the
//! skb and the app's listener gets it), an IPv6 SYN behind a
//! destination-options header (assigned: the walk finds TCP), and an IPv6
//! SYN in two fragments. Fragmented SYNs must be dropped at tc, every
//! fragment counted. iptables mode reassembles in conntrack before REDIRECT,
//! so there every case must reach the agent and be denied. Then pings that
//! are fragmented or carry a hop-by-hop header must still be answered: only
//! TCP is judged.

use std::{
    ffi::CString,
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    netns_path, require_root,
    traffic::echo_server,
    Agent, ChildGuard, Node, Pod, Topology,
};

const APP_PORT: u16 = 8080;
const POLICY: &str = "default/deny-u1";

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// An AF_PACKET socket on one interface of one netns: writes whole frames
/// and reads every frame the interface sees.
struct RawLink {
    fd: OwnedFd,
}

impl RawLink {
    /// Opened on a thread that enters `netns` (the socket stays in it), so
    /// the test's own netns is untouched.
    fn open(netns: &str, iface: &str) -> Result<RawLink> {
        let path = netns_path(netns);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<RawLink> {
                let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering netns {netns}"))?;
                let name = CString::new(iface)?;
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                ensure!(ifindex != 0, "no {iface} in netns {netns}");
                let proto = (libc::ETH_P_ALL as u16).to_be();
                // SAFETY: plain socket(2); the fd is owned right below.
                let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) };
                ensure!(raw >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
                // SAFETY: a fresh descriptor nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: sockaddr_ll is plain data; all-zero is valid.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex as i32;
                // SAFETY: `sll` outlives the call and its size is passed.
                let rc = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        std::ptr::addr_of!(sll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                ensure!(rc == 0, "bind(AF_PACKET, {iface}): {}", std::io::Error::last_os_error());
                let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
                // SAFETY: `tv` outlives the call and its size is passed.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        std::ptr::addr_of!(tv).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    )
                };
                ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
                Ok(RawLink { fd })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread opening a packet socket in {netns} panicked"))?
        })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: `frame` is valid for its length; the socket is bound, so
        // the kernel sends on that interface.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        ensure!(n == frame.len() as isize, "send on the packet socket: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// The next frame, or `None` after the socket's 50 ms timeout.
    fn recv(&self) -> Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                return Ok(None);
            }
            bail!("recv on the packet socket: {e}");
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    /// Throws away whatever is queued.
    fn drain(&self) -> Result<()> {
        while self.recv()?.is_some() {}
        Ok(())
    }
}

/// One crafted TCP conversation from u1 to b1:8080.
#[derive(Clone, Copy)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

/// RFC 1071 checksum over `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word =
            if pair.len() == 2 { u16::from_be_bytes([pair[0], pair[1]]) } else { u16::from_be_bytes([pair[0], 0]) };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Flow {
    /// A TCP segment with a correct checksum for this flow's addresses.
    fn tcp(&self, seq: u32, ack: u32, flags: u8, options: &[u8]) -> Vec<u8> {
        assert!(options.len().is_multiple_of(4));
        let mut seg = Vec::with_capacity(20 + options.len());
        seg.extend_from_slice(&self.sport.to_be_bytes());
        seg.extend_from_slice(&APP_PORT.to_be_bytes());
        seg.extend_from_slice(&seq.to_be_bytes());
        seg.extend_from_slice(&ack.to_be_bytes());
        seg.push((((20 + options.len()) / 4) as u8) << 4);
        seg.push(flags);
        seg.extend_from_slice(&64240u16.to_be_bytes());
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        seg.extend_from_slice(options);
        let mut pseudo = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, 6]);
                pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 6]);
            }
            _ => unreachable!("one family per flow"),
        }
        pseudo.extend_from_slice(&seg);
        let c = checksum(&pseudo);
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        seg
    }

    /// A SYN with a 32-byte header (MSS and NOPs), so it can be cut at 8 or
    /// 24 bytes on a fragment boundary.
    fn syn(&self, isn: u32) -> Vec<u8> {
        let mut options = vec![2, 4, 0x05, 0xb4]; // MSS 1460
        options.extend_from_slice(&[1; 8]); // NOP x 8
        self.tcp(isn, 0, TCP_SYN, &options)
    }

    fn ether(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4 frame carrying (part of) a `proto` payload; `frag` is the
    /// flags + fragment offset field (offset in 8-byte units).
    fn ipv4(&self, id: u16, frag: u16, proto: u8, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (self.src, self.dst) else { unreachable!("an IPv4 flow") };
        let mut ip = Vec::with_capacity(20 + payload.len());
        ip.push(0x45);
        ip.push(0);
        ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&id.to_be_bytes());
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[64, proto, 0, 0]);
        ip.extend_from_slice(&s.octets());
        ip.extend_from_slice(&d.octets());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(payload);
        self.ether(0x0800, &ip)
    }

    /// An IPv6 frame; `payload` starts with the header `next_header` names.
    fn ipv6(&self, next_header: u8, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (self.src, self.dst) else { unreachable!("an IPv6 flow") };
        let mut ip = Vec::with_capacity(40 + payload.len());
        ip.extend_from_slice(&[0x60, 0, 0, 0]);
        ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        ip.push(next_header);
        ip.push(64);
        ip.extend_from_slice(&s.octets());
        ip.extend_from_slice(&d.octets());
        ip.extend_from_slice(payload);
        self.ether(0x86dd, &ip)
    }

    /// A segment in one unfragmented packet with no extension header.
    fn plain(&self, seg: &[u8]) -> Vec<u8> {
        match self.src {
            IpAddr::V4(_) => self.ipv4(0x1234, 0x4000, 6, seg), // DF
            IpAddr::V6(_) => self.ipv6(6, seg),
        }
    }

    /// An ICMP (v4) or ICMPv6 echo request with 16 bytes of data: 24 bytes,
    /// so it can be cut at 8 or 16 on a fragment boundary.
    fn echo_request(&self, ident: u16) -> Vec<u8> {
        let mut msg = vec![0u8; 8];
        msg[4..6].copy_from_slice(&ident.to_be_bytes());
        msg[6..8].copy_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(b"sluice tc ingres");
        let c = match (self.src, self.dst) {
            (IpAddr::V4(_), _) => {
                msg[0] = 8;
                checksum(&msg)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                msg[0] = 128;
                let mut pseudo = Vec::new();
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 58]);
                pseudo.extend_from_slice(&msg);
                checksum(&pseudo)
            }
            _ => unreachable!("one family per flow"),
        };
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        msg
    }

    /// Whether `frame` is b1's echo reply to `ident`.
    fn is_echo_reply(&self, frame: &[u8], ident: u16) -> bool {
        let Some(ethertype) = frame.get(12..14) else { return false };
        let ip = &frame[14..];
        let icmp = match (ethertype, self.dst, self.src) {
            ([0x08, 0x00], IpAddr::V4(b), IpAddr::V4(u))
                if ip.len() >= 20 && ip[9] == 1 && ip[12..16] == b.octets() && ip[16..20] == u.octets() =>
            {
                ip.get(((ip[0] & 0x0f) as usize) * 4..)
            }
            ([0x86, 0xdd], IpAddr::V6(b), IpAddr::V6(u))
                if ip.len() >= 40 && ip[6] == 58 && ip[8..24] == b.octets() && ip[24..40] == u.octets() =>
            {
                ip.get(40..)
            }
            _ => None,
        };
        icmp.is_some_and(|m| m.len() >= 8 && matches!(m[0], 0 | 129) && m[4..6] == ident.to_be_bytes())
    }

    /// If `frame` is TCP from b1:8080 to this flow's port: its flags and
    /// sequence number.
    fn reply(&self, frame: &[u8]) -> Option<(u8, u32)> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let ip = frame.get(14..)?;
        let tcp = match (ethertype, self.dst, self.src) {
            (0x0800, IpAddr::V4(b), IpAddr::V4(u)) => {
                let ihl = ((ip.first()? & 0x0f) as usize) * 4;
                if *ip.get(9)? != 6 || ip.get(12..16)? != b.octets() || ip.get(16..20)? != u.octets() {
                    return None;
                }
                ip.get(ihl..)?
            }
            (0x86dd, IpAddr::V6(b), IpAddr::V6(u)) => {
                if *ip.get(6)? != 6 || ip.get(8..24)? != b.octets() || ip.get(24..40)? != u.octets() {
                    return None;
                }
                ip.get(40..)?
            }
            _ => return None,
        };
        let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
        let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
        if sport != APP_PORT || dport != self.sport {
            return None;
        }
        let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
        Some((*tcp.get(13)?, seq))
    }
}

/// How a crafted SYN is put on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One IPv4 packet, DF: the control.
    PlainV4,
    /// Two IPv4 fragments: 8 bytes of TCP (ports, sequence) with MF, then
    /// the other 24 (flags included) at offset 8.
    FragmentedV4,
    /// Two IPv4 fragments, the first with the whole 24-byte TCP header
    /// prefix (ports, flags) and MF: it can be classified, but IPv4
    /// reassembly orphans the skb, so an assignment would not survive.
    FirstFragmentV4,
    /// One IPv6 packet, no extension header: the control.
    PlainV6,
    /// IPv6 with a destination-options header (PadN) before TCP.
    DestOptsV6,
    /// Two IPv6 fragments (fragment header): 24 bytes of TCP with M, then 8.
    FragmentedV6,
}

const SHAPES: [Shape; 6] = [
    Shape::PlainV4,
    Shape::FragmentedV4,
    Shape::FirstFragmentV4,
    Shape::PlainV6,
    Shape::DestOptsV6,
    Shape::FragmentedV6,
];

impl Shape {
    fn v6(self) -> bool {
        matches!(self, Shape::PlainV6 | Shape::DestOptsV6 | Shape::FragmentedV6)
    }

    fn frames(self, flow: &Flow, isn: u32, id: u16) -> Vec<Vec<u8>> {
        let syn = flow.syn(isn);
        match self {
            Shape::PlainV4 | Shape::PlainV6 => vec![flow.plain(&syn)],
            Shape::FragmentedV4 => vec![flow.ipv4(id, 0x2000, 6, &syn[..8]), flow.ipv4(id, 1, 6, &syn[8..])],
            Shape::FirstFragmentV4 => vec![flow.ipv4(id, 0x2000, 6, &syn[..24]), flow.ipv4(id, 3, 6, &syn[24..])],
            Shape::DestOptsV6 => {
                // Next header TCP, length 0 (8 bytes), PadN of 4 zero bytes.
                let mut p = vec![6, 0, 1, 4, 0, 0, 0, 0];
                p.extend_from_slice(&syn);
                vec![flow.ipv6(60, &p)]
            }
            Shape::FragmentedV6 => {
                let frag = |offset_units: u16, more: bool, part: &[u8]| {
                    let mut p = vec![6, 0];
                    p.extend_from_slice(&((offset_units << 3) | more as u16).to_be_bytes());
                    p.extend_from_slice(&(0x5100_0000u32 | id as u32).to_be_bytes());
                    p.extend_from_slice(part);
                    flow.ipv6(44, &p)
                };
                vec![frag(0, true, &syn[..24]), frag(3, false, &syn[24..])]
            }
        }
    }

    /// How many of its frames the fixed tc program drops.
    fn unclassifiable(self) -> u64 {
        match self {
            Shape::FragmentedV4 | Shape::FirstFragmentV4 | Shape::FragmentedV6 => 2,
            _ => 0,
        }
    }
}

/// Traffic that is not TCP, which tc must leave alone even when it is
/// fragmented or carries extension headers (ICMPv6 neighbour discovery and
/// MLD do; MLD always behind a hop-by-hop header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ping {
    /// ICMP echo in two IPv4 fragments (8 + 16 bytes).
    FragmentedV4,
    /// ICMPv6 echo behind a hop-by-hop header (PadN).
    HopByHopV6,
    /// ICMPv6 echo in two fragments (16 + 8 bytes).
    FragmentedV6,
}

const PINGS: [Ping; 3] = [Ping::FragmentedV4, Ping::HopByHopV6, Ping::FragmentedV6];

impl Ping {
    fn v6(self) -> bool {
        self != Ping::FragmentedV4
    }

    fn frames(self, flow: &Flow, ident: u16) -> Vec<Vec<u8>> {
        let msg = flow.echo_request(ident);
        match self {
            Ping::FragmentedV4 => vec![flow.ipv4(ident, 0x2000, 1, &msg[..8]), flow.ipv4(ident, 1, 1, &msg[8..])],
            Ping::HopByHopV6 => {
                let mut p = vec![58, 0, 1, 4, 0, 0, 0, 0];
                p.extend_from_slice(&msg);
                vec![flow.ipv6(0, &p)]
            }
            Ping::FragmentedV6 => {
                let frag = |offset_units: u16, more: bool, part: &[u8]| {
                    let mut p = vec![58, 0];
                    p.extend_from_slice(&((offset_units << 3) | more as u16).to_be_bytes());
                    p.extend_from_slice(&(0x5200_0000u32 | ident as u32).to_be_bytes());
                    p.extend_from_slice(part);
                    flow.ipv6(44, &p)
                };
                vec![frag(0, true, &msg[..16]), frag(2, false, &msg[16..])]
            }
        }
    }
}

/// Sends one crafted ping; whether b1 answered, and by how much the drop
/// counter moved (eBPF mode).
fn ping(link: &RawLink, flow: &Flow, kind: Ping, ident: u16, agent: &Agent, ebpf: bool) -> Result<(bool, u64)> {
    let dropped = |a: &Agent| if ebpf { kernel(a, "tc_unclassifiable_dropped") } else { Ok(0) };
    let before = dropped(agent)?;
    link.drain()?;
    for frame in kind.frames(flow, ident) {
        link.send(&frame)?;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut replied = false;
    while !replied && Instant::now() < deadline {
        replied = link.recv()?.is_some_and(|frame| flow.is_echo_reply(&frame, ident));
    }
    Ok((replied, dropped(agent)? - before))
}

/// What one crafted SYN came to.
#[derive(Debug, Default)]
struct Outcome {
    /// A SYN-ACK came back from b1:8080.
    syn_ack: bool,
    /// The app accepted the connection (its `PEER` line for u1).
    app_accepted: bool,
    /// Kernel counter deltas (eBPF mode).
    assigned: u64,
    dropped: u64,
    /// The agent's denials under the DENY policy.
    denied: u64,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SYN-ACK {}, app accepted {}, inbound_assigned +{}, tc_unclassifiable_dropped +{}, denied +{}",
            if self.syn_ack { "yes" } else { "no" },
            self.app_accepted as u8,
            self.assigned,
            self.dropped,
            self.denied
        )
    }
}

fn kernel(agent: &Agent, name: &str) -> Result<u64> {
    Ok(agent.counters()?[name].as_u64().unwrap_or(0))
}

fn denials(node: &Node) -> Result<u64> {
    Ok(metric_sum(&http_get(node, 15020, "/metrics")?, "sluice_auth_denials_total", &[&format!("policy=\"{POLICY}\"")]))
}

/// The MAC of the node-side end of `pod`'s veth: the pod's next hop.
fn gateway_mac(node: &Node, pod: &Pod) -> Result<[u8; 6]> {
    let out = node.exec_ok(&["ip", "-j", "link", "show", pod.host_veth()])?;
    let links: serde_json::Value = serde_json::from_str(&out)?;
    let text = links[0]["address"].as_str().context("no address in ip -j link")?;
    parse_mac(text)
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|b| anyhow::anyhow!("not a MAC: {b:?}"))
}

struct Fixture {
    mesh: Mesh,
    n1: Node,
    b1: Pod,
    u1: Pod,
    _topo: Topology,
}

fn fixture(name: &str) -> Result<Fixture> {
    let topo = Topology::new(name)?;
    let n1 = topo.add_node("node1")?;
    let (b1, u1) = (n1.add_pod("b1")?, n1.add_pod("u1")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&b1, "default", "httpbin", true);
    mesh.add(&u1, "default", "legacy", false);
    mesh.policies_yaml = format!(
        "  - name: deny-u1\n    namespace: default\n    action: DENY\n    rules:\n      - from: [{{ ipBlocks: [{}, \"{}\"] }}]\n        to: [{{ ports: [{APP_PORT}] }}]\n",
        u1.ipv4(),
        u1.ipv6()
    );
    mesh.write_config()?;
    Ok(Fixture { mesh, n1, b1, u1, _topo: topo })
}

/// Sends one crafted SYN, finishes the handshake if anything answers, and
/// reports what happened.
#[allow(clippy::too_many_arguments)]
fn attempt(
    link: &RawLink,
    flow: &Flow,
    shape: Shape,
    n: u16,
    app: &mut ChildGuard,
    agent: &Agent,
    node: &Node,
    ebpf: bool,
) -> Result<Outcome> {
    let counters = |a: &Agent| -> Result<(u64, u64)> {
        if !ebpf {
            return Ok((0, 0));
        }
        Ok((kernel(a, "inbound_assigned")?, kernel(a, "tc_unclassifiable_dropped")?))
    };
    let before = (counters(agent)?, denials(node)?);
    link.drain()?;
    let isn = 0x1000_0000 + ((n as u32) << 16);
    for frame in shape.frames(flow, isn, 0x4200 + n) {
        link.send(&frame)?;
    }
    let mut out = Outcome::default();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let Some(frame) = link.recv()? else { continue };
        if let Some((flags, seq)) = flow.reply(&frame) {
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                out.syn_ack = true;
                link.send(&flow.plain(&flow.tcp(isn + 1, seq.wrapping_add(1), TCP_ACK, &[])))?;
                break;
            }
            if flags & TCP_RST != 0 {
                break;
            }
        }
    }
    // A connection the app accepted prints its peer; give it time.
    out.app_accepted = app.wait_for_line("PEER ", Duration::from_millis(1500)).is_ok();
    if out.syn_ack {
        // The agent's verdict lands right after the handshake.
        let t = Instant::now();
        while denials(node)? == before.1 && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let after = (counters(agent)?, denials(node)?);
    out.assigned = after.0 .0 - before.0 .0;
    out.dropped = after.0 .1 - before.0 .1;
    out.denied = after.1 - before.1;
    Ok(out)
}

/// Everything one mode's run saw.
struct Run {
    syns: Vec<(Shape, Outcome)>,
    /// Each ping: answered, and the drop counter's delta.
    pings: Vec<(Ping, bool, u64)>,
    /// `sluice_datapath_events_total{event="tc_unclassifiable_dropped"}` at
    /// the end, as Prometheus scrapes it.
    exported: u64,
}

fn run(mode: &str) -> Result<Run> {
    let f = fixture(&format!("tcfc{}", &mode[..1]))?;
    let agent = f.mesh.start_agent(&f.n1, mode)?;
    let (mut app4, _) = echo_server(&f.b1, &format!("{}:{APP_PORT}", f.b1.ipv4()), &["--print-peer"])?;
    let (mut app6, _) = echo_server(&f.b1, &format!("[{}]:{APP_PORT}", f.b1.ipv6()), &["--print-peer"])?;
    // u1's kernel would answer the SYN-ACKs meant for the test with RSTs.
    for tool in ["iptables", "ip6tables"] {
        f.u1.exec_ok(&[tool, "-w", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"])?;
    }
    let link = RawLink::open(f.u1.netns_name(), "eth0")?;
    let (src_mac, dst_mac) = (parse_mac(f.u1.mac())?, gateway_mac(&f.n1, &f.u1)?);
    let mut outcomes = Vec::new();
    for (n, shape) in SHAPES.into_iter().enumerate() {
        let n = n as u16;
        let (src, dst) = if shape.v6() {
            (IpAddr::V6(f.u1.ipv6()), IpAddr::V6(f.b1.ipv6()))
        } else {
            (IpAddr::V4(f.u1.ipv4()), IpAddr::V4(f.b1.ipv4()))
        };
        let flow = Flow { src, dst, sport: 41000 + n, src_mac, dst_mac };
        let app = if shape.v6() { &mut app6 } else { &mut app4 };
        let out = attempt(&link, &flow, shape, n, app, &agent, &f.n1, mode == "ebpf")?;
        evidence(&format!("[{mode}] u1 -> b1:{APP_PORT} {shape:?}: {out}"));
        outcomes.push((shape, out));
    }
    let mut pings = Vec::new();
    for (n, kind) in PINGS.into_iter().enumerate() {
        let (src, dst) = if kind.v6() {
            (IpAddr::V6(f.u1.ipv6()), IpAddr::V6(f.b1.ipv6()))
        } else {
            (IpAddr::V4(f.u1.ipv4()), IpAddr::V4(f.b1.ipv4()))
        };
        let flow = Flow { src, dst, sport: 0, src_mac, dst_mac };
        let (replied, dropped) = ping(&link, &flow, kind, 0x7700 + n as u16, &agent, mode == "ebpf")?;
        evidence(&format!(
            "[{mode}] u1 -> b1 ping {kind:?}: {}, tc_unclassifiable_dropped +{dropped}",
            if replied { "answered" } else { "NOT answered" }
        ));
        pings.push((kind, replied, dropped));
    }
    let exported = metric_sum(
        &http_get(&f.n1, 15020, "/metrics")?,
        "sluice_datapath_events_total",
        &["event=\"tc_unclassifiable_dropped\""],
    );
    evidence(&format!("[{mode}] sluice_datapath_events_total{{event=\"tc_unclassifiable_dropped\"}} = {exported}"));
    Ok(Run { syns: outcomes, pings, exported })
}

/// Every SYN must end at the agent or be dropped, never at the app; every
/// ping must be answered, nothing of it dropped.
fn check(mode: &str, run: &Run) -> Result<()> {
    let mut problems = Vec::new();
    for (kind, replied, dropped) in &run.pings {
        if !replied || *dropped != 0 {
            problems.push(format!("ping {kind:?}: answered {replied}, tc_unclassifiable_dropped +{dropped}"));
        }
    }
    for (shape, out) in &run.syns {
        if out.app_accepted {
            problems.push(format!("{shape:?}: the app accepted a connection from u1, which the policy denies ({out})"));
            continue;
        }
        let fine = match (mode, shape.unclassifiable()) {
            // Handed to the agent, which denied it.
            ("iptables", _) => out.syn_ack && out.denied == 1,
            ("ebpf", 0) => out.syn_ack && out.assigned == 1 && out.denied == 1 && out.dropped == 0,
            // Dropped at tc, every fragment counted, nothing answered.
            ("ebpf", frames) => !out.syn_ack && out.dropped == frames && out.assigned == 0 && out.denied == 0,
            _ => unreachable!(),
        };
        if !fine {
            problems.push(format!("{shape:?}: {out}"));
        }
    }
    let dropped: u64 = run.syns.iter().map(|(_, o)| o.dropped).sum();
    if run.exported != dropped {
        problems
            .push(format!("the metrics page exports {} unclassifiable drops, the pins say {dropped}", run.exported));
    }
    ensure!(problems.is_empty(), "[{mode}] {}", problems.join("; "));
    Ok(())
}

#[test]
fn ebpf_tc_ingress_fails_closed_on_fragments_and_extension_headers() -> Result<()> {
    require_root!(Ok(()));
    check("ebpf", &run("ebpf")?)
}

#[test]
fn iptables_mode_reassembles_before_redirect() -> Result<()> {
    require_root!(Ok(()));
    check("iptables", &run("iptables")?)
}

#[test]
fn crafted_segments_have_valid_checksums() {
    let flow = Flow {
        src: IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2)),
        dst: IpAddr::V4(Ipv4Addr::new(10, 10, 1, 1)),
        sport: 41000,
        src_mac: [2; 6],
        dst_mac: [4; 6],
    };
    // A correct checksum makes the sum over pseudo-header and segment 0.
    let frame = flow.plain(&flow.syn(7));
    assert_eq!(checksum(&frame[14..34]), 0, "IPv4 header");
    let seg = &frame[34..];
    let mut pseudo = vec![10, 10, 1, 2, 10, 10, 1, 1, 0, 6, 0, seg.len() as u8];
    pseudo.extend_from_slice(seg);
    assert_eq!(checksum(&pseudo), 0, "TCP over IPv4");
    let v6 = Flow {
        src: IpAddr::V6(Ipv6Addr::new(0xfd10, 1, 0, 0, 0, 0, 0, 2)),
        dst: IpAddr::V6(Ipv6Addr::new(0xfd10, 1, 0, 0, 0, 0, 0, 1)),
        ..flow
    };
    let frames = Shape::FragmentedV6.frames(&v6, 7, 1);
    assert_eq!(frames.len(), 2);
    // 14 + 40 + 8 (fragment header) + 24 and + 8 bytes of TCP.
    assert_eq!((frames[0].len(), frames[1].len()), (86, 70));
    let v4 = Shape::FragmentedV4.frames(&flow, 7, 1);
    assert_eq!((v4[0].len(), v4[1].len()), (42, 58));
    assert_eq!(u16::from_be_bytes([v4[0][20], v4[0][21]]), 0x2000, "MF, offset 0");
    assert_eq!(u16::from_be_bytes([v4[1][20], v4[1][21]]), 1, "offset 8 bytes");
}
