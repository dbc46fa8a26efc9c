//! 15006: plain TCP from clients that are not in the mesh, captured on its
//! way into the pod. Policy sees no identity here; a connection it denies is
//! reset before a single byte reaches the app, and one a later policy denies
//! is reset on both sides (registry.rs).

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span};

use super::{
    accept::accept_loop,
    conn_labels, connect_app,
    copy::copy_tcp,
    own_ports,
    registry::{self, Kind},
    reset,
    services::inbound_service,
    Ctx, PodCtx, Security,
};
use crate::{
    metrics::DenyLabels,
    netns::original_dst,
    policy::{authorize_conn, plaintext_allowed, Conn, Decision, Source},
};

/// How a connection reached this listener, which says where the client
/// was going. Passed by whoever opened the listener, never guessed from
/// the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// iptables REDIRECT (or nothing at all): conntrack's SO_ORIGINAL_DST.
    Redirected,
    /// tc `bpf_sk_assign`: the packet was not rewritten, so the accepted
    /// socket's own address is the destination.
    Assigned,
}

pub async fn serve(listener: TcpListener, pod: Arc<PodCtx>, ctx: Arc<Ctx>, arrival: Arrival) {
    let span = |pod: &PodCtx, peer: SocketAddr| info_span!("inbound_plaintext", pod = %pod.workload.uid, src = %peer);
    accept_loop(listener, "inbound_plaintext", pod, ctx, span, move |client, peer, pod, ctx| async move {
        if let Err(e) = handle(client, peer, &pod, &ctx, arrival).await {
            debug!(error = format!("{e:#}"), "plaintext inbound failed");
        }
    })
    .await
}

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: &PodCtx, ctx: &Ctx, arrival: Arrival) -> Result<()> {
    let target = match arrival {
        Arrival::Assigned => client.local_addr().context("reading the accepted socket's address")?,
        Arrival::Redirected => match original_dst(&client) {
            Ok(t) => t,
            // Nothing redirected it here: a direct connection to 15006.
            Err(e) => {
                reset(&client);
                return Err(e).context("reading the original destination (SO_ORIGINAL_DST)");
            }
        },
    };
    if pod.owns_port(target.port()) {
        own_ports::refused(ctx, "inbound", &pod.workload.uid, target);
        reset(&client);
        return Ok(());
    }
    let state = ctx.state();
    let source = Source::plaintext(peer.ip());
    let dst = pod.current(&state);
    // PeerAuthentication STRICT: no plaintext at all, whatever the policy.
    let decision = match plaintext_allowed(&state, &dst, target.port()) {
        Err(why) => Decision::Deny { policy: why },
        Ok(()) => authorize_conn(&state, &Conn { src: &source, dst: &dst, dst_addr: target }),
    };
    if let Decision::Deny { policy } = decision {
        ctx.metrics.auth_denials.get_or_create(&DenyLabels { reporter: "destination", policy: policy.clone() }).inc();
        reset(&client);
        debug!(%target, %policy, "denied");
        return Ok(());
    }
    let mut app = connect_app(&pod.netns, peer.ip(), target, pod.app_mark)
        .await
        .with_context(|| format!("connecting to the app at {target}"))?;
    let mut registered = registry::register(Kind::Plaintext, source, &pod.workload.uid, target);
    let src = state.workload_by_ip(peer.ip());
    let service = inbound_service(&state, &dst, target.port());
    let labels = conn_labels(
        "destination",
        src.as_deref(),
        None,
        Some(&dst),
        Some(&pod.id),
        service.as_deref(),
        Security::Unknown,
    );
    let mut guard = ctx.metrics.connection(labels);
    let (moved, result) = copy_tcp(&mut client, &mut app, registered.closed()).await;
    guard.client_to_server = moved.a_to_b;
    guard.server_to_client = moved.b_to_a;
    Ok(result?)
}
