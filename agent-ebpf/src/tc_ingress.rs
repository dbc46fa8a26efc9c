//! tc ingress on the pod's eth0, inside the pod's netns: inbound capture.
//!
//! Why: a SYN for any of the pod's ports (except HBONE 15008 and the agent's
//! own) is handed to the agent's 15006 listener with `bpf_sk_assign`, so
//! plaintext clients are authorized before the app sees them, without
//! iptables REDIRECT. The accepted socket keeps the original destination as
//! its local address. Attached on the pod side, never the node-side veth, so
//! the primary CNI's programs there are untouched. Needs 5.7 for
//! `bpf_sk_assign` at tc ingress and SOCKHASH lookups from tc.

use aya_ebpf::{
    bindings::{bpf_sock, TC_ACT_OK},
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
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn sluice_tc_ingress(ctx: TcContext) -> i32 {
    let _ = try_assign(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn try_assign(ctx: &TcContext) -> Result<(), i64> {
    let proto = u16::from_be(ctx.load::<u16>(12)?);
    let (dst, tcp) = match proto {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN)?;
            if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
                return Ok(());
            }
            (v4_mapped(ctx.load::<u32>(ETH_HLEN + 16)?), ETH_HLEN + ((vihl & 0x0f) as usize) * 4)
        }
        // Extension headers before TCP are not followed: such SYNs keep the
        // normal path rather than being guessed at.
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6)? != IPPROTO_TCP {
                return Ok(());
            }
            (ctx.load::<[u32; 4]>(ETH_HLEN + 24)?, ETH_HLEN + 40)
        }
        _ => return Ok(()),
    };
    let flags: u8 = ctx.load(tcp + 13)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(());
    }
    let port = u16::from_be(ctx.load::<u16>(tcp + 2)?);
    if port == HBONE_PORT || port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT {
        return Ok(());
    }
    let key = IpKey { ip: dst };
    // SAFETY: a lookup in a SOCKHASH from tc returns a referenced socket or
    // null; every non-null socket is released below.
    unsafe {
        let sk = bpf_map_lookup_elem(core::ptr::addr_of!(LISTENERS) as *mut _, core::ptr::addr_of!(key).cast())
            as *mut bpf_sock;
        if sk.is_null() {
            return Ok(());
        }
        let ret = bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0);
        bpf_sk_release(sk.cast());
        count(if ret == 0 { counter::INBOUND_ASSIGNED } else { counter::INBOUND_ASSIGN_FAILED }, 1);
    }
    Ok(())
}
