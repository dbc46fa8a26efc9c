//! sock_ops: puts both ends of local connections into SOCK_PAIRS.
//!
//! Why: sk_msg can only redirect between sockets that are in a sockmap, and
//! sock_ops is the one hook that sees a socket at the moment it becomes
//! ESTABLISHED on either side. Needs 4.13 for sock_ops, 4.18 for SOCKHASH and
//! 5.15 for `bpf_get_netns_cookie` in sock_ops.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;

use crate::{
    key::{is_loopback, KeySource},
    maps::{count, SOCK_PAIRS},
};
use agent_common::counter;

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
    if !is_loopback(&key.remote_ip) {
        return 0;
    }
    match SOCK_PAIRS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(counter::SOCKHASH_ADDED, 1);
            debug!(&ctx, "sockhash add port {} -> {} (op {})", key.local_port, key.remote_port, op);
        }
        Err(_) => count(counter::SOCKHASH_INSERT_FAILED, 1),
    }
    0
}
