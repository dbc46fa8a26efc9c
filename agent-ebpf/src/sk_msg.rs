//! sk_msg: moves each sendmsg() straight into the peer socket's receive queue.
//!
//! Why: for two sockets on the same host the TCP/IP stack is pure overhead;
//! redirecting at the socket layer skips segmentation, loopback xmit and ACKs.
//! Needs 4.17 for sk_msg, 4.18 for `bpf_msg_redirect_hash` and 5.15 for
//! `bpf_get_netns_cookie` in sk_msg.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};

use crate::{
    key::sock_key,
    maps::{count, SOCK_PAIRS},
};
use agent_common::counter;

#[sk_msg]
pub fn sluice_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is the one the kernel passed in.
    let md = unsafe { &*ctx.msg };
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let key = sock_key(
        netns,
        md.family,
        md.local_ip4,
        md.remote_ip4,
        md.local_ip6,
        md.remote_ip6,
        md.local_port,
        md.remote_port,
    );
    let size = md.size as u64;
    // The peer's own key is this key seen from the other end.
    if SOCK_PAIRS.redirect_msg(&ctx, key.peer(), BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(counter::MSG_REDIRECTED, 1);
        count(counter::MSG_REDIRECTED_BYTES, size);
    } else {
        // No peer (it closed, or the other end is not in an enrolled
        // cgroup): deliver through TCP as if we were not here.
        count(counter::MSG_PASSED, 1);
    }
    SK_PASS
}
