//! sk_skb stream verdict on SPLICE_SOCKS: the same-node splice.
//!
//! The agent's two sockets of a spliced connection (its accepted end of the
//! source app's connection, and the end it dialled to the destination app)
//! sit in SPLICE_SOCKS. Every segment arriving on one is sent out of the other
//! (egress redirect), so the bytes flow app to app without entering
//! userspace, while both apps keep plain TCP sockets: nothing about them
//! changes, not even how a blocking read() behaves.
//!
//! Segments are taken from the receive queue in order, including any that
//! arrived before the socket joined the map, so no byte is lost or reordered
//! at the takeover. Half-closes travel as FIN on the TCP sockets; the agent
//! passes each on once the bytes before it are out.
//!
//! Needs 4.14 for sk_skb and 5.13 for a stream verdict without a parser
//! (aya attaches it as BPF_SK_SKB_STREAM_VERDICT).

use agent_common::counter;
use aya_ebpf::{
    bindings::sk_action::SK_PASS, helpers::bpf_get_socket_cookie, macros::stream_verdict, programs::SkBuffContext,
};

use crate::maps::{count, SPLICE_FLOWS, SPLICE_SOCKS};

#[stream_verdict]
pub fn sluice_splice(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the one the kernel passed in.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN: it stays here, so the agent reads EOF and passes the
        // half-close on after the data. Sent on, it would reach the partner
        // after the agent shut it down and fail there with EPIPE.
        return SK_PASS;
    }
    let Some(flow) = SPLICE_FLOWS.get_ptr_mut(cookie) else {
        // Not (or no longer) spliced: the agent reads it.
        return SK_PASS;
    };
    // SAFETY: the pointer came from a successful lookup; only this program,
    // on this socket under its lock, writes `bytes` and `passed`.
    unsafe {
        if core::ptr::read_volatile(&(*flow).passed) != 0 {
            return SK_PASS;
        }
        if SPLICE_SOCKS.redirect_skb(&ctx, (*flow).peer, 0) == SK_PASS as i64 {
            (*flow).bytes += len;
            count(counter::SPLICED_SEGMENTS, 1);
            count(counter::SPLICED_BYTES, len);
        } else {
            // The partner is not in the map: these bytes go to the agent,
            // and so must every later one, or the agent's copy of them could
            // land behind bytes the kernel sends first.
            (*flow).passed = 1;
            count(counter::SPLICE_TARGET_MISSING, 1);
        }
    }
    SK_PASS
}
