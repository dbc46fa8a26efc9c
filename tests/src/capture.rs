//! Packet capture on the simulated wire, and what the bytes on it prove.
//!
//! [`Capture`] runs `tcpdump` inside one named netns (normally the lan netns,
//! on the bridge that joins the nodes, where every node-to-node packet
//! passes). [`WireReport::from_pcap`] reads the classic libpcap file it
//! writes, reassembles every TCP direction, and walks the reassembled bytes
//! as TLS records: which streams are TLS 1.3 from first byte to last, which
//! are not TLS at all, whether any ClientHello carried SNI, which ALPN
//! protocols were offered, and whether some plaintext appears anywhere on
//! the wire ([`WireReport::contains`]).
//!
//! The parser needs no root and has its own unit tests with hand-built pcap
//! bytes; only [`Capture`] needs root (and tcpdump).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::process::lock;

/// The HBONE port: every node-to-node segment must have it on one side.
pub const HBONE_PORT: u16 = 15008;

// ---------------------------------------------------------------------------
// Capture: tcpdump in a netns
// ---------------------------------------------------------------------------

/// tcpdump's closing statistics (from its stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub captured: Option<u64>,
    pub received_by_filter: Option<u64>,
    pub dropped_by_kernel: Option<u64>,
}

/// A running `tcpdump -w` inside one netns. [`Capture::stop`] ends it with
/// SIGINT (tcpdump flushes and writes its statistics) and returns the file's
/// bytes; dropping it without `stop` SIGKILLs it by the PID we own.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    what: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Runs `ip netns exec <netns> tcpdump -i <iface> -U -s 0 -w <file> tcp`
    /// and returns once tcpdump reports that it is listening. `ip netns
    /// exec` execs tcpdump in place, so the PID we hold is tcpdump's.
    pub fn start(netns: &str, iface: &str, file: &Path) -> Result<Capture> {
        ensure!(
            !netns.is_empty() && !netns.contains('/') && netns != "." && netns != "..",
            "capture: bad netns name {netns:?}"
        );
        let ns_path = crate::netns::netns_path(netns);
        ensure!(
            ns_path.exists(),
            "capture: netns {netns} does not exist ({} missing); refusing to capture elsewhere",
            ns_path.display()
        );
        ensure!(!iface.is_empty() && !iface.starts_with('-'), "capture: bad interface {iface:?}");
        let _ = std::fs::remove_file(file);
        let what = format!("tcpdump -i {iface} in netns {netns}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "tcpdump", "-i", iface, "-U", "-s", "0", "-n"])
            // Stay root (Debian's tcpdump would switch to user tcpdump and
            // then may not write into a root-owned test dir), and give the
            // kernel a 64 MiB ring so a burst of GSO packets is not dropped.
            // --immediate-mode: without it TPACKET_V3 hands packets over
            // in blocks, and the last partial block is lost at SIGINT.
            .args(["-Z", "root", "-B", "65536", "--immediate-mode", "-w"])
            .arg(file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let (tx, rx) = mpsc::channel::<()>();
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let listening = line.contains("listening on");
                lock(&sink).push(line);
                if listening {
                    let _ = tx.send(());
                }
            }
        });
        let mut cap = Capture {
            child: Some(child),
            file: file.to_owned(),
            what,
            stderr: lines,
            stderr_thread: Some(stderr_thread),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => return Ok(cap),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // stderr closed: tcpdump exited without listening.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = cap.child.as_mut().and_then(|c| c.wait().ok());
                    bail!("{} exited before listening ({status:?}): {}", cap.what, cap.stderr_text());
                }
            }
            if let Some(status) = cap.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{} exited before listening ({status}): {}", cap.what, cap.stderr_text());
            }
            if Instant::now() > deadline {
                bail!("{} did not report listening within 10 s: {}", cap.what, cap.stderr_text());
            }
        }
    }

    /// The pcap file tcpdump writes.
    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything tcpdump printed to stderr so far.
    pub fn stderr_text(&self) -> String {
        lock(&self.stderr).join("\n")
    }

    /// SIGINT, wait for exit, return the pcap bytes.
    pub fn stop(self) -> Result<Vec<u8>> {
        Ok(self.stop_with_stats()?.0)
    }

    /// Like [`Self::stop`], also returning tcpdump's packet statistics (a
    /// non-zero `dropped_by_kernel`, or fewer `captured` than
    /// `received_by_filter`, means the capture has holes; see
    /// [`CaptureStats::complete`]).
    pub fn stop_with_stats(mut self) -> Result<(Vec<u8>, CaptureStats)> {
        // Let tcpdump write out what the kernel already holds: wait until
        // the file has not grown for 300 ms (at most 5 s).
        let (mut last, mut stable, give_up) = (None, 0, Instant::now() + Duration::from_secs(5));
        while stable < 3 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(100));
            let size = std::fs::metadata(&self.file).map(|m| m.len()).ok();
            stable = if size == last { stable + 1 } else { 0 };
            last = size;
        }
        let mut child = self.child.take().context("capture already stopped")?;
        // The pid is ours and unreaped, so it cannot name another process.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("SIGINT to {}: {e}", self.what);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().with_context(|| format!("waitpid {}", self.what))? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not exit within 15 s of SIGINT: {}", self.what, self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let text = self.stderr_text();
        // tcpdump exits 0 after SIGINT; a signal death is also acceptable.
        ensure!(status.success() || status.code().is_none(), "{} exited with {status}: {text}", self.what);
        let stats = parse_stats(&text);
        let bytes =
            std::fs::read(&self.file).with_context(|| format!("reading capture file {}", self.file.display()))?;
        Ok((bytes, stats))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
    }
}

impl CaptureStats {
    /// tcpdump reported its statistics, the kernel dropped nothing, and every
    /// packet that passed the filter reached the file.
    pub fn complete(&self) -> bool {
        self.dropped_by_kernel == Some(0) && self.captured.is_some() && self.captured == self.received_by_filter
    }
}

fn parse_stats(text: &str) -> CaptureStats {
    let mut s = CaptureStats::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(n) = words.next().and_then(|w| w.parse::<u64>().ok()) else {
            continue;
        };
        let rest: Vec<&str> = words.collect();
        let rest = rest.join(" ");
        if rest.starts_with("packets captured") {
            s.captured = Some(n);
        } else if rest.starts_with("packets received by filter") {
            s.received_by_filter = Some(n);
        } else if rest.starts_with("packets dropped by kernel") {
            s.dropped_by_kernel = Some(n);
        }
    }
    s
}

// ---------------------------------------------------------------------------
// pcap reader
// ---------------------------------------------------------------------------

