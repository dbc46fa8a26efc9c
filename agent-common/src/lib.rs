//! Types that cross the kernel/user boundary. Every type here is `#[repr(C)]`,
//! has no padding the verifier could trip on, and is the one definition both
//! `agent-ebpf` and `agent` use, so the two sides can never disagree on layout.
#![no_std]

/// Names under which the agent pins its maps, below [`PIN_ROOT`].
pub const PIN_ROOT: &str = "/sys/fs/bpf/sluice";

/// Mark on every socket the agent opens, so no program or rule captures it again.
pub const AGENT_MARK: u32 = 0x539;

/// Indices into the per-CPU `COUNTERS` array. Keep in step with
/// [`COUNTER_NAMES`]; the agent exports each one as a Prometheus counter.
pub mod counter {
    /// sock_ops saw an established socket in an enrolled cgroup and added it.
    pub const SOCKHASH_ADDED: u32 = 0;
    /// sk_msg found the peer socket and redirected the message to it.
    pub const MSG_REDIRECTED: u32 = 1;
    /// Bytes that sk_msg redirected (the bytes that skipped TCP/IP).
    pub const MSG_REDIRECTED_BYTES: u32 = 2;
    /// sk_msg found no peer in the SOCKHASH and let the message take TCP.
    pub const MSG_PASSED: u32 = 3;
    /// sock_ops could not insert a socket (map full, or the socket went away).
    pub const SOCKHASH_INSERT_FAILED: u32 = 4;
    /// connect4/connect6 rewrote an enrolled pod's connect() to its 15001.
    pub const OUTBOUND_CAPTURED: u32 = 5;
    /// getsockopt answered SO_ORIGINAL_DST from the original-destination map.
    pub const ORIG_DST_ANSWERED: u32 = 6;
    /// getsockopt was asked SO_ORIGINAL_DST for a socket it has no entry for.
    pub const ORIG_DST_MISSED: u32 = 7;
    /// tc ingress handed a SYN to the pod's 15006 listener (bpf_sk_assign).
    pub const INBOUND_ASSIGNED: u32 = 8;
    /// tc ingress saw a SYN for an enrolled pod but could not assign it.
    pub const INBOUND_ASSIGN_FAILED: u32 = 9;
    /// A same-node splice took over one direction of a connection: from here
    /// on the app's bytes go straight into the agent's socket facing its peer.
    pub const SPLICE_SWITCHED: u32 = 10;
    /// Bytes moved app to app by a splice without entering userspace.
    pub const SPLICED_BYTES: u32 = 11;
    /// A spliced send found the agent's far socket gone (the connection is
    /// ending) and went to the agent through TCP instead.
    pub const SPLICE_TARGET_MISSING: u32 = 12;
    /// A spliced app end shut down its writes and left SOCK_PAIRS.
    pub const SPLICE_LEFT_ON_HALF_CLOSE: u32 = 13;
    /// tc ingress dropped a TCP packet it could not classify: an IPv4 or
    /// IPv6 fragment, or an IPv6 extension-header chain longer than it walks.
    /// Letting it pass would let a SYN reach the app around 15006.
    pub const TC_UNCLASSIFIABLE_DROPPED: u32 = 14;
    /// tc ingress dropped a SYN for an enrolled pod's app because no agent
    /// listener was there to take it (the agent is down or restarting):
    /// passing it would let a client reach the app without policy.
    pub const TC_NO_AGENT_DROPPED: u32 = 15;
    pub const COUNT: u32 = 16;
}

/// Human names of the counters, indexed like [`counter`].
pub const COUNTER_NAMES: [&str; counter::COUNT as usize] = [
    "sockhash_added",
    "msg_redirected",
    "msg_redirected_bytes",
    "msg_passed",
    "sockhash_insert_failed",
    "outbound_captured",
    "orig_dst_answered",
    "orig_dst_missed",
    "inbound_assigned",
    "inbound_assign_failed",
    "splice_switched",
    "spliced_bytes",
    "splice_target_missing",
    "splice_left_on_half_close",
    "tc_unclassifiable_dropped",
    "tc_no_agent_dropped",
];

