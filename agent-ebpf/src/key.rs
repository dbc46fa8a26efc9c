//! Builds the SOCK_PAIRS key the same way from sock_ops and from sk_msg, so a
//! socket's own key and its peer's key always line up.

use agent_common::SockKey;

const AF_INET: u32 = 2;

/// IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so a v4 socket and a dual-stack
/// v6 socket on the same connection produce the same key.
#[inline(always)]
pub fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4]
}

/// Both sock_ops and sk_msg_md report `local_port` in host order and
/// `remote_port` in network order in the low 16 bits; the key keeps both in
/// host order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn sock_key(
    netns_cookie: u64,
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u32,
    remote_port_be: u32,
) -> SockKey {
    let (local_ip, remote_ip) = if family == AF_INET {
        (v4_mapped(local4), v4_mapped(remote4))
    } else {
        (local6, remote6)
    };
    SockKey {
        netns_cookie,
        local_ip,
        remote_ip,
        local_port,
        remote_port: u16::from_be(remote_port_be as u16) as u32,
    }
}

/// True for 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104. Only connections whose
/// both ends live on this host can have their peer in SOCK_PAIRS.
#[inline(always)]
pub fn is_loopback(ip: &[u32; 4]) -> bool {
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff);
    let first_octet = (u32::from_be(ip[3]) >> 24) as u8;
    (v4_mapped && first_octet == 127)
        || (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1))
}
