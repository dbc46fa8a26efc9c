//! cgroup/getsockopt: answers SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST) for
//! sockets the agent accepted on 15001, from ORIG_DST_BY_TUPLE, and removes
//! the entry it answered from.
//!
//! Why: the agent asks for the original destination the same way in both
//! capture modes; in iptables mode conntrack answers, here this program does,
//! so the accept path is one code. Needs 5.3 for cgroup sockopt hooks.

use core::ptr::{addr_of, addr_of_mut, read_volatile as rv, write_volatile as wv};

use agent_common::{counter, SockKey, OUTBOUND_PORT};
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use crate::{
    key::v4_mapped,
    maps::{count, ORIG_DST_BY_TUPLE},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SO_ORIGINAL_DST: i32 = 80;
const AF_INET: u32 = 2;
const AF_INET6: u16 = 10;
/// Let the syscall return (with whatever retval the program left).
const RETURN: i32 = 1;

#[cgroup_sockopt(getsockopt)]
pub fn sluice_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: `so` is the context the kernel passed in; its socket pointer is
    // checked for null before use; optval is bounds-checked before writes.
    unsafe {
        let level = rv(addr_of!((*so).level));
        if rv(addr_of!((*so).optname)) != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
            return RETURN;
        }
        let sk = rv(addr_of!((*so).__bindgen_anon_1.sk));
        if sk.is_null() {
            return RETURN;
        }
        // Every field is loaded before choosing by family: a load in each
        // branch gets merged into one through a selected pointer, which the
        // verifier refuses for socket pointers (see key.rs).
        let family = rv(addr_of!((*sk).family));
        let src4 = rv(addr_of!((*sk).src_ip4));
        let dst4 = rv(addr_of!((*sk).dst_ip4));
        let src6 = [
            rv(addr_of!((*sk).src_ip6[0])),
            rv(addr_of!((*sk).src_ip6[1])),
            rv(addr_of!((*sk).src_ip6[2])),
            rv(addr_of!((*sk).src_ip6[3])),
        ];
        let dst6 = [
            rv(addr_of!((*sk).dst_ip6[0])),
            rv(addr_of!((*sk).dst_ip6[1])),
            rv(addr_of!((*sk).dst_ip6[2])),
            rv(addr_of!((*sk).dst_ip6[3])),
        ];
        let (src, dst) = if family == AF_INET { (v4_mapped(src4), v4_mapped(dst4)) } else { (src6, dst6) };
        let src_port = rv(addr_of!((*sk).src_port));
        if src_port != OUTBOUND_PORT as u32 {
            // Only 15001 sockets have an entry; 15006 sockets carry their
            // original destination as their own local address.
            return RETURN;
        }
        // The agent's socket seen from the app's side: swap the ends.
        let app_view = SockKey {
            netns_cookie: 0,
            local_ip: dst,
            remote_ip: src,
            local_port: u16::from_be(rv(addr_of!((*sk).dst_port))) as u32,
            remote_port: src_port,
        };
        let Some(orig) = ORIG_DST_BY_TUPLE.get_ptr(app_view) else {
            count(counter::ORIG_DST_MISSED, 1);
            return RETURN;
        };
        let orig = *orig;
        let optval = rv(addr_of!((*so).__bindgen_anon_2.optval)) as *mut u8;
        let end = rv(addr_of!((*so).__bindgen_anon_3.optval_end)) as *mut u8;
        let port = (orig.port as u16).to_be();
        if level == SOL_IP {
            // struct sockaddr_in: family, port, address, 8 bytes of zero.
            if optval.add(16) > end {
                return RETURN;
            }
            wv(optval.cast::<u16>(), AF_INET as u16);
            wv(optval.add(2).cast::<u16>(), port);
            wv(optval.add(4).cast::<u32>(), orig.ip[3]);
            wv(optval.add(8).cast::<u64>(), 0);
            wv(addr_of_mut!((*so).optlen), 16);
        } else {
            // struct sockaddr_in6: family, port, flowinfo, address, scope id.
            if optval.add(28) > end {
                return RETURN;
            }
            wv(optval.cast::<u16>(), AF_INET6);
            wv(optval.add(2).cast::<u16>(), port);
            wv(optval.add(4).cast::<u32>(), 0);
            for (i, word) in orig.ip.iter().enumerate() {
                wv(optval.add(8 + 4 * i).cast::<u32>(), *word);
            }
            wv(optval.add(24).cast::<u32>(), 0);
            wv(addr_of_mut!((*so).optlen), 28);
        }
        wv(addr_of_mut!((*so).retval), 0);
        // Answered: the agent asks once per connection, so the entry goes
        // now. Left in place, one stayed per connection ever made until the
        // LRU evicted it (65,536); `cargo xtask soak` found the map never
        // coming back down.
        let _ = ORIG_DST_BY_TUPLE.remove(app_view);
        count(counter::ORIG_DST_ANSWERED, 1);
    }
    RETURN
}
