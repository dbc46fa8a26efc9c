//! 15006: plain TCP from clients that are not in the mesh, captured on its
//! way into the pod. Policy sees no identity here; a connection it denies is
//! reset before a single byte reaches the app, and one a later policy denies
//! is reset on both sides (registry.rs).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span, warn, Instrument};

use super::{
    conn_labels, connect_app,
    registry::{self, Kind},
    services::inbound_service,
    Ctx, PodCtx, Security,
};
use crate::{
    metrics::DenyLabels,
    netns::original_dst,
    policy::{authorize_conn, plaintext_allowed, Conn, Decision, Source},
};

pub async fn serve(listener: TcpListener, pod: Arc<PodCtx>, ctx: Arc<Ctx>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = %pod.workload.uid, error = %e, "inbound accept failed");
                continue;
            }
        };
        let (pod, ctx) = (pod.clone(), ctx.clone());
        let span = info_span!("inbound_plaintext", pod = %pod.workload.uid, src = %peer);
        tokio::spawn(
            async move {
                let _active = ctx.track();
                if let Err(e) = handle(client, peer, &pod, &ctx).await {
                    debug!(error = format!("{e:#}"), "plaintext inbound failed");
                }
            }
            .instrument(span),
        );
    }
}

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: &PodCtx, ctx: &Ctx) -> Result<()> {
    let target = original_dst(&client).context("reading the original destination (SO_ORIGINAL_DST)")?;
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
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
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
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut app) => r,
        policy = registered.closed() => {
            // Reset both sides. (The bytes moved so far go uncounted: tokio's
            // copy reports them only when it completes.)
            for s in [&client, &app] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            return Err(anyhow::anyhow!("closed: policy {policy} now denies this connection"));
        }
    };
    if let Ok((up, down)) = result {
        guard.client_to_server = up;
        guard.server_to_client = down;
    }
    Ok(result.map(drop)?)
}
