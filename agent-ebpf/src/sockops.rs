//! sock_ops: the moment a TCP connection becomes ESTABLISHED on either side.
//!
//! Two jobs, both needing that moment:
//! - re-key a captured connection's original destination from the socket
//!   cookie (all connect4/6 has) to the 4-tuple (all the agent's accepted
//!   socket can name in getsockopt);
//! - when the agent turned the loopback bypass on (CONFIG), put both ends of
//!   every connection that stays inside a pod into SOCK_PAIRS, so sk_msg can
//!   move their bytes socket to socket.
//!
//! Needs 4.13 for sock_ops, 4.18 for SOCKHASH and 5.15 for
//! `bpf_get_netns_cookie` in sock_ops.

use agent_common::{counter, SockKey, CONFIG_LOOPBACK_BYPASS, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;

use crate::{
    key::{is_loopback, KeySource},
    maps::{config_has, count, ORIG_DST_BY_COOKIE, ORIG_DST_BY_TUPLE, SOCK_PAIRS},
};

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
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
    if !config_has(CONFIG_LOOPBACK_BYPASS) || (!is_loopback(&key.remote_ip) && key.remote_ip != key.local_ip) {
        return 0;
    }
    // Not (yet) for the app <-> agent legs of captured connections: once the
    // app half-closes, its end leaves the SOCKHASH while the agent's stays,
    // and the agent's next write then lands in the app's TCP queue behind
    // redirected data, where tcp_bpf_recvmsg answers EAGAIN to a blocking
    // read. Until that is solved these legs use plain loopback TCP.
    if is_agent_port(key.local_port) || is_agent_port(key.remote_port) {
        return 0;
    }
    // SAFETY: as above.
    match SOCK_PAIRS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(counter::SOCKHASH_ADDED, 1);
            debug!(&ctx, "sockhash add port {} -> {} (op {})", key.local_port, key.remote_port, op);
        }
        Err(_) => count(counter::SOCKHASH_INSERT_FAILED, 1),
    }
    0
}

#[inline(always)]
fn is_agent_port(port: u32) -> bool {
    port == OUTBOUND_PORT as u32 || port == INBOUND_PLAINTEXT_PORT as u32 || port == HBONE_PORT as u32
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
