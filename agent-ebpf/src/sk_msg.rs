//! sk_msg: runs on every sendmsg() of a socket in SOCK_PAIRS and decides
//! where the bytes go. Three kinds of socket end up here:
//!
//! - Ends of a same-node splice. An app end (in SPLICE_COUNTS) sends through
//!   the agent, counted, until everything it sent that way has been written
//!   out by the agent on its socket facing the other app (SPLICE_WRITTEN,
//!   kept by the agent); from that message on its bytes are pushed straight
//!   into that socket (egress redirect) and never reach userspace. The switch
//!   happens on the sender's own sendmsg, under its socket lock, so nothing it
//!   sent earlier can still be queued behind: no byte is lost, duplicated or
//!   reordered at the takeover. A count can only run ahead of what the app
//!   really sent (a non-blocking send cut short), which delays the switch
//!   forever rather than allowing it early. The agent's own sockets in a
//!   splice send plain TCP.
//! - The app <-> agent legs of other captured connections: plain TCP.
//! - With the loopback bypass on, two apps talking over loopback: redirected
//!   into the peer's receive queue (ingress), skipping TCP/IP entirely.
//!
//! Why egress for the splice: the push is synchronous, in the sender's own
//! sendmsg, with the sender's blocking semantics, and the receiving app reads
//! an ordinary TCP socket. (An sk_skb verdict on the agent's sockets would
//! leave the apps alone, but its redirects are sent from a work queue that
//! is several times slower and, on 6.18, stops for good on a send error,
//! losing what it held.)
//!
//! Needs 4.17 for sk_msg, 4.18 for `bpf_msg_redirect_hash` and 5.15 for
//! `bpf_get_netns_cookie` in sk_msg.

use agent_common::{counter, SockKey, SpliceCount};
use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};

use crate::{
    key::{is_agent_port, KeySource},
    maps::{count, SOCK_PAIRS, SPLICE_COUNTS, SPLICE_ROUTES, SPLICE_WRITTEN},
};

#[sk_msg]
pub fn sluice_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is the one the kernel passed in.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    // SAFETY: as above.
    let key = unsafe { KeySource::key(ctx.msg, netns) };
    let size = ctx.size() as u64;
    if SPLICE_WRITTEN.get_ptr(key).is_some() {
        return SK_PASS;
    }
    if let Some(own) = SPLICE_COUNTS.get_ptr_mut(key) {
        splice(&ctx, key, own, size);
        return SK_PASS;
    }
    if is_agent_port(key.local_port) || is_agent_port(key.remote_port) {
        count(counter::MSG_PASSED, 1);
        return SK_PASS;
    }
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

/// One send of a splice's app end. `own` is this socket's own counts.
#[inline(always)]
fn splice(ctx: &SkMsgContext, key: SockKey, own: *mut SpliceCount, size: u64) {
    // SAFETY (all derefs below): pointers come from successful map lookups;
    // `own` is written only by this program on this socket, under its lock.
    unsafe {
        if let Some(via) = SPLICE_ROUTES.get_ptr(key) {
            let via = *via;
            let switched = core::ptr::read_volatile(&(*own).switched) != 0;
            if switched || caught_up(own, via) {
                if SOCK_PAIRS.redirect_msg(ctx, via, 0) == SK_PASS as i64 {
                    if !switched {
                        (*own).switched = 1;
                        count(counter::SPLICE_SWITCHED, 1);
                    }
                    (*own).spliced += size;
                    count(counter::SPLICED_BYTES, size);
                    return;
                }
                // The agent's socket is gone, so the connection is ending;
                // TCP to the agent reports that to the app.
                count(counter::SPLICE_TARGET_MISSING, 1);
                return;
            }
        }
        (*own).via_agent += size;
    }
}

/// True when the agent has written out everything this app sent through it:
/// the app's own count equals what the agent wrote to its far socket. The
/// agent's count only grows towards ours.
#[inline(always)]
unsafe fn caught_up(own: *const SpliceCount, via: SockKey) -> bool {
    let Some(written) = SPLICE_WRITTEN.get_ptr(via) else { return false };
    core::ptr::read_volatile(written) == core::ptr::read_volatile(&(*own).via_agent)
}