/// Ports inside every enrolled pod's netns (see DESIGN.md).
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// `Config::flags` bits.
/// Redirect app-to-app loopback traffic inside a pod socket to socket
/// (sk_msg ingress). Off unless asked for: on a socket in a sockmap,
/// tcp_bpf_recvmsg answers a blocking read() woken without data with EAGAIN,
/// which a client that half-closes and then waits for its answer hits: its
/// own shutdown() wakes it.
pub const CONFIG_LOOPBACK_BYPASS: u32 = 1;

/// Same-node splice on: sock_ops counts the captured sockets of connections
/// to enrolled pods on this node, so the agent can hand them to the kernel.
pub const CONFIG_SPLICE: u32 = 2;

/// The one value of the CONFIG array: settings the agent gives the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    pub _reserved: u32,
}

/// `WorkloadInfo::flags` bits.
/// The workload is enrolled (meshed) on this node's agent.
pub const WORKLOAD_LOCAL: u32 = 1;

/// Value of the WORKLOADS map, keyed by [`IpKey`]: what the agent knows of
/// the pod at that address, so `bpftool map dump` answers "is this pod
/// meshed here, and as whom" from the kernel's own view.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// The pod's netns cookie (the ENROLLED key).
    pub netns_cookie: u64,
    /// FNV-1a of the SPIFFE identity; `/config_dump` lists it per pod.
    pub identity: u32,
    pub flags: u32,
}

/// The identity index of a SPIFFE ID as WORKLOADS stores it: FNV-1a, 32 bit,
/// so it is the same across agent restarts without a shared table.
pub fn identity_index(spiffe_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in spiffe_id.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `PodInfo::flags` bits.
pub const POD_HAS_V4: u32 = 1;
pub const POD_HAS_V6: u32 = 2;

/// Value of the ENROLLED map, keyed by the pod's netns cookie: the pod's own
/// addresses, which outbound capture redirects to (never 127.0.0.1: every
/// pod has one, so a loopback 4-tuple would not be unique on the node).
/// `ip4` and `ip6` are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub ip4: u32,
    pub flags: u32,
    pub ip6: [u32; 4],
}

/// An original destination: IPv6 or IPv4-mapped address (network order) and
/// port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub ip: [u32; 4],
    pub port: u32,
}

/// Key of the LISTENERS map: a pod address (IPv6 or IPv4-mapped, network
/// order), whose 15006 listener tc hands inbound SYNs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub ip: [u32; 4],
}

/// Key of the socket-pair SOCKHASH: one TCP endpoint, seen from its own side.
///
/// Every pod has its own 127.0.0.1, so the 4-tuple alone is not unique on a
/// node; the network namespace cookie makes it so. Addresses are IPv6 or
/// IPv4-mapped IPv6, in network byte order; ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key the other end of this same connection is stored under.
    #[inline(always)]
    pub fn peer(&self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Key of SPLICE_SERVICES: a service's virtual IP (IPv4-mapped, network
/// order) and one of its ports (host order), as an app dials it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub ip: [u32; 4],
    pub port: u32,
}

/// Value of SPLICE_SERVICES: how many ready endpoints of the service on this
/// port are enrolled pods on this node (always at least one: the agent keeps
/// only such entries). sock_ops counts a captured connection to the VIP for a
/// splice only when there is one; the agent picks the endpoint afterwards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub local_endpoints: u32,
    pub _reserved: u32,
}

/// Value of SPLICE_COUNTS: an app socket's byte counts for a same-node
/// splice, written only by sk_msg on that socket (one writer, under its
/// socket lock). `via_agent` is what the app sent through the agent before
/// the splice took over, `spliced` what it sent in the kernel after, and
/// `switched` is set once, when the takeover happened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceCount {
    pub via_agent: u64,
    pub spliced: u64,
    pub switched: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all plain old data, `#[repr(C)]`, no padding.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::SpliceCount {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::WorkloadInfo {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceInfo {}
}
