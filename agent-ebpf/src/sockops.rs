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

use agent_common::{counter, SockKey, SpliceCount, CONFIG_LOOPBACK_BYPASS, OUTBOUND_PORT};
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
    key::{is_agent_port, is_loopback, KeySource},
    maps::{config_has, count, ORIG_DST_BY_COOKIE, ORIG_DST_BY_TUPLE, SOCK_PAIRS, SPLICE_COUNTS},
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
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey_original_destination(&ctx, &key);
    }
    let splice_end = if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && key.remote_port == OUTBOUND_PORT as u32
        && key.remote_ip == key.local_ip
    {
        // An app's captured connection to the agent: count its bytes from
        // the first one, so a same-node splice can take over exactly.
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
/// data returns EAGAIN, and a client that half-closes and then reads its
/// answer is woken exactly so, when its FIN is acknowledged. (A read already
/// blocked in another thread at that moment still gets EAGAIN; see the
/// README.) Needs 4.16 for the state callback.
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

#[inline(always)]
fn rekey_original_destination(ctx: &SockOpsContext, key: &SockKey) {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(orig) = ORIG_DST_BY_COOKIE.get_ptr(cookie) else { return };
    // SAFETY: the pointer came from a successful lookup.
    let orig = unsafe { *orig };
    let tuple = SockKey { netns_cookie: 0, ..*key };
    let _ = ORIG_DST_BY_TUPLE.insert(tuple, orig, 0);
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
}
