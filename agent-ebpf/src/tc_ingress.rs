//! tc ingress on the pod's eth0, inside the pod's netns: inbound capture.
//!
//! Why: a SYN for any of the pod's ports (except HBONE 15008 and the agent's
//! own) is handed to the agent's 15006 listener with `bpf_sk_assign`, so
//! plaintext clients are authorized before the app sees them, without
//! iptables REDIRECT. The accepted socket keeps the original destination as
//! its local address. Attached on the pod side, never the node-side veth, so
//! the primary CNI's programs there are untouched. Needs 5.7 for
//! `bpf_sk_assign` at tc ingress and SOCKHASH lookups from tc.
//!
//! Fails closed: a TCP packet whose SYN cannot be recognised here would
//! reach the app's own listener, around 15006 and its policy, so it is
//! dropped (`TC_ACT_SHOT`, counted as `tc_unclassifiable_dropped`):
//! - IPv4 and IPv6 fragments of TCP. A non-first fragment has no TCP header,
//!   a first one may stop before the flags, and an assignment would not
//!   survive anyway: reassembly (`ip_defrag`, `ipv6_frag_rcv`) orphans the
//!   skb, so the reassembled SYN is looked up afresh and finds the app.
//!   Legitimate TCP does not fragment: it sizes segments by MSS and path
//!   MTU, with DF set on IPv4.
//! - IPv6 extension-header chains longer than the walk below (4 headers,
//!   as Cilium's `IPV6_MAX_HEADERS`), or truncated ones.
//!
//! IPv6 hop-by-hop, routing, destination-options and AH headers are walked
//! to find TCP, so a SYN behind them is assigned like any other. Everything
//! that is not TCP (UDP, ICMP, ICMPv6 neighbour discovery and MLD, which
//! carries a hop-by-hop header) passes untouched, fragments included.
//! iptables mode needs none of this: conntrack reassembles before REDIRECT.

