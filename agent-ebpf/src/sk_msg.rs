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
    key::KeySource,
    maps::{count, SOCK_PAIRS},
};
use agent_common::counter;

#[sk_msg]
pub fn sluice_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is the one the kernel passed in.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    // SAFETY: as above.
    let key = unsafe { KeySource::key(ctx.msg, netns) };
    let size = ctx.size() as u64;
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
