//! Every map the programs share with the agent. BTF-described
//! (`aya_ebpf::btf_maps`), so `bpftool map dump pinned /sys/fs/bpf/sluice/<NAME>`
//! prints named fields instead of raw bytes.

use agent_common::{
    counter, Config, IpKey, OrigDst, PodInfo, ServiceInfo, ServiceKey, SockKey, SpliceCount, WorkloadInfo,
};
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    macros::btf_map,
};

/// Enrolled pods by netns cookie, filled by the agent on enroll. The connect
/// hooks only act for sockets whose netns is here. HASH needs 3.19; the
/// netns cookie helper 5.7 in cgroup sock_addr programs.
#[btf_map]
pub static ENROLLED: HashMap<u64, PodInfo, 4096> = HashMap::new();

/// Enrolled pods by address, mirroring the agent's state for operators
/// (`bpftool map dump pinned .../workloads`). Updated on enroll and removal.
#[btf_map]
pub static WORKLOADS: HashMap<IpKey, WorkloadInfo, 8192> = HashMap::new();

/// Service VIP:ports (IPv4) with at least one ready endpoint that is an
/// enrolled pod on this node, kept in step with the config by the agent. A
/// connection to one may be spliced, so sock_ops counts its app socket as it
/// does for a connection to a local pod; when the agent then picks an
/// endpoint elsewhere it takes the socket out of SOCK_PAIRS again.
#[btf_map]
pub static SPLICE_SERVICES: HashMap<ServiceKey, ServiceInfo, 16384> = HashMap::new();

/// Settings from the agent (one entry). ARRAY needs 3.19.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Whether the agent turned `flag` on.
#[inline(always)]
pub fn config_has(flag: u32) -> bool {
    CONFIG.get(0).map(|c| c.flags & flag != 0).unwrap_or(false)
}

/// Original destination of a captured connect(), by socket cookie, from
/// connect4/6 until sock_ops sees the connection established. LRU so an
/// entry whose connect() failed cannot leak. LRU_HASH needs 4.10.
#[btf_map]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst, 65536> = LruHashMap::new();

/// Original destination by the app socket's own 4-tuple (netns cookie 0:
/// the tuple holds the pod's own IP, unique on the node), which is what the
/// agent's accepted socket can name in getsockopt. getsockopt removes the
/// entry it answers; LRU for connections the agent never asked about.
#[btf_map]
pub static ORIG_DST_BY_TUPLE: LruHashMap<SockKey, OrigDst, 65536> = LruHashMap::new();

/// Each enrolled pod's 15006 listener by pod address, for tc's
/// bpf_sk_assign. SOCKHASH lookup from tc needs 5.7.
#[btf_map]
pub static LISTENERS: SockHash<IpKey, 8192> = SockHash::new();

/// Both ends of every local TCP connection in an enrolled cgroup, keyed by
/// the end's own view of the 4-tuple plus netns cookie. sk_msg redirects into
/// the peer's entry. The kernel drops entries itself when a socket closes.
/// SOCKHASH needs 4.18.
#[btf_map]
pub static SOCK_PAIRS: SockHash<SockKey, 65536> = SockHash::new();

/// Byte counts of every app socket that may be spliced: each captured app
/// end (sock_ops adds it when it connects to 15001) and each app end the
/// agent dials for a splice (the agent pre-registers it). LRU, so entries of
/// an agent that died cannot fill it; the agent removes its own when a
/// connection ends.
#[btf_map]
pub static SPLICE_COUNTS: LruHashMap<SockKey, SpliceCount, 65536> = LruHashMap::new();

/// The agent's sockets facing an app in a splice, with how many bytes the
/// agent has written to each. Written only by the agent, after each write()
/// returns, so it never runs ahead of what is really queued on the socket.
#[btf_map]
pub static SPLICE_WRITTEN: LruHashMap<SockKey, u64, 65536> = LruHashMap::new();

/// Armed splices: app end -> the agent's socket facing the other app. Once
/// everything the app sent through the agent has been written to that
/// socket, sk_msg pushes the app's bytes straight into it. Written only by
/// the agent.
#[btf_map]
pub static SPLICE_ROUTES: LruHashMap<SockKey, SockKey, 65536> = LruHashMap::new();

/// Per-CPU event counters, indexed by `agent_common::counter`. Per-CPU because
/// bpfel has no 64-bit atomic add, and it keeps the hot path free of
/// cache-line bouncing. The agent sums the CPUs.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

/// Adds `by` to counter `idx` on this CPU.
#[inline(always)]
pub fn count(idx: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: the slot belongs to this CPU and programs do not preempt
        // each other on one CPU for these program types.
        unsafe { *slot += by };
    }
}
