//! The counters of `getsockopt(TCP_INFO)` the tests look at.
//!
//! Defined here rather than taken from `libc::tcp_info` so the layout is
//! pinned to linux/tcp.h up to `tcpi_segs_in`, whatever the libc version.

use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;

/// struct tcp_info from linux/tcp.h, up to and including tcpi_segs_in.
#[repr(C)]
#[derive(Default)]
struct RawTcpInfo {
    /// state, ca_state, retransmits, probes, backoff, options, wscale bits, app_limited bits
    bytes8: [u8; 8],
    /// tcpi_rto .. tcpi_total_retrans (24 x u32); total_retrans is the last.
    words: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
}

const _: () = {
    assert!(std::mem::offset_of!(RawTcpInfo, pacing_rate) == 104);
    assert!(std::mem::offset_of!(RawTcpInfo, bytes_acked) == 120);
    assert!(std::mem::offset_of!(RawTcpInfo, segs_in) == 140);
    assert!(std::mem::size_of::<RawTcpInfo>() == 144);
};

/// What the tests compare: segments and bytes that really crossed TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpInfo {
    pub segs_out: u32,
    pub segs_in: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub total_retrans: u32,
}

/// `getsockopt(fd, IPPROTO_TCP, TCP_INFO)`; fails if the kernel returns a
/// struct too short to hold the fields above (pre-4.2 kernels).
pub fn tcp_info(sock: &impl AsRawFd) -> std::io::Result<TcpInfo> {
    let mut raw = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: raw is a plain repr(C) struct of len bytes; the kernel writes
    // at most len bytes and reports how many in len.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut raw as *mut RawTcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<RawTcpInfo>() {
        return Err(std::io::Error::other(format!("TCP_INFO returned only {len} bytes")));
    }
    Ok(TcpInfo {
        segs_out: raw.segs_out,
        segs_in: raw.segs_in,
        bytes_acked: raw.bytes_acked,
        bytes_received: raw.bytes_received,
        total_retrans: raw.words[23],
    })
}
