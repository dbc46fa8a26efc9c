//! cgroup/connect4 and cgroup/connect6: outbound capture.
//!
//! Why: rewriting the destination at connect() sends an enrolled pod's
//! connection straight to the agent's 15001 in the same netns, with no
//! iptables and no conntrack. The original destination is kept by socket
//! cookie for sock_ops to re-key once the connection is up. Needs 4.17 for
//! cgroup sock_addr hooks and 5.7 for `bpf_get_netns_cookie` there.

use core::ptr::{addr_of, addr_of_mut, read_volatile as rv, write_volatile as wv};

use agent_common::{counter, OrigDst, OUTBOUND_PORT, POD_HAS_V4, POD_HAS_V6};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    key::v4_mapped,
    maps::{count, ENROLLED, ORIG_DST_BY_COOKIE},
};

const IPPROTO_TCP: u32 = 6;
/// connect() goes on; the hook only changed where.
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed in; fields are read with
    // volatile loads at their own offsets, as the verifier requires.
    unsafe {
        let Some(pod) = enrolled_pod(sa) else { return PROCEED };
        let dst = rv(addr_of!((*sa).user_ip4));
        let port = u16::from_be(rv(addr_of!((*sa).user_port)) as u16);
        let first_octet = (u32::from_be(dst) >> 24) as u8;
        if pod.flags & POD_HAS_V4 == 0 || first_octet == 127 || dst == pod.ip4 {
            return PROCEED;
        }
        if remember(sa, v4_mapped(dst), port) {
            wv(addr_of_mut!((*sa).user_ip4), pod.ip4);
            wv(addr_of_mut!((*sa).user_port), OUTBOUND_PORT.to_be() as u32);
            count(counter::OUTBOUND_CAPTURED, 1);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    unsafe {
        let Some(pod) = enrolled_pod(sa) else { return PROCEED };
        let dst = [
            rv(addr_of!((*sa).user_ip6[0])),
            rv(addr_of!((*sa).user_ip6[1])),
            rv(addr_of!((*sa).user_ip6[2])),
            rv(addr_of!((*sa).user_ip6[3])),
        ];
        let port = u16::from_be(rv(addr_of!((*sa).user_port)) as u16);
        let mapped = dst[0] == 0 && dst[1] == 0 && dst[2] == u32::from_be(0x0000_ffff);
        let loopback = (dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == u32::from_be(1))
            || (mapped && (u32::from_be(dst[3]) >> 24) == 127);
        // A v4-mapped destination from a dual-stack socket goes to the pod's
        // IPv4 address, still as ::ffff:a.b.c.d.
        let target = if mapped { v4_mapped(pod.ip4) } else { pod.ip6 };
        let has = if mapped { pod.flags & POD_HAS_V4 } else { pod.flags & POD_HAS_V6 };
        if has == 0 || loopback || dst == target {
            return PROCEED;
        }
        if remember(sa, dst, port) {
            for (i, word) in target.iter().enumerate() {
                wv(addr_of_mut!((*sa).user_ip6[i]), *word);
            }
            wv(addr_of_mut!((*sa).user_port), OUTBOUND_PORT.to_be() as u32);
            count(counter::OUTBOUND_CAPTURED, 1);
        }
    }
    PROCEED
}

/// The enrolled pod this TCP socket belongs to. No exemption by socket
/// mark: the agent's own sockets never live in a pod's cgroup, and an app
/// with NET_ADMIN could set the mark to leave the mesh. No exemption for
/// port 15008 either: to a host outside the mesh it is a port like any
/// other, and to an enrolled pod the agent refuses it as its own port.
#[inline(always)]
unsafe fn enrolled_pod(sa: *mut bpf_sock_addr) -> Option<agent_common::PodInfo> {
    if rv(addr_of!((*sa).protocol)) != IPPROTO_TCP {
        return None;
    }
    let netns = bpf_get_netns_cookie(sa.cast());
    ENROLLED.get_ptr(netns).map(|p| *p)
}

/// Records the original destination; capture only if that worked, or the
/// agent would accept a connection it cannot route.
#[inline(always)]
unsafe fn remember(sa: *mut bpf_sock_addr, ip: [u32; 4], port: u16) -> bool {
    let cookie = bpf_get_socket_cookie(sa.cast());
    ORIG_DST_BY_COOKIE.insert(cookie, OrigDst { ip, port: port as u32 }, 0).is_ok()
}
