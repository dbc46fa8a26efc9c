//! sock_ops: the moment a TCP connection becomes ESTABLISHED on either side.
//!
//! Two jobs, both needing that moment:
//! - re-key a captured connection's original destination from the socket
//!   cookie (all connect4/6 has) to the 4-tuple (all the agent's accepted
//!   socket can name in getsockopt);
//! - count every captured app socket's bytes from its first one, and add the
//!   app end of a splice the agent is dialling, so sk_msg can splice them;
//! - when the agent turned the loopback bypass on (CONFIG), put both ends of
//!   every connection that stays inside a pod into SOCK_PAIRS, so sk_msg can
//!   move their bytes socket to socket.
//!
//! Needs 4.13 for sock_ops, 4.18 for SOCKHASH and 5.15 for
//! `bpf_get_netns_cookie` in sock_ops.

use agent_common::{
    counter, IpKey, OrigDst, ServiceKey, SockKey, SpliceCount, CONFIG_LOOPBACK_BYPASS, CONFIG_SPLICE, WORKLOAD_LOCAL,
};
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_FIN_WAIT1,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;

use crate::{
    key::{is_agent_port, is_loopback, is_v4_mapped, KeySource},
    maps::{
        config_has, count, ORIG_DST_BY_COOKIE, ORIG_DST_BY_TUPLE, SOCK_PAIRS, SPLICE_COUNTS, SPLICE_SERVICES, WORKLOADS,
    },
};

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        leave_on_half_close(&ctx);
        return 0;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    // SAFETY: the context pointer is the one the kernel passed in.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: as above.
    let mut key = unsafe { KeySource::key(ctx.ops, netns) };
    let orig = if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB { rekey_original_destination(&ctx, &key) } else { None };
    let splice_end = if orig.is_some_and(|o| will_splice(&o)) {
        // An app's captured connection to an enrolled pod on this node, or
        // to a service that has one: count its bytes from the first one, so
        // the agent's splice can take over exactly. Only these: an app socket
        // in a sockmap has the blocking-read limit of CONFIG_LOOPBACK_BYPASS,
        // which every other captured connection is spared (the agent takes a
        // service connection it does not splice out again).
        let _ = SPLICE_COUNTS.insert(key, SpliceCount::default(), 0);
        true
    } else {
        // An app accepting the connection the agent dials for a splice
        // (the agent registered it before dialling).
        op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && SPLICE_COUNTS.get_ptr(key).is_some()
    };
    if !splice_end {
        let local_pair = is_loopback(&key.remote_ip) || key.remote_ip == key.local_ip;
        if !config_has(CONFIG_LOOPBACK_BYPASS) || !local_pair {
            return 0;
        }
        // The app <-> agent legs of captured connections stay plain TCP.
        if is_agent_port(key.local_port) || is_agent_port(key.remote_port) {
            return 0;
        }
    }
    // SAFETY: as above.
    match SOCK_PAIRS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => {
            count(counter::SOCKHASH_ADDED, 1);
            debug!(&ctx, "sockhash add port {} -> {} (op {})", key.local_port, key.remote_port, op);
            if splice_end {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        Err(_) => count(counter::SOCKHASH_INSERT_FAILED, 1),
    }
    0
}

/// An app end that shut down its writes never sends again, so it no longer
/// needs sk_msg. Leaving SOCK_PAIRS drops its psock, so its later reads are
/// plain tcp_recvmsg: in a sockmap, a blocking read() that wakes without
/// data returns EAGAIN, and a half-closed socket is woken so twice, by the
/// shutdown() itself and when the FIN is acknowledged. (A read already
/// blocked in another thread during the shutdown() still gets EAGAIN; see
/// the README.) Needs 4.16 for the state callback.
#[inline(always)]
fn leave_on_half_close(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_FIN_WAIT1 {
        return;
    }
    // SAFETY: the context pointer is the one the kernel passed in.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: as above.
    let key = unsafe { KeySource::key(ctx.ops, netns) };
    if SPLICE_COUNTS.get_ptr(key).is_none() {
        return;
    }
    // SAFETY: a map this object defines and a key of its type.
    unsafe {
        bpf_map_delete_elem(core::ptr::from_ref(&SOCK_PAIRS).cast_mut().cast(), core::ptr::from_ref(&key).cast());
    }
    count(counter::SPLICE_LEFT_ON_HALF_CLOSE, 1);
}

/// Re-keys a captured connection's original destination by 4-tuple and
/// returns it; None for a connection connect4/6 did not capture.
#[inline(always)]
fn rekey_original_destination(ctx: &SockOpsContext, key: &SockKey) -> Option<OrigDst> {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let orig = ORIG_DST_BY_COOKIE.get_ptr(cookie)?;
    // SAFETY: the pointer came from a successful lookup.
    let orig = unsafe { *orig };
    let tuple = SockKey { netns_cookie: 0, ..*key };
    let _ = ORIG_DST_BY_TUPLE.insert(tuple, orig, 0);
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    Some(orig)
}

/// Whether the agent may splice a captured connection to `orig`: the splice
/// is on, and the destination is an IPv4 address of a pod enrolled on this
/// node (WORKLOADS) or a service VIP:port with such a pod among its ready
/// endpoints (SPLICE_SERVICES; the agent picks the endpoint later and takes
/// the socket out of SOCK_PAIRS if it is not local after all). IPv4 only:
/// on 6.18 an IPv6 app socket of this kind stopped receiving once in a
/// sockmap (its peer's segments were retransmitted, then the connection
/// reset), while IPv6 loopback pairs work; until that is understood, IPv6
/// same-node connections take HBONE.
#[inline(always)]
fn will_splice(orig: &OrigDst) -> bool {
    if !config_has(CONFIG_SPLICE) || !is_v4_mapped(&orig.ip) {
        return false;
    }
    if let Some(w) = WORKLOADS.get_ptr(IpKey { ip: orig.ip }) {
        // SAFETY: the pointer came from a successful lookup.
        return unsafe { (*w).flags & WORKLOAD_LOCAL != 0 };
    }
    SPLICE_SERVICES.get_ptr(ServiceKey { ip: orig.ip, port: orig.port }).is_some()
}
