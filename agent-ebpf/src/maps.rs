//! Every map the programs share with the agent. BTF-described
//! (`aya_ebpf::btf_maps`), so `bpftool map dump pinned /sys/fs/bpf/sluice/<NAME>`
//! prints named fields instead of raw bytes.

use agent_common::{counter, SockKey};
use aya_ebpf::{
    btf_maps::{PerCpuArray, SockHash},
    macros::btf_map,
};

/// Both ends of every local TCP connection in an enrolled cgroup, keyed by
/// the end's own view of the 4-tuple plus netns cookie. sk_msg redirects into
/// the peer's entry. The kernel drops entries itself when a socket closes.
/// SOCKHASH needs 4.18.
#[btf_map]
pub static SOCK_PAIRS: SockHash<SockKey, 65536> = SockHash::new();

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
