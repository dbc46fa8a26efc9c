//! Sluice's kernel programs. Each program is small and does one job; the
//! comment on each says why it exists and the oldest kernel it needs.
//! Maps live in `maps.rs`, shared key types in `agent-common`.
#![no_std]
#![no_main]

mod connect;
mod getsockopt;
mod key;
mod maps;
mod sk_msg;
mod sockops;
mod tc_ingress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that
    // could get here. The loop only satisfies the type.
    loop {}
}

/// The kernel refuses sockmap and ring-buffer helpers to programs that are
/// not GPL-compatible.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