pub const LINKTYPE_NULL: u32 = 0;
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;
pub const LINKTYPE_LINUX_SLL: u32 = 113;
pub const LINKTYPE_IPV4: u32 = 228;
pub const LINKTYPE_IPV6: u32 = 229;
pub const LINKTYPE_LINUX_SLL2: u32 = 276;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// One TCP segment from the capture.
#[derive(Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    /// TCP flags byte (`TCP_SYN`, `TCP_ACK`, ...).
    pub flags: u8,
    pub payload: Vec<u8>,
    /// Capture timestamp in nanoseconds since the epoch.
    pub ts_nanos: u64,
    /// The frame was cut short by the snap length, so `payload` is partial.
    pub truncated: bool,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} seq {} ack {} flags {:#04x} len {}{}",
            self.src,
            self.dst,
            self.seq,
            self.ack,
            self.flags,
            self.payload.len(),
            if self.truncated { " (truncated)" } else { "" }
        )
    }
}

/// A parsed pcap file: its TCP segments in capture order.
#[derive(Debug, Clone, Default)]
pub struct Pcap {
    pub link_type: u32,
    pub nanosecond: bool,
    pub big_endian: bool,
    /// All records in the file.
    pub packets: usize,
    /// Records that were not IPv4/IPv6 TCP (ARP, ND, UDP, ...).
    pub skipped: usize,
    /// The file ended inside a record (a capture killed mid-write).
    pub truncated_tail: bool,
    pub segments: Vec<Segment>,
}

struct Reader<'a> {
    buf: &'a [u8],
    be: bool,
}

