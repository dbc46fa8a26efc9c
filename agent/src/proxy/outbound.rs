//! 15001: connections the pod's apps open, after capture rewrote them here.
//!
//! The original destination decides the path. A service VIP is resolved
//! first, to one ready endpoint and its target port (services.rs); from
//! then on the endpoint is the destination, as if the app had dialled it.
//! An enrolled (HBONE) workload on this node is spliced in the kernel when
//! capture is eBPF (splice.rs), one elsewhere gets an HBONE stream to its
//! agent's 15008, anything else (not enrolled, or not a known workload at
//! all) is passed through as plain TCP, from inside the pod, with the agent
//! mark so it is not captured again. A VIP with no endpoint to go to is
//! reset.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, info_span};

use super::{
    accept::accept_loop,
    canonical_ip, conn_labels,
    copy::copy_tcp,
    own_ports::{self, is_agent_port},
    reset, services,
    splice::splice,
    Ctx, PodCtx, Security,
};
use crate::{
    bpf::sock_key,
    identity::SpiffeId,
    metrics::StatusLabels,
    netns::original_dst,
    state::{Protocol, Service, Workload},
    tls,
    tunnel::{client::Connection, copy_bidirectional, pool::PoolKey, HBONE_PORT},
};

/// How long a new upstream connection may take: TCP, and for HBONE also
/// the mTLS and HTTP/2 handshakes.
pub const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(listener: TcpListener, pod: Arc<PodCtx>, ctx: Arc<Ctx>) {
    // Before the pod's first captured connection: sock_ops decides from
    // this list whether a connection to a VIP may be spliced.
    services::sync_splice(&ctx, &ctx.state());
    let span = |pod: &PodCtx, peer: SocketAddr| {
        info_span!(
            "outbound",
            pod = %pod.workload.uid,
            src = %peer,
            dst = tracing::field::Empty,
            endpoint = tracing::field::Empty
        )
    };
    accept_loop(listener, "outbound", pod, ctx, span, |app, peer, pod, ctx| async move {
        if let Err(e) = handle(app, peer, &pod, &ctx).await {
            debug!(error = format!("{e:#}"), "outbound connection failed");
        }
    })
    .await
}

async fn handle(app: TcpStream, peer: SocketAddr, pod: &PodCtx, ctx: &Ctx) -> Result<()> {
    let dst = match original_dst(&app) {
        Ok(d) => d,
        // Nothing redirected it here: a direct connection to 15001.
        Err(e) => {
            reset(&app);
            return Err(e).context("reading the original destination (SO_ORIGINAL_DST)");
        }
    };
    let span = tracing::Span::current();
    span.record("dst", tracing::field::display(dst));
    let state = ctx.state();
    services::sync_splice(ctx, &state);
    let (target, service) = match state.service_by_vip(dst.ip()) {
        None => (dst, None),
        Some(svc) => match services::resolve(&svc, dst, &state) {
            Ok(endpoint) => {
                span.record("endpoint", tracing::field::display(endpoint));
                (endpoint, Some(svc))
            }
            Err(why) => {
                debug!(service = %svc.id(), port = dst.port(), reason = %why, "no healthy upstream; resetting");
                release_app(&app, pod, ctx);
                refuse(&app, ctx, "no_healthy_upstream");
                return Ok(());
            }
        },
    };
    let service = service.as_deref();
    // A Sluice agent listens on these in every enrolled pod (and the local
    // ones also on their sk_assign port): dialling one loops.
    let enrolled = state.workload_by_ip(target.ip()).is_some_and(|w| w.protocol == Protocol::Hbone);
    let local_owner = ctx.local_pod(target.ip()).is_some_and(|p| p.owns_port(target.port()));
    if (enrolled && is_agent_port(target.port())) || local_owner {
        own_ports::refused(ctx, "outbound", &pod.workload.uid, target);
        release_app(&app, pod, ctx);
        reset(&app);
        return Ok(());
    }
    match state.workload_by_ip(target.ip()) {
        Some(w) if w.protocol == Protocol::Hbone => match (&ctx.splice, ctx.local_pod(target.ip())) {
            // IPv4 only: an IPv6 app socket in a sockmap lost its incoming
            // bytes on 6.18 in our tests (see sockops.rs), so IPv6 takes HBONE.
            (Some(maps), Some(dst_pod)) if canonical_ip(target.ip()).is_ipv4() => {
                splice(app, peer, target, pod, &dst_pod, maps, ctx, service).await
            }
            _ => {
                release_app(&app, pod, ctx);
                hbone(app, peer, target, &w, pod, ctx, service).await
            }
        },
        other => {
            release_app(&app, pod, ctx);
            passthrough(app, target, other.as_deref(), pod, ctx, service).await
        }
    }
}

/// A connection that will not be spliced must not keep its app socket in
/// the sockmap: sock_ops admits a connection to a service VIP that has a
/// local endpoint before the agent has picked one, and in a sockmap a
/// blocking read() woken without data returns EAGAIN (README, "Limits").
/// Taken out now, before the agent reads or writes a byte of it, the app's
/// socket is plain TCP again.
fn release_app(app: &TcpStream, pod: &PodCtx, ctx: &Ctx) {
    let Some(maps) = &ctx.splice else { return };
    let (Ok(local), Ok(remote)) = (app.local_addr(), app.peer_addr()) else { return };
    if maps.release_app(sock_key(pod.netns_cookie, local, remote).peer()) {
        debug!("not spliced: the app's socket left the sockmap");
    }
}

