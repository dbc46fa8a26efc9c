//! Builds the SOCK_PAIRS key the same way from sock_ops and from sk_msg, so a
//! socket's own key and its peer's key always line up.
//!
//! Context fields are read with `read_volatile`, all of them, before choosing
//! by family: otherwise LLVM merges the v4 and v6 loads into one load through
//! a selected pointer (`ctx + 24` or `ctx + 44`), and the verifier rejects any
//! load through a modified ctx pointer ("dereference of modified ctx ptr").

use agent_common::{SockKey, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

pub const AF_INET: u32 = 2;

/// The context fields a key is made of; implemented for `bpf_sock_ops` and
/// `sk_msg_md`, which name them identically.
macro_rules! impl_key_source {
    ($ty:ty) => {
        impl crate::key::KeySource for $ty {
            #[inline(always)]
            unsafe fn key(this: *const Self, netns_cookie: u64) -> agent_common::SockKey {
                use core::ptr::{addr_of, read_volatile as rv};
                let family = rv(addr_of!((*this).family));
                let local_port = rv(addr_of!((*this).local_port));
                let remote_port = rv(addr_of!((*this).remote_port));
                // All fields are read unconditionally and only the values are
                // selected: a load inside each branch would be merged into one
                // load through a selected pointer.
                let l4 = rv(addr_of!((*this).local_ip4));
                let r4 = rv(addr_of!((*this).remote_ip4));
                let l6 = [
                    rv(addr_of!((*this).local_ip6[0])),
                    rv(addr_of!((*this).local_ip6[1])),
                    rv(addr_of!((*this).local_ip6[2])),
                    rv(addr_of!((*this).local_ip6[3])),
                ];
                let r6 = [
                    rv(addr_of!((*this).remote_ip6[0])),
                    rv(addr_of!((*this).remote_ip6[1])),
                    rv(addr_of!((*this).remote_ip6[2])),
                    rv(addr_of!((*this).remote_ip6[3])),
                ];
                let (local_ip, remote_ip) = if family == crate::key::AF_INET {
                    (crate::key::v4_mapped(l4), crate::key::v4_mapped(r4))
                } else {
                    (l6, r6)
                };
                crate::key::make(netns_cookie, local_ip, remote_ip, local_port, remote_port)
            }
        }
    };
}

pub trait KeySource {
    /// # Safety
    /// `this` must be the context pointer the kernel passed to the program.
    unsafe fn key(this: *const Self, netns_cookie: u64) -> SockKey;
}

impl_key_source!(aya_ebpf::bindings::bpf_sock_ops);
impl_key_source!(aya_ebpf::bindings::sk_msg_md);

/// IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so a v4 socket and a dual-stack
/// v6 socket on the same connection produce the same key.
#[inline(always)]
pub fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4]
}

/// Both contexts report `local_port` in host order and `remote_port` as the
/// network-order port shifted into the high 16 bits (the kernel's ctx rewrite
/// does `<< 16` on little endian), so `ntohl` yields the host-order port.
#[inline(always)]
pub fn make(
    netns_cookie: u64,
    local_ip: [u32; 4],
    remote_ip: [u32; 4],
    local_port: u32,
    remote_port_be: u32,
) -> SockKey {
    SockKey { netns_cookie, local_ip, remote_ip, local_port, remote_port: u32::from_be(remote_port_be) }
}

/// True for an IPv4 address stored IPv4-mapped.
#[inline(always)]
pub fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff)
}

/// True for 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104. Only connections whose
/// both ends live on this host can have their peer in SOCK_PAIRS.
#[inline(always)]
pub fn is_loopback(ip: &[u32; 4]) -> bool {
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff);
    let first_octet = (u32::from_be(ip[3]) >> 24) as u8;
    (v4_mapped && first_octet == 127) || (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1))
}

/// One of the agent's in-pod listener ports (host order).
#[inline(always)]
pub fn is_agent_port(port: u32) -> bool {
    port == OUTBOUND_PORT as u32 || port == INBOUND_PLAINTEXT_PORT as u32 || port == HBONE_PORT as u32
}