impl Reader<'_> {
    fn u16(&self, at: usize) -> u16 {
        let b = [self.buf[at], self.buf[at + 1]];
        if self.be {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }
    fn u32(&self, at: usize) -> u32 {
        let b = [self.buf[at], self.buf[at + 1], self.buf[at + 2], self.buf[at + 3]];
        if self.be {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Pcap {
    /// Parses a classic libpcap file (either byte order, microsecond or
    /// nanosecond timestamps). pcapng is rejected with a clear error.
    pub fn parse(bytes: &[u8]) -> Result<Pcap> {
        ensure!(bytes.len() >= 24, "pcap: {} bytes, shorter than the 24-byte file header", bytes.len());
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        let (be, nanosecond) = match magic {
            [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
            [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
            [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
            [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
            [0x0a, 0x0d, 0x0d, 0x0a] => {
                bail!("pcap: this is pcapng, only classic pcap is supported")
            }
            m => bail!("pcap: unknown magic {m:02x?}"),
        };
        let r = Reader { buf: bytes, be };
        let major = r.u16(4);
        ensure!(major == 2, "pcap: unsupported version {major}.{}", r.u16(6));
        // The upper bits carry FCS information; the link type is the low 16.
        let link_type = r.u32(20) & 0xffff;
        let mut pcap = Pcap { link_type, nanosecond, big_endian: be, ..Pcap::default() };
        let mut at = 24;
        while at < bytes.len() {
            if bytes.len() - at < 16 {
                pcap.truncated_tail = true;
                break;
            }
            let ts_sec = u64::from(r.u32(at));
            let ts_frac = u64::from(r.u32(at + 4));
            let incl = r.u32(at + 8) as usize;
            let orig = r.u32(at + 12) as usize;
            at += 16;
            ensure!(incl <= 1 << 24, "pcap: record at byte {} claims {incl} bytes", at - 16);
            if bytes.len() - at < incl {
                pcap.truncated_tail = true;
                break;
            }
            let frame = &bytes[at..at + incl];
            at += incl;
            pcap.packets += 1;
            let ts_nanos = ts_sec * 1_000_000_000 + if nanosecond { ts_frac } else { ts_frac * 1000 };
            match decode_frame(link_type, frame, orig > incl) {
                Some(mut seg) => {
                    seg.ts_nanos = ts_nanos;
                    pcap.segments.push(seg);
                }
                None => pcap.skipped += 1,
            }
        }
        Ok(pcap)
    }
}

/// Link layer -> (ethertype, network-layer bytes).
fn strip_link(link_type: u32, frame: &[u8]) -> Option<(u16, &[u8])> {
    const IPV4: u16 = 0x0800;
    const IPV6: u16 = 0x86dd;
    let by_version = |ip: &[u8]| match ip.first()? >> 4 {
        4 => Some(IPV4),
        6 => Some(IPV6),
        _ => None,
    };
    match link_type {
        LINKTYPE_ETHERNET => {
            let mut off = 12;
            let mut ethertype = be16(frame.get(..14)?, 12);
            // 802.1Q / 802.1ad tags.
            while matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
                off += 4;
                ethertype = be16(frame.get(..off + 2)?, off);
            }
            Some((ethertype, frame.get(off + 2..)?))
        }
        LINKTYPE_LINUX_SLL => Some((be16(frame.get(..16)?, 14), &frame[16..])),
        LINKTYPE_LINUX_SLL2 => Some((be16(frame.get(..20)?, 0), &frame[20..])),
        LINKTYPE_RAW | 12 | 14 => Some((by_version(frame)?, frame)),
        LINKTYPE_IPV4 => Some((IPV4, frame)),
        LINKTYPE_IPV6 => Some((IPV6, frame)),
        LINKTYPE_NULL => {
            // 4-byte host-order address family; the IP version tells.
            let ip = frame.get(4..)?;
            Some((by_version(ip)?, ip))
        }
        _ => None,
    }
}

fn decode_frame(link_type: u32, frame: &[u8], snapped: bool) -> Option<Segment> {
    let (ethertype, ip) = strip_link(link_type, frame)?;
    // (src, dst, tcp bytes, whether the IP packet was cut short)
    let (src, dst, tcp, short) = match ethertype {
        0x0800 => {
            let h = ip.get(..20)?;
            if h[0] >> 4 != 4 || h[9] != 6 {
                return None;
            }
            let ihl = usize::from(h[0] & 0x0f) * 4;
            // Fragments other than the first carry no TCP header.
            if be16(h, 6) & 0x1fff != 0 || ihl < 20 {
                return None;
            }
            let total = usize::from(be16(h, 2));
            // total == 0: a TSO/BIG TCP super-packet; trust the capture.
            let end = if total == 0 || total > ip.len() { ip.len() } else { total };
            let short = total > ip.len();
            let src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
            (src, dst, ip.get(ihl..end)?, short)
        }
        0x86dd => {
            let h = ip.get(..40)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let plen = usize::from(be16(h, 4));
            let end = if plen == 0 || 40 + plen > ip.len() { ip.len() } else { 40 + plen };
            let short = plen != 0 && 40 + plen > ip.len();
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&h[8..24]);
            let src = IpAddr::V6(Ipv6Addr::from(addr));
            addr.copy_from_slice(&h[24..40]);
            let dst = IpAddr::V6(Ipv6Addr::from(addr));
            // Walk extension headers to TCP.
            let mut next = h[6];
            let mut off = 40;
            loop {
                match next {
                    6 => break,
                    0 | 43 | 60 => {
                        let eh = ip.get(off..off + 2)?;
                        next = eh[0];
                        off += (usize::from(eh[1]) + 1) * 8;
                    }
                    44 => {
                        let fh = ip.get(off..off + 8)?;
                        // Only an unfragmented or first fragment has TCP.
                        if be16(fh, 2) & 0xfff8 != 0 {
                            return None;
                        }
                        next = fh[0];
                        off += 8;
                    }
                    _ => return None,
                }
            }
            (src, dst, ip.get(off..end)?, short)
        }
        _ => return None,
    };
    let th = tcp.get(..20)?;
    let data_off = usize::from(th[12] >> 4) * 4;
    if data_off < 20 {
        return None;
    }
    Some(Segment {
        src: SocketAddr::new(src, be16(th, 0)),
        dst: SocketAddr::new(dst, be16(th, 2)),
        seq: be32(th, 4),
        ack: be32(th, 8),
        flags: th[13],
        payload: tcp.get(data_off..).unwrap_or_default().to_vec(),
        ts_nanos: 0,
        truncated: snapped || short,
    })
}

// ---------------------------------------------------------------------------
// TCP reassembly
// ---------------------------------------------------------------------------

/// One direction of one TCP connection, reassembled.
#[derive(Clone, Default)]
pub struct Stream {
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    pub segments: usize,
    /// A SYN of this direction was captured, so `data` starts at the first
    /// byte of the stream; otherwise at the lowest sequence number seen.
    pub syn_seen: bool,
    pub fin_seen: bool,
    pub rst_seen: bool,
    /// The bytes in sequence order, retransmissions removed; holes are not
    /// filled (see `gaps`), so `data` is contiguous only up to the first gap.
    pub data: Vec<u8>,
    /// `(offset in data, missing bytes)` for every hole in the sequence space.
    pub gaps: Vec<(usize, u64)>,
    /// Payload bytes seen more than once (retransmissions, overlaps).
    pub duplicate_bytes: u64,
    pub truncated_segments: usize,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} -> {:?}: {} segments, {} bytes, {} gaps, {} duplicate bytes{}{}",
            self.src,
            self.dst,
            self.segments,
            self.data.len(),
            self.gaps.len(),
            self.duplicate_bytes,
            if self.syn_seen { ", SYN" } else { "" },
            if self.fin_seen { ", FIN" } else { "" },
        )
    }
}

impl Stream {
    /// The bytes before the first hole: all that can be parsed in order.
    pub fn contiguous(&self) -> &[u8] {
        &self.data[..self.gaps.first().map_or(self.data.len(), |g| g.0)]
    }

    /// Reassembles segments of ONE direction (same src and dst), given in
    /// capture order.
    pub fn reassemble<'a>(segments: impl IntoIterator<Item = &'a Segment>) -> Stream {
        let segs: Vec<&Segment> = segments.into_iter().collect();
        let mut s = Stream {
            src: segs.first().map(|x| x.src),
            dst: segs.first().map(|x| x.dst),
            segments: segs.len(),
            ..Stream::default()
        };
        if segs.is_empty() {
            return s;
        }
        s.fin_seen = segs.iter().any(|x| x.flags & TCP_FIN != 0);
        s.rst_seen = segs.iter().any(|x| x.flags & TCP_RST != 0);
        s.truncated_segments = segs.iter().filter(|x| x.truncated).count();
        // Base sequence number: the byte after the SYN, or the first seen.
        let syn = segs.iter().find(|x| x.flags & TCP_SYN != 0);
        s.syn_seen = syn.is_some();
        let base = syn.map_or(segs[0].seq, |x| x.seq.wrapping_add(1));
        // Unwrap 32-bit sequence numbers into 64-bit offsets from `base`,
        // each relative to the previous one (in capture order), so a stream
        // longer than 4 GiB, or one whose numbers wrap, stays ordered.
        let mut last: i64 = 0;
        let mut pieces: Vec<(i64, &[u8])> = Vec::new();
        for seg in segs.iter() {
            let rel = i64::from(seg.seq.wrapping_sub(base));
            let cands = [rel - (1 << 32), rel, rel + (1 << 32)];
            let mut off = cands.into_iter().min_by_key(|c| (c - last).abs()).unwrap_or(rel);
            // Payload starts after the SYN's sequence number.
            let mut data: &[u8] = &seg.payload;
            if seg.flags & TCP_SYN != 0 {
                off += 1;
            }
            last = off;
            if off < 0 {
                // Bytes from before the captured start: keep what is after it.
                let skip = usize::try_from(-off).unwrap_or(usize::MAX).min(data.len());
                data = &data[skip..];
                off = 0;
                s.duplicate_bytes += skip as u64;
            }
            if !data.is_empty() {
                pieces.push((off, data));
            }
        }
        // In order; at equal offsets the longest first.
        pieces.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        let mut cursor: i64 = 0;
        for (off, data) in pieces {
            let end = off + data.len() as i64;
            if end <= cursor {
                s.duplicate_bytes += data.len() as u64;
                continue;
            }
            if off > cursor {
                s.gaps.push((s.data.len(), (off - cursor) as u64));
                s.data.extend_from_slice(data);
            } else {
                let skip = (cursor - off) as usize;
                s.duplicate_bytes += skip as u64;
                s.data.extend_from_slice(&data[skip..]);
            }
            cursor = end;
        }
        s
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

pub const TLS_CHANGE_CIPHER_SPEC: u8 = 20;
pub const TLS_ALERT: u8 = 21;
pub const TLS_HANDSHAKE: u8 = 22;
pub const TLS_APPLICATION_DATA: u8 = 23;
pub const TLS13: u16 = 0x0304;
/// Largest legal TLSCiphertext fragment (2^14 + 2048, TLS 1.2's bound).
pub const TLS_MAX_RECORD: usize = (1 << 14) + 2048;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// SHA-256("HelloRetryRequest"): the ServerHello.random of an HRR.
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91, 0xc2, 0xa2, 0x11,
    0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub legacy_version: u16,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    /// From the supported_versions extension.
    pub supported_versions: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerHello {
    pub legacy_version: u16,
    pub cipher_suite: u16,
    /// From the supported_versions extension (absent before TLS 1.3).
    pub selected_version: Option<u16>,
    pub hello_retry_request: bool,
}

impl ServerHello {
    /// The negotiated version: supported_versions if present, else legacy.
    pub fn version(&self) -> u16 {
        self.selected_version.unwrap_or(self.legacy_version)
    }
}

/// What the TLS record layer of one reassembled direction looks like.
#[derive(Debug, Clone, Default)]
pub struct TlsStream {
    pub records: usize,
    /// Records per content type.
    pub record_types: BTreeMap<u8, usize>,
    /// Every byte of the (contiguous part of the) stream lies inside a
    /// record with a known type, version 3.x and a legal length, and the
    /// last record is complete.
    pub well_formed: bool,
    /// Where parsing stopped, if it did not reach the end, and why.
    pub error: Option<String>,
    /// Handshake message types seen in plaintext handshake records.
    pub plaintext_handshake: Vec<u8>,
    pub client_hellos: Vec<ClientHello>,
    pub server_hellos: Vec<ServerHello>,
    /// After the plaintext hello(s) every record is application_data or
    /// change_cipher_spec, as TLS 1.3 requires (everything else is
    /// encrypted and looks like application_data).
    pub post_handshake_ok: bool,
    /// Bytes inside application_data records (headers excluded).
    pub application_data_bytes: u64,
}

impl TlsStream {
    /// Parses records from the start of `data`, which must be the start of
    /// the stream.
    pub fn parse(data: &[u8]) -> TlsStream {
        let mut t = TlsStream { well_formed: true, post_handshake_ok: true, ..TlsStream::default() };
        let mut at = 0;
        // Handshake bytes from plaintext records, re-framed into messages.
        let mut hs = Vec::new();
        let mut encrypted = false;
        while at < data.len() {
            let Some(h) = data.get(at..at + 5) else {
                t.fail(format!("{} trailing bytes at {at}, shorter than a record header", data.len() - at));
                break;
            };
            let (ty, ver, len) = (h[0], be16(h, 1), usize::from(be16(h, 3)));
            if !(TLS_CHANGE_CIPHER_SPEC..=TLS_APPLICATION_DATA).contains(&ty) {
                t.fail(format!("record type {ty} at byte {at}"));
                break;
            }
            if ver >> 8 != 3 || ver & 0xff > 4 {
                t.fail(format!("record version {ver:#06x} at byte {at}"));
                break;
            }
            if len == 0 && ty != TLS_APPLICATION_DATA || len > TLS_MAX_RECORD {
                t.fail(format!("record length {len} at byte {at}"));
                break;
            }
            let Some(body) = data.get(at + 5..at + 5 + len) else {
                t.fail(format!("record at byte {at} of length {len} cut off at {}", data.len()));
                break;
            };
            t.records += 1;
            *t.record_types.entry(ty).or_default() += 1;
            match ty {
                // Plaintext handshake: only hellos belong here in TLS 1.3
                // (two ClientHellos after a HelloRetryRequest); everything
                // after them is encrypted.
                TLS_HANDSHAKE if !encrypted => {
                    hs.extend_from_slice(body);
                    while hs.len() >= 4 {
                        let mlen = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
                        if hs.len() < 4 + mlen {
                            break;
                        }
                        let msg: Vec<u8> = hs.drain(..4 + mlen).collect();
                        t.plaintext_handshake.push(msg[0]);
                        let parsed = match msg[0] {
                            1 => parse_client_hello(&msg[4..]).map(|ch| t.client_hellos.push(ch)),
                            2 => parse_server_hello(&msg[4..]).map(|sh| t.server_hellos.push(sh)),
                            _ => None,
                        };
                        if parsed.is_none() {
                            t.post_handshake_ok = false;
                        }
                    }
                }
                TLS_APPLICATION_DATA => {
                    encrypted = true;
                    t.application_data_bytes += len as u64;
                }
                TLS_CHANGE_CIPHER_SPEC => {}
                // A plaintext alert, or a handshake record once encrypted
                // records have begun: neither is TLS 1.3.
                _ => t.post_handshake_ok = false,
            }
            at += 5 + len;
        }
        if !hs.is_empty() {
            // A handshake message split across records but never completed.
            t.post_handshake_ok = false;
        }
        t
    }

    fn fail(&mut self, why: String) {
        self.well_formed = false;
        self.error.get_or_insert(why);
    }

    /// The stream began with a hello in a record: it is TLS, whatever else.
    pub fn has_hello(&self) -> bool {
        !self.client_hellos.is_empty() || !self.server_hellos.is_empty()
    }
}

/// A cursor over big-endian TLS fields that never panics.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(be16(self.take(2)?, 0))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// `(type, data)` of every extension; stops quietly at malformed ones.
fn extensions(mut f: Fields<'_>) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let Some(all) = f.vec16() else { return out };
    let mut e = Fields(all);
    while let (Some(ty), Some(data)) = (e.u16(), e.vec16()) {
        out.push((ty, data));
    }
    out
}

/// Parses a ClientHello body (after the 4-byte handshake header).
pub fn parse_client_hello(body: &[u8]) -> Option<ClientHello> {
    let mut f = Fields(body);
    let mut ch = ClientHello { legacy_version: f.u16()?, ..ClientHello::default() };
    f.take(32)?; // random
    f.vec8()?; // legacy_session_id
    f.vec16()?; // cipher_suites
    f.vec8()?; // legacy_compression_methods
    for (ty, data) in extensions(f) {
        let mut d = Fields(data);
        match ty {
            EXT_SERVER_NAME => {
                // server_name_list: (type u8, host_name vec16)*
                let mut list = Fields(d.vec16().unwrap_or_default());
                let mut name = String::new();
                while let (Some(_kind), Some(host)) = (list.u8(), list.vec16()) {
                    name = String::from_utf8_lossy(host).into_owned();
                }
                // Present even if empty: the extension itself is SNI.
                ch.sni = Some(name);
            }
            EXT_ALPN => {
                let mut list = Fields(d.vec16().unwrap_or_default());
                while let Some(p) = list.vec8() {
                    ch.alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            EXT_SUPPORTED_VERSIONS => {
                let mut list = Fields(d.vec8().unwrap_or_default());
                while let Some(v) = list.u16() {
                    ch.supported_versions.push(v);
                }
            }
            _ => {}
        }
    }
    Some(ch)
}

/// Parses a ServerHello body (after the 4-byte handshake header).
pub fn parse_server_hello(body: &[u8]) -> Option<ServerHello> {
    let mut f = Fields(body);
    let legacy_version = f.u16()?;
    let random = f.take(32)?;
    f.vec8()?; // legacy_session_id_echo
    let cipher_suite = f.u16()?;
    f.u8()?; // legacy_compression_method
    let mut sh =
        ServerHello { legacy_version, cipher_suite, selected_version: None, hello_retry_request: random == HRR_RANDOM };
    for (ty, data) in extensions(f) {
        if ty == EXT_SUPPORTED_VERSIONS && data.len() == 2 {
            sh.selected_version = Some(be16(data, 0));
        }
    }
    Some(sh)
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

/// How one reassembled direction classifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StreamKind {
    /// No payload (a bare handshake, pure ACKs).
    Empty,
    /// Complete, every byte in well-formed records, the connection's
    /// ServerHello selected 0x0304 via supported_versions, and nothing but
    /// application_data / change_cipher_spec after the hello.
    Tls13,
    /// Starts as TLS but is not (provably) TLS 1.3 end to end: another
    /// version, holes in the capture, a malformed record later on.
    TlsOther,
    /// Does not start with a TLS hello in a well-formed record.
    NotTls,
}

/// One direction with its analysis.
#[derive(Debug, Clone)]
pub struct StreamReport {
    pub stream: Stream,
    pub tls: TlsStream,
    /// The version chosen by the ServerHello of this connection (this
    /// direction's own, or the reverse direction's for a client).
    pub negotiated: Option<u16>,
    pub kind: StreamKind,
}

/// Everything a capture shows about the wire.
#[derive(Debug, Clone, Default)]
pub struct WireReport {
    pub packets: usize,
    pub segments: usize,
    /// One-way TCP flows (a connection counts twice).
    pub streams: usize,
    pub ports_seen: BTreeSet<u16>,
    pub addrs_seen: BTreeSet<IpAddr>,
    /// TCP segments with neither port 15008.
    pub non_hbone_segments: usize,
    pub empty_streams: usize,
    pub tls13_streams: usize,
    pub tls_other_streams: usize,
    pub non_tls_streams: usize,
    pub client_hellos: usize,
    pub server_hellos: usize,
    /// A ClientHello carried the server_name extension.
    pub sni_seen: bool,
    pub sni: BTreeSet<String>,
    /// ALPN protocols offered in ClientHellos (TLS 1.3 hides the server's
    /// choice in EncryptedExtensions).
    pub alpn: BTreeSet<String>,
    /// Versions selected by ServerHellos (supported_versions, else legacy).
    pub tls_versions: BTreeSet<u16>,
    /// TCP payload bytes over all segments, retransmissions included.
    pub total_payload: usize,
    /// Reassembled stream bytes, retransmissions removed.
    pub stream_bytes: usize,
    pub gap_bytes: u64,
    pub duplicate_bytes: u64,
    pub truncated_segments: usize,
    pub per_stream: Vec<StreamReport>,
    /// Payloads of all segments, for [`Self::contains`].
    raw: Vec<Vec<u8>>,
}

impl WireReport {
    pub fn from_pcap(bytes: &[u8]) -> Result<WireReport> {
        let pcap = Pcap::parse(bytes)?;
        let mut r = WireReport::from_segments(pcap.segments);
        r.packets = pcap.packets;
        Ok(r)
    }

    pub fn from_segments(segments: Vec<Segment>) -> WireReport {
        let mut r = WireReport { segments: segments.len(), packets: segments.len(), ..WireReport::default() };
        let mut flows: BTreeMap<(SocketAddr, SocketAddr), Vec<usize>> = BTreeMap::new();
        for (i, s) in segments.iter().enumerate() {
            r.ports_seen.extend([s.src.port(), s.dst.port()]);
            r.addrs_seen.extend([s.src.ip(), s.dst.ip()]);
            if s.src.port() != HBONE_PORT && s.dst.port() != HBONE_PORT {
                r.non_hbone_segments += 1;
            }
            r.total_payload += s.payload.len();
            flows.entry((s.src, s.dst)).or_default().push(i);
        }
        let parsed: BTreeMap<(SocketAddr, SocketAddr), (Stream, TlsStream)> = flows
            .iter()
            .map(|(k, idx)| {
                let stream = Stream::reassemble(idx.iter().map(|&i| &segments[i]));
                let tls = TlsStream::parse(stream.contiguous());
                (*k, (stream, tls))
            })
            .collect();
        let chosen: BTreeMap<(SocketAddr, SocketAddr), u16> =
            parsed.iter().filter_map(|(k, (_, t))| Some((*k, t.server_hellos.last()?.version()))).collect();
        for (key, (stream, tls)) in parsed {
            // This direction's own ServerHello, or the reverse direction's.
            let negotiated = chosen.get(&key).or_else(|| chosen.get(&(key.1, key.0))).copied();
            let complete = stream.gaps.is_empty() && stream.truncated_segments == 0;
            let kind = if stream.data.is_empty() {
                StreamKind::Empty
            } else if !tls.has_hello() {
                StreamKind::NotTls
            } else if complete && tls.well_formed && tls.post_handshake_ok && negotiated == Some(TLS13) {
                StreamKind::Tls13
            } else {
                StreamKind::TlsOther
            };
            r.per_stream.push(StreamReport { stream, tls, negotiated, kind });
        }
        for s in &r.per_stream {
            match s.kind {
                StreamKind::Empty => r.empty_streams += 1,
                StreamKind::Tls13 => r.tls13_streams += 1,
                StreamKind::TlsOther => r.tls_other_streams += 1,
                StreamKind::NotTls => r.non_tls_streams += 1,
            }
            for ch in &s.tls.client_hellos {
                r.client_hellos += 1;
                if let Some(name) = &ch.sni {
                    r.sni_seen = true;
                    r.sni.insert(name.clone());
                }
                r.alpn.extend(ch.alpn.iter().cloned());
            }
            for sh in &s.tls.server_hellos {
                r.server_hellos += 1;
                r.tls_versions.insert(sh.version());
            }
            r.stream_bytes += s.stream.data.len();
            r.gap_bytes += s.stream.gaps.iter().map(|g| g.1).sum::<u64>();
            r.duplicate_bytes += s.stream.duplicate_bytes;
            r.truncated_segments += s.stream.truncated_segments;
        }
        r.streams = r.per_stream.len();
        r.raw = segments.into_iter().map(|s| s.payload).filter(|p| !p.is_empty()).collect();
        r
    }

    /// One-way streams that carried payload.
    pub fn nonempty_streams(&self) -> usize {
        self.streams - self.empty_streams
    }

    /// `needle` occurs in the captured TCP payload: in some reassembled
    /// stream (so across segment boundaries) or inside a single segment.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.per_stream.iter().any(|s| find(&s.stream.data, needle)) || self.raw.iter().any(|p| find(p, needle))
    }

    /// A one-paragraph summary for test evidence.
    pub fn summary(&self) -> String {
        let versions: Vec<String> = self.tls_versions.iter().map(|v| format!("{v:#06x}")).collect();
        format!(
            "{} packets, {} TCP segments ({} without port {HBONE_PORT}), ports {:?}, {} streams \
             ({} TLS 1.3, {} other TLS, {} not TLS, {} empty), {} ClientHello / {} ServerHello, \
             versions [{}], SNI {}, ALPN {:?}, {} payload bytes ({} reassembled, {} missing, {} duplicate)",
            self.packets,
            self.segments,
            self.non_hbone_segments,
            self.ports_seen,
            self.streams,
            self.tls13_streams,
            self.tls_other_streams,
            self.non_tls_streams,
            self.empty_streams,
            self.client_hellos,
            self.server_hellos,
            versions.join(", "),
            if self.sni_seen { format!("{:?}", self.sni) } else { "none".into() },
            self.alpn,
            self.total_payload,
            self.stream_bytes,
            self.gap_bytes,
            self.duplicate_bytes,
        )
    }
}

/// Substring search: first byte with `position` (memchr-like), then compare.
fn find(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut at = 0;
    while hay.len() - at >= needle.len() {
        match hay[at..=hay.len() - needle.len()].iter().position(|&b| b == first) {
            None => return false,
            Some(p) => {
                let start = at + p;
                if &hay[start + 1..start + needle.len()] == rest {
                    return true;
                }
                at = start + 1;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- builders ---------------------------------------------------------

    fn tcp(src_port: u16, dst_port: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&src_port.to_be_bytes());
        t.extend_from_slice(&dst_port.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&7u32.to_be_bytes()); // ack
        t.push(6 << 4); // 24-byte header: one option word
        t.push(flags);
        t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
        t.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        t.extend_from_slice(payload);
        t
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], tcp: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(tcp);
        h
    }

    fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, tcp: &[u8], hop_by_hop: bool) -> Vec<u8> {
        let mut ext = Vec::new();
        if hop_by_hop {
            ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next=TCP, PadN
        }
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((ext.len() + tcp.len()) as u16).to_be_bytes());
        h.push(if hop_by_hop { 0 } else { 6 });
        h.push(64);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&ext);
        h.extend_from_slice(tcp);
        h
    }

    fn ether(ethertype: u16, ip: &[u8], vlan: bool) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(ip);
        // Ethernet minimum-size padding, which must not become payload.
        while f.len() < 60 {
            f.push(0xee);
        }
        f
    }

    fn sll(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(ip);
        f
    }

    fn sll2(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = ethertype.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
        f.extend_from_slice(ip);
        f
    }

    /// A classic pcap file. `be`: write big-endian; `ns`: nanosecond magic.
    fn pcap(link: u32, be: bool, ns: bool, frames: &[Vec<u8>]) -> Vec<u8> {
        let w32 = |v: u32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let w16 = |v: u16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let mut out = Vec::new();
        out.extend_from_slice(&w32(if ns { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }));
        out.extend_from_slice(&w16(2));
        out.extend_from_slice(&w16(4));
        out.extend_from_slice(&w32(0));
        out.extend_from_slice(&w32(0));
        out.extend_from_slice(&w32(262_144));
        out.extend_from_slice(&w32(link));
        for (i, f) in frames.iter().enumerate() {
            out.extend_from_slice(&w32(1_700_000_000 + i as u32));
            out.extend_from_slice(&w32(500));
            out.extend_from_slice(&w32(f.len() as u32));
            out.extend_from_slice(&w32(f.len() as u32));
            out.extend_from_slice(f);
        }
        out
    }

    fn record(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![ty, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut e = ty.to_be_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u16).to_be_bytes());
        e.extend_from_slice(data);
        e
    }

    fn handshake(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(body);
        m
    }

    fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0x11; 32]);
        b.push(32);
        b.extend_from_slice(&[0x22; 32]);
        b.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        b.extend_from_slice(&[1, 0]);
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            exts.extend(ext(EXT_SERVER_NAME, &data));
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend_from_slice(p.as_bytes());
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            exts.extend(ext(EXT_ALPN, &data));
        }
        exts.extend(ext(EXT_SUPPORTED_VERSIONS, &[4, 3, 4, 3, 3]));
        b.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        b.extend_from_slice(&exts);
        handshake(1, &b)
    }

    fn server_hello(version: Option<u16>) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0x33; 32]);
        b.push(0);
        b.extend_from_slice(&[0x13, 0x01, 0]);
        let mut exts = ext(51, &[0, 0x1d, 0, 2, 9, 9]); // key_share, short
        if let Some(v) = version {
            exts.extend(ext(EXT_SUPPORTED_VERSIONS, &v.to_be_bytes()));
        }
        b.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        b.extend_from_slice(&exts);
        handshake(2, &b)
    }

    /// Client and server byte streams of a plausible TLS 1.3 connection.
    fn tls13_streams(sni: Option<&str>) -> (Vec<u8>, Vec<u8>) {
        let mut c = record(TLS_HANDSHAKE, &client_hello(sni, &["h2"]));
        c[2] = 1; // ClientHello records say 0x0301
        c.extend(record(TLS_CHANGE_CIPHER_SPEC, &[1]));
        c.extend(record(TLS_APPLICATION_DATA, &[0xab; 100]));
        c.extend(record(TLS_APPLICATION_DATA, &[0xcd; 3000]));
        let mut s = record(TLS_HANDSHAKE, &server_hello(Some(TLS13)));
        s.extend(record(TLS_CHANGE_CIPHER_SPEC, &[1]));
        s.extend(record(TLS_APPLICATION_DATA, &[0x77; 2000]));
        s.extend(record(TLS_APPLICATION_DATA, &[0x78; 3000]));
        (c, s)
    }

    const C4: [u8; 4] = [10, 10, 1, 1];
    const S4: [u8; 4] = [10, 10, 2, 1];

    /// Frames for one IPv4 connection: SYN, SYN-ACK, then each stream cut
    /// into `mss`-byte segments, interleaved.
    fn conn_frames(cport: u16, sport: u16, c: &[u8], s: &[u8], mss: usize) -> Vec<Vec<u8>> {
        let (cisn, sisn) = (1000u32, 0xffff_ff00u32); // the server's wraps
        let mut f = vec![
            ether(0x0800, &ipv4(C4, S4, &tcp(cport, sport, cisn, TCP_SYN, &[])), false),
            ether(0x0800, &ipv4(S4, C4, &tcp(sport, cport, sisn, TCP_SYN | TCP_ACK, &[])), false),
        ];
        let (cc, sc): (Vec<_>, Vec<_>) = (c.chunks(mss).collect(), s.chunks(mss).collect());
        let (mut co, mut so) = (0usize, 0usize);
        for i in 0..cc.len().max(sc.len()) {
            if let Some(p) = cc.get(i) {
                let seq = cisn.wrapping_add(1).wrapping_add(co as u32);
                f.push(ether(0x0800, &ipv4(C4, S4, &tcp(cport, sport, seq, TCP_ACK, p)), false));
                co += p.len();
            }
            if let Some(p) = sc.get(i) {
                let seq = sisn.wrapping_add(1).wrapping_add(so as u32);
                f.push(ether(0x0800, &ipv4(S4, C4, &tcp(sport, cport, seq, TCP_ACK | TCP_PSH, p)), false));
                so += p.len();
            }
        }
        f
    }

    // --- tests ------------------------------------------------------------

    #[test]
    fn all_four_magics_and_link_types() {
        let seg = tcp(40000, 15008, 5, TCP_ACK, b"hello");
        let ip4 = ipv4(C4, S4, &seg);
        let (a6, b6): (Ipv6Addr, Ipv6Addr) = ("fd10:1::1".parse().unwrap(), "fd10:2::1".parse().unwrap());
        let ip6 = ipv6(a6, b6, &seg, false);
        let cases: Vec<(u32, Vec<u8>, IpAddr)> = vec![
            (LINKTYPE_ETHERNET, ether(0x0800, &ip4, false), IpAddr::V4(C4.into())),
            (LINKTYPE_ETHERNET, ether(0x86dd, &ip6, true), IpAddr::V6(a6)),
            (LINKTYPE_LINUX_SLL, sll(0x0800, &ip4), IpAddr::V4(C4.into())),
            (LINKTYPE_LINUX_SLL, sll(0x86dd, &ip6), IpAddr::V6(a6)),
            (LINKTYPE_LINUX_SLL2, sll2(0x0800, &ip4), IpAddr::V4(C4.into())),
            (LINKTYPE_LINUX_SLL2, sll2(0x86dd, &ip6), IpAddr::V6(a6)),
            (LINKTYPE_RAW, ip6.clone(), IpAddr::V6(a6)),
        ];
        for (link, frame, src) in cases {
            for be in [false, true] {
                for ns in [false, true] {
                    let file = pcap(link, be, ns, std::slice::from_ref(&frame));
                    let p = Pcap::parse(&file).unwrap();
                    assert_eq!((p.link_type, p.big_endian, p.nanosecond), (link, be, ns));
                    assert_eq!(p.segments.len(), 1, "link {link} be {be} ns {ns}");
                    let s = &p.segments[0];
                    assert_eq!(s.src, SocketAddr::new(src, 40000));
                    assert_eq!(s.dst.port(), 15008);
                    assert_eq!((s.seq, s.ack, s.flags), (5, 7, TCP_ACK));
                    // The Ethernet padding is not payload.
                    assert_eq!(s.payload, b"hello");
                    let frac = if ns { 500 } else { 500_000 };
                    assert_eq!(s.ts_nanos, 1_700_000_000 * 1_000_000_000 + frac);
                }
            }
        }
    }

    #[test]
    fn ipv6_extension_headers_and_non_tcp() {
        let (a6, b6): (Ipv6Addr, Ipv6Addr) = ("fd10:1::1".parse().unwrap(), "fd10:2::1".parse().unwrap());
        let seg = tcp(1, 2, 9, TCP_ACK, b"x");
        let mut udp = ipv4(C4, S4, &[0; 8]);
        udp[9] = 17;
        let arp = {
            let mut f = vec![0xff; 12];
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0; 28]);
            f
        };
        let file = pcap(
            LINKTYPE_ETHERNET,
            false,
            false,
            &[ether(0x86dd, &ipv6(a6, b6, &seg, true), false), ether(0x0800, &udp, false), arp],
        );
        let p = Pcap::parse(&file).unwrap();
        assert_eq!((p.packets, p.skipped, p.segments.len()), (3, 2, 1));
        assert_eq!(p.segments[0].payload, b"x");
        assert_eq!(p.segments[0].dst, SocketAddr::new(IpAddr::V6(b6), 2));
    }

    #[test]
    fn rejects_garbage_and_tolerates_cut_tail() {
        assert!(Pcap::parse(b"short").is_err());
        assert!(Pcap::parse(&[0u8; 24]).is_err());
        let mut ng = vec![0x0a, 0x0d, 0x0d, 0x0a];
        ng.extend_from_slice(&[0; 40]);
        assert!(format!("{:#}", Pcap::parse(&ng).unwrap_err()).contains("pcapng"));
        let frame = ether(0x0800, &ipv4(C4, S4, &tcp(1, 2, 3, TCP_ACK, b"abc")), false);
        let mut file = pcap(LINKTYPE_ETHERNET, false, false, &[frame.clone(), frame]);
        file.truncate(file.len() - 10);
        let p = Pcap::parse(&file).unwrap();
        assert!(p.truncated_tail);
        assert_eq!(p.segments.len(), 1);
    }

    fn seg(seq: u32, flags: u8, payload: &[u8]) -> Segment {
        Segment {
            src: "10.0.0.1:1000".parse().unwrap(),
            dst: "10.0.0.2:15008".parse().unwrap(),
            seq,
            ack: 0,
            flags,
            payload: payload.to_vec(),
            ts_nanos: 0,
            truncated: false,
        }
    }

    #[test]
    fn reassembly_orders_dedups_and_wraps() {
        // ISN just below 2^32: data wraps around zero.
        let isn = u32::MAX - 5;
        let segs = [
            seg(isn, TCP_SYN, b""),
            seg(isn.wrapping_add(1), TCP_ACK, b"abcd"),
            seg(isn.wrapping_add(9), TCP_ACK, b"ijkl"), // out of order
            seg(isn.wrapping_add(5), TCP_ACK, b"efgh"),
            seg(isn.wrapping_add(5), TCP_ACK, b"efgh"),     // retransmission
            seg(isn.wrapping_add(7), TCP_ACK, b"ghijklmn"), // overlap
            seg(isn.wrapping_add(15), TCP_ACK | TCP_FIN, b""),
        ];
        let s = Stream::reassemble(&segs);
        assert_eq!(s.data, b"abcdefghijklmn");
        assert!(s.gaps.is_empty());
        assert!(s.syn_seen && s.fin_seen);
        assert_eq!(s.duplicate_bytes, 4 + 6);
        assert_eq!(s.contiguous(), b"abcdefghijklmn");
    }

    #[test]
    fn reassembly_without_syn_and_with_a_hole() {
        let segs = [seg(100, TCP_ACK, b"0123"), seg(108, TCP_ACK, b"89"), seg(96, TCP_ACK, b"xx")];
        let s = Stream::reassemble(&segs);
        // No SYN: starts at the first seen sequence number; earlier bytes dropped.
        assert_eq!(s.data, b"012389");
        assert_eq!(s.gaps, vec![(4, 4)]);
        assert_eq!(s.contiguous(), b"0123");
    }

    #[test]
    fn tls13_connection_is_recognised() {
        let (c, s) = tls13_streams(None);
        let file = pcap(LINKTYPE_ETHERNET, false, false, &conn_frames(40000, 15008, &c, &s, 700));
        let r = WireReport::from_pcap(&file).unwrap();
        assert_eq!(r.streams, 2);
        assert_eq!(r.tls13_streams, 2, "{r:#?}");
        assert_eq!((r.non_tls_streams, r.tls_other_streams, r.non_hbone_segments), (0, 0, 0));
        assert_eq!(r.tls_versions, BTreeSet::from([TLS13]));
        assert!(!r.sni_seen);
        assert_eq!(r.alpn, BTreeSet::from(["h2".to_string()]));
        assert_eq!(r.ports_seen, BTreeSet::from([40000, 15008]));
        assert_eq!(r.total_payload, c.len() + s.len());
        assert_eq!((r.client_hellos, r.server_hellos), (1, 1));
        let client = r.per_stream.iter().find(|x| x.stream.dst.unwrap().port() == 15008).unwrap();
        assert_eq!(client.stream.data, c);
        assert_eq!(client.tls.application_data_bytes, 3100);
        let server = r.per_stream.iter().find(|x| x.stream.src.unwrap().port() == 15008).unwrap();
        assert_eq!(server.stream.data, s, "server stream wraps its sequence numbers");
        assert!(r.contains(&[0xcd; 64]));
        assert!(r.contains(&s[690..710])); // across a segment boundary (mss 700)
        assert!(!r.contains(b"plaintext"));
        assert!(r.summary().contains("2 TLS 1.3"));
    }

    #[test]
    fn sni_and_old_versions_are_reported() {
        let (c, _) = tls13_streams(Some("b1.default.svc"));
        let mut s = record(TLS_HANDSHAKE, &server_hello(None)); // TLS 1.2
        s.extend(record(TLS_HANDSHAKE, &handshake(11, &[0; 40]))); // Certificate in clear
        let r = WireReport::from_pcap(&pcap(LINKTYPE_ETHERNET, true, true, &conn_frames(40001, 15008, &c, &s, 1460)))
            .unwrap();
        assert!(r.sni_seen);
        assert_eq!(r.sni, BTreeSet::from(["b1.default.svc".to_string()]));
        assert_eq!(r.tls_versions, BTreeSet::from([0x0303]));
        assert_eq!((r.tls13_streams, r.tls_other_streams), (0, 2));
        let server = r.per_stream.iter().find(|x| x.stream.src.unwrap().port() == 15008).unwrap();
        assert_eq!(server.tls.plaintext_handshake, vec![2, 11]);
        assert!(!server.tls.post_handshake_ok);
    }

    #[test]
    fn plaintext_is_not_tls_and_is_found() {
        let mut data = vec![0u8; 5000];
        crate::pattern::fill(0, &mut data);
        let mut window = [0u8; 64];
        crate::pattern::fill(3000, &mut window);
        let r = WireReport::from_pcap(&pcap(
            LINKTYPE_ETHERNET,
            false,
            false,
            &conn_frames(40002, 8080, &data, &data, 1448),
        ))
        .unwrap();
        assert_eq!((r.non_tls_streams, r.tls13_streams), (2, 0));
        assert_eq!(r.non_hbone_segments, r.segments);
        assert!(!r.ports_seen.contains(&HBONE_PORT));
        // 3000 straddles the segment boundary at 2896: reassembly finds it.
        assert!(r.contains(&window));
        crate::pattern::fill(7000, &mut window);
        assert!(!r.contains(&window));
    }

    #[test]
    fn malformed_records_are_caught() {
        let (c, s) = tls13_streams(None);
        // A stray byte after the last record.
        let mut bad = s.clone();
        bad.push(0x17);
        let t = TlsStream::parse(&bad);
        assert!(!t.well_formed && t.error.as_deref().unwrap().contains("trailing"));
        // A plaintext alert after encryption started.
        let mut alert = c.clone();
        alert.extend(record(TLS_ALERT, &[2, 40]));
        let t = TlsStream::parse(&alert);
        assert!(t.well_formed && !t.post_handshake_ok);
        // An oversized record.
        let mut big = c.clone();
        big.extend([23, 3, 3, 0xff, 0xff]);
        assert!(TlsStream::parse(&big).error.unwrap().contains("length"));
        // A ClientHello split over two records is still read.
        let ch = client_hello(None, &["h2", "http/1.1"]);
        let mut split = record(TLS_HANDSHAKE, &ch[..50]);
        split.extend(record(TLS_HANDSHAKE, &ch[50..]));
        split.extend(record(TLS_APPLICATION_DATA, &[0; 10]));
        let t = TlsStream::parse(&split);
        assert!(t.well_formed && t.post_handshake_ok, "{t:?}");
        assert_eq!(t.client_hellos[0].alpn, vec!["h2", "http/1.1"]);
        assert_eq!(t.client_hellos[0].supported_versions, vec![TLS13, 0x0303]);
    }

    #[test]
    fn a_hole_makes_tls_unprovable() {
        let (c, s) = tls13_streams(None);
        let mut frames = conn_frames(40003, 15008, &c, &s, 500);
        frames.remove(6); // lose one data segment
        let r = WireReport::from_pcap(&pcap(LINKTYPE_ETHERNET, false, false, &frames)).unwrap();
        assert_eq!(r.tls13_streams, 1);
        assert_eq!(r.tls_other_streams, 1);
        assert_eq!(r.gap_bytes, 500);
    }

    #[test]
    fn tcpdump_stats() {
        let s = parse_stats(
            "tcpdump: listening on br0, link-type EN10MB (Ethernet)\n12 packets captured\n\
             14 packets received by filter\n0 packets dropped by kernel\n",
        );
        assert_eq!(s, CaptureStats { captured: Some(12), received_by_filter: Some(14), dropped_by_kernel: Some(0) });
    }

    #[test]
    fn find_works() {
        assert!(find(b"abcabd", b"abd"));
        assert!(!find(b"abcab", b"abd"));
        assert!(find(b"x", b""));
        assert!(!find(b"", b"x"));
    }
}