use aya_ebpf::{
    bindings::{bpf_sock, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};

use agent_common::{counter, IpKey, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::{
    key::v4_mapped,
    maps::{count, LISTENERS},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// IPv4 `frag_off`: more-fragments flag and the offset (8-byte units).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// IPv6 extension headers that may stand between the fixed header and TCP.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// What the program makes of one packet.
enum L4 {
    /// TCP to `dst`, its header at `off` from the start of the frame.
    Tcp { dst: [u32; 4], off: usize },
    /// Not TCP, or not IP: not ours to judge.
    Other,
    /// TCP that cannot be classified: dropped.
    Unclassifiable,
}

#[classifier]
pub fn sluice_tc_ingress(ctx: TcContext) -> i32 {
    match classify(&ctx) {
        Ok(L4::Tcp { dst, off }) => match try_assign(&ctx, dst, off) {
            Ok(Verdict::Pass) | Err(_) => TC_ACT_OK,
            Ok(Verdict::Drop) => TC_ACT_SHOT,
        },
        Ok(L4::Unclassifiable) => {
            count(counter::TC_UNCLASSIFIABLE_DROPPED, 1);
            TC_ACT_SHOT
        }
        // A frame too short for the fixed IP header: the stack drops it.
        Ok(L4::Other) | Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Result<L4, i64> {
    match u16::from_be(ctx.load::<u16>(12)?) {
        ETH_P_IP => {
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
                return Ok(L4::Other);
            }
            // The protocol is in every fragment, so this holds for the
            // first, the middle and the last alike.
            let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?);
            if frag & (IP_MF | IP_OFFSET) != 0 {
                return Ok(L4::Unclassifiable);
            }
            let vihl: u8 = ctx.load(ETH_HLEN)?;
            let dst = v4_mapped(ctx.load::<u32>(ETH_HLEN + 16)?);
            Ok(L4::Tcp { dst, off: ETH_HLEN + ((vihl & 0x0f) as usize) * 4 })
        }
        ETH_P_IPV6 => {
            let dst = ctx.load::<[u32; 4]>(ETH_HLEN + 24)?;
            let mut nh: u8 = ctx.load(ETH_HLEN + 6)?;
            let mut off = ETH_HLEN + IPV6_HLEN;
            // Unrolled by hand rather than a loop: no back-edge for the
            // verifier to bound, and the same code on every kernel (bounded
            // loops need 5.3).
            skip_ext_header(ctx, &mut nh, &mut off);
            skip_ext_header(ctx, &mut nh, &mut off);
            skip_ext_header(ctx, &mut nh, &mut off);
            skip_ext_header(ctx, &mut nh, &mut off);
            Ok(match nh {
                IPPROTO_TCP => L4::Tcp { dst, off },
                // A fragment or a truncated header on the way, or still an
                // extension header after four: TCP may follow.
                UNCLASSIFIABLE | NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST => {
                    L4::Unclassifiable
                }
                _ => L4::Other,
            })
        }
        _ => Ok(L4::Other),
    }
}

/// Stands in for the next header once the walk met a fragment that may be
/// TCP, or a header it could not read; 255 is reserved, never a protocol.
const UNCLASSIFIABLE: u8 = 255;

/// One step of the IPv6 extension-header walk: if `nh` names a header that
/// may precede TCP, skip it, updating `nh` and `off`; otherwise do nothing.
/// A fragment header ends the walk: its next header is the first of the
/// fragmentable part, the same in every fragment, and becomes
/// `UNCLASSIFIABLE` when it is TCP or a header TCP may follow. So does a
/// header that cannot be read (the stack would drop it, but only after tc).
/// Needs only `bpf_skb_load_bytes` (4.5).
#[inline(always)]
fn skip_ext_header(ctx: &TcContext, nh: &mut u8, off: &mut usize) {
    let len = match *nh {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
            let Ok(hdr) = ctx.load::<[u8; 2]>(*off) else {
                *nh = UNCLASSIFIABLE;
                return;
            };
            *nh = hdr[0];
            (hdr[1] as usize + 1) * 8
        }
        // RFC 4302: length in 4-octet units, minus 2.
        NEXTHDR_AUTH => {
            let Ok(hdr) = ctx.load::<[u8; 2]>(*off) else {
                *nh = UNCLASSIFIABLE;
                return;
            };
            *nh = hdr[0];
            (hdr[1] as usize + 2) * 4
        }
        NEXTHDR_FRAGMENT => {
            let Ok(next) = ctx.load::<u8>(*off) else {
                *nh = UNCLASSIFIABLE;
                return;
            };
            *nh = match next {
                IPPROTO_TCP | NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST => {
                    UNCLASSIFIABLE
                }
                // UDP, ICMPv6, ...: fragments the stack may reassemble.
                other => other,
            };
            return;
        }
        _ => return,
    };
    *off += len;
}

/// What becomes of a TCP segment once classified.
enum Verdict {
    Pass,
    Drop,
}

/// Hands a SYN for the pod's ports to the agent's listener. With no
/// listener (the agent is down or between two processes) or a failed
/// assignment, the SYN is dropped, not passed: passed, it would reach the
/// app with no policy in the way. The client retransmits, and a new agent
/// picks it up; in eBPF mode the pinned cgroup programs already fail
/// closed the same way for outbound.
#[inline(always)]
fn try_assign(ctx: &TcContext, dst: [u32; 4], tcp: usize) -> Result<Verdict, i64> {
    let flags: u8 = ctx.load(tcp + 13)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(Verdict::Pass);
    }
    let port = u16::from_be(ctx.load::<u16>(tcp + 2)?);
    if port == HBONE_PORT || port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT {
        return Ok(Verdict::Pass);
    }
    let key = IpKey { ip: dst };
    // SAFETY: a lookup in a SOCKHASH from tc returns a referenced socket or
    // null; every non-null socket is released below.
    unsafe {
        let sk = bpf_map_lookup_elem(core::ptr::addr_of!(LISTENERS) as *mut _, core::ptr::addr_of!(key).cast())
            as *mut bpf_sock;
        if sk.is_null() {
            count(counter::TC_NO_AGENT_DROPPED, 1);
            return Ok(Verdict::Drop);
        }
        let ret = bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0);
        bpf_sk_release(sk.cast());
        if ret != 0 {
            count(counter::INBOUND_ASSIGN_FAILED, 1);
            return Ok(Verdict::Drop);
        }
        count(counter::INBOUND_ASSIGNED, 1);
    }
    Ok(Verdict::Pass)
}
