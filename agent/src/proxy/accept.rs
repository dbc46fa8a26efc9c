//! The one accept loop of the three per-pod listeners.
//!
//! Why one: an accept error such as EMFILE or ENFILE repeats for as long as
//! the process is out of descriptors, so retrying at once spins a core and
//! floods the log. Each consecutive error doubles a pause (10 ms up to 1 s)
//! and is logged with its count; the first success resets both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{warn, Instrument, Span};

use super::{Ctx, PodCtx};

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Accepts on `listener` until the task is aborted (pod removal), running
/// `handle` for each connection in its own task under `span(peer)`, counted
/// as active so shutdown can drain it.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    pod: Arc<PodCtx>,
    ctx: Arc<Ctx>,
    span: impl Fn(&PodCtx, SocketAddr) -> Span,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodCtx>, Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut pause = FIRST_PAUSE;
    let mut errors = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                errors += 1;
                // Logged on the 1st, 2nd, 4th, 8th... error in a row.
                if errors.is_power_of_two() {
                    warn!(pod = %pod.workload.uid, listener = what, error = %e, errors_in_a_row = errors,
                        pause_ms = pause.as_millis() as u64, "accept failed; backing off");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                continue;
            }
        };
        pause = FIRST_PAUSE;
        errors = 0;
        let span = span(&pod, peer);
        let fut = handle(stream, peer, pod.clone(), ctx.clone());
        let ctx = ctx.clone();
        tokio::spawn(
            async move {
                let _active = ctx.track();
                fut.await
            }
            .instrument(span),
        );
    }
}
