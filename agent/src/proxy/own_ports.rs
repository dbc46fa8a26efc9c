//! Connections to the agent's own ports are refused on every path.
//!
//! Why: the agent dials its destinations from inside the pod, marked so
//! capture leaves them alone. A destination that is one of its own
//! listeners (15001, 15006, 15008, or the pod's sk_assign listener) would
//! be accepted by the agent again, which dials again: one client
//! connection became thousands of sockets and a spinning core. ztunnel
//! refuses its own ports for the same reason. The check comes before any
//! dial, on the outbound path (which includes the splice), the plaintext
//! inbound path and each HBONE `:authority`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::Ctx;
use crate::metrics::StatusLabels;
use crate::redirect::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// The label value of `sluice_hbone_errors_total{status}` for these.
pub const SELF_CALL: &str = "self_call";

/// Ports every Sluice agent listens on in every enrolled pod. A peer's
/// sk_assign port is not known here; the peer's agent refuses it itself.
pub fn is_agent_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | HBONE_PORT)
}

/// Counts the refusal and says so at most once per [`LOG_EVERY_SECS`]
/// (a client can make these as fast as it can connect).
pub fn refused(ctx: &Ctx, direction: &'static str, pod: &str, target: SocketAddr) {
    ctx.metrics.hbone_errors.get_or_create(&StatusLabels { direction, status: SELF_CALL.into() }).inc();
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let suppressed = SINCE.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + LOG_EVERY_SECS && LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        SINCE.store(0, Ordering::Relaxed);
        warn!(
            %direction, %pod, %target, refused_since_last_log = suppressed + 1,
            "refused a connection to one of the agent's own ports (it would loop back into the agent)"
        );
    }
}

pub const LOG_EVERY_SECS: u64 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_listeners_are_own_ports() {
        assert!(is_agent_port(15001) && is_agent_port(15006) && is_agent_port(15008));
        assert!(!is_agent_port(8080) && !is_agent_port(15021) && !is_agent_port(0));
    }
}