/// Counts a refused outbound connection and resets the app's socket: the
/// app must see a failed connection, not an EOF it could take for a
/// complete (empty) response.
fn refuse(app: &TcpStream, ctx: &Ctx, status: &str) {
    ctx.metrics.hbone_errors.get_or_create(&StatusLabels { direction: "outbound", status: status.into() }).inc();
    reset(app);
}

/// An HBONE stream to `w`'s agent; `dst` (the pod address, or the service
/// endpoint picked: `endpoint_ip:targetPort`) is the `:authority`, as
/// ztunnel sends it.
async fn hbone(
    app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    w: &Workload,
    pod: &PodCtx,
    ctx: &Ctx,
    service: Option<&Service>,
) -> Result<()> {
    let dst_id = ctx.spiffe_id(w)?;
    let key = PoolKey {
        src_workload: pod.workload.uid.clone(),
        src_identity: pod.id.to_string(),
        dst_identity: dst_id.to_string(),
        dst: SocketAddr::new(dst.ip(), HBONE_PORT),
    };
    let dialled = || async {
        // Bounded: the dial holds the pool's lock for this key, so a peer
        // that never answers would stall every stream to it.
        tokio::time::timeout(DIAL_TIMEOUT, dial(pod, ctx, key.dst, dst_id.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("HBONE dial to {} took longer than {DIAL_TIMEOUT:?}", key.dst))?
    };
    let (conn, slot) = match ctx.pool.get(&key, dialled).await {
        Ok(c) => c,
        Err(e) => {
            refuse(&app, ctx, "connect_failed");
            return Err(e);
        }
    };
    let stream = match conn.connect_in(slot, dst, peer.ip()).await {
        Ok(s) => s,
        Err(e) => {
            let status = e.status().map(|s| s.as_u16().to_string()).unwrap_or_else(|| "stream_failed".into());
            refuse(&app, ctx, &status);
            return Err(e).with_context(|| format!("HBONE CONNECT to {dst} via {}", key.dst));
        }
    };
    let src = pod.current(&ctx.state());
    let labels = conn_labels("source", Some(&src), Some(&pod.id), Some(w), Some(&dst_id), service, Security::MutualTls);
    let mut guard = ctx.metrics.connection(labels);
    let (bytes, outcome) = copy_bidirectional(app, stream.send, stream.recv).await;
    guard.client_to_server = bytes.tcp_to_stream;
    guard.server_to_client = bytes.stream_to_tcp;
    debug!(sent = bytes.tcp_to_stream, received = bytes.stream_to_tcp, "HBONE stream done");
    Ok(outcome?)
}

/// A new HBONE connection: TCP from inside the source pod (so it leaves with
/// the pod's IP), mTLS as the pod's identity expecting `dst_id`, then HTTP/2.
async fn dial(pod: &PodCtx, ctx: &Ctx, to: SocketAddr, dst_id: SpiffeId) -> Result<Connection> {
    let tcp = pod.netns.socket(to, None, false)?.connect(to).await.with_context(|| format!("TCP connect to {to}"))?;
    let config = tls::client_config(ctx.certs.clone(), pod.id.clone(), ctx.roots.clone(), dst_id.clone())?;
    let tls = TlsConnector::from(config)
        .connect(tls::connect_server_name(to.ip()), tcp)
        .await
        .with_context(|| format!("mTLS handshake with {to} expecting {dst_id}"))?;
    Connection::handshake(tls).await.with_context(|| format!("HTTP/2 handshake with {to}"))
}

/// Plain TCP to `dst` (a workload outside the mesh, a service endpoint
/// outside it at `endpoint_ip:targetPort`, or an address nobody knows),
/// from inside the pod, with the pod's own IP.
async fn passthrough(
    mut app: TcpStream,
    dst: SocketAddr,
    w: Option<&Workload>,
    pod: &PodCtx,
    ctx: &Ctx,
    service: Option<&Service>,
) -> Result<()> {
    let connect = pod.netns.socket(dst, None, false)?.connect(dst);
    let mut upstream = match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refuse(&app, ctx, "connect_failed");
            return Err(e).with_context(|| format!("passthrough connect to {dst}"));
        }
        Err(_) => {
            refuse(&app, ctx, "connect_timeout");
            anyhow::bail!("passthrough connect to {dst}: no answer within {DIAL_TIMEOUT:?}");
        }
    };
    // ztunnel names a known destination's identity even without mTLS.
    let dst_id = w.and_then(|w| ctx.spiffe_id(w).ok());
    let src = pod.current(&ctx.state());
    let labels = conn_labels("source", Some(&src), Some(&pod.id), w, dst_id.as_ref(), service, Security::Unknown);
    let mut guard = ctx.metrics.connection(labels);
    let (moved, result) = copy_tcp(&mut app, &mut upstream, std::future::pending()).await;
    guard.client_to_server = moved.a_to_b;
    guard.server_to_client = moved.b_to_a;
    Ok(result?)
}
