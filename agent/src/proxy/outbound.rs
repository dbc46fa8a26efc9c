//! 15001: connections the pod's apps open, after capture rewrote them here.
//!
//! The original destination decides the path: an enrolled (HBONE) workload
//! on this node is spliced in the kernel when capture is eBPF (splice.rs),
//! one elsewhere gets an HBONE stream to its agent's 15008, anything else (not enrolled, or
//! not a known workload at all) is passed through as plain TCP, from inside
//! the pod, with the agent mark so it is not captured again.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, info_span, warn, Instrument};

use super::{canonical_ip, conn_labels, splice::splice, Ctx, PodCtx};
use crate::{
    identity::SpiffeId,
    metrics::StatusLabels,
    netns::original_dst,
    state::{Protocol, Workload},
    tls,
    tunnel::{client::Connection, copy_bidirectional, pool::PoolKey, HBONE_PORT},
};

pub async fn serve(listener: TcpListener, pod: Arc<PodCtx>, ctx: Arc<Ctx>) {
    loop {
        let (app, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = %pod.workload.uid, error = %e, "outbound accept failed");
                continue;
            }
        };
        let (pod, ctx) = (pod.clone(), ctx.clone());
        let span = info_span!("outbound", pod = %pod.workload.uid, src = %peer, dst = tracing::field::Empty);
        tokio::spawn(
            async move {
                let _active = ctx.track();
                if let Err(e) = handle(app, peer, &pod, &ctx).await {
                    debug!(error = format!("{e:#}"), "outbound connection failed");
                }
            }
            .instrument(span),
        );
    }
}

async fn handle(app: TcpStream, peer: SocketAddr, pod: &PodCtx, ctx: &Ctx) -> Result<()> {
    let dst = original_dst(&app).context("reading the original destination (SO_ORIGINAL_DST)")?;
    tracing::Span::current().record("dst", tracing::field::display(dst));
    let state = ctx.state();
    match state.workload_by_ip(dst.ip()) {
        Some(w) if w.protocol == Protocol::Hbone => match (&ctx.splice, ctx.local_pod(dst.ip())) {
            // IPv4 only: an IPv6 app socket in a sockmap lost its incoming
            // bytes on 6.18 in our tests (see sockops.rs), so IPv6 takes HBONE.
            (Some(maps), Some(dst_pod)) if canonical_ip(dst.ip()).is_ipv4() => {
                splice(app, peer, dst, pod, &dst_pod, maps, ctx).await
            }
            _ => hbone(app, peer, dst, &w, pod, ctx).await,
        },
        other => passthrough(app, dst, other.as_deref(), pod, ctx).await,
    }
}

async fn hbone(app: TcpStream, peer: SocketAddr, dst: SocketAddr, w: &Workload, pod: &PodCtx, ctx: &Ctx) -> Result<()> {
    let dst_id = ctx.spiffe_id(w)?;
    let key = PoolKey {
        src_identity: pod.id.to_string(),
        dst_identity: dst_id.to_string(),
        dst: SocketAddr::new(dst.ip(), HBONE_PORT),
    };
    let refuse = |status: String| {
        ctx.metrics.hbone_errors.get_or_create(&StatusLabels { direction: "outbound", status }).inc();
        // Reset, not close: the app must see a failed connect, not an EOF
        // it could take for a complete (empty) response.
        let _ = socket2::SockRef::from(&app).set_linger(Some(std::time::Duration::ZERO));
    };
    let conn = match ctx.pool.get(&key, || dial(pod, ctx, key.dst, dst_id.clone())).await {
        Ok(c) => c,
        Err(e) => {
            refuse("connect_failed".into());
            return Err(e);
        }
    };
    let stream = match conn.connect(dst, peer.ip()).await {
        Ok(s) => s,
        Err(e) => {
            refuse(e.status().map(|s| s.as_u16().to_string()).unwrap_or_else(|| "stream_failed".into()));
            return Err(e).with_context(|| format!("HBONE CONNECT to {dst} via {}", key.dst));
        }
    };
    let labels =
        conn_labels("source", Some(&pod.workload), Some(pod.id.principal()), Some(w), Some(dst_id.principal()), true);
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

async fn passthrough(mut app: TcpStream, dst: SocketAddr, w: Option<&Workload>, pod: &PodCtx, ctx: &Ctx) -> Result<()> {
    let mut upstream = pod
        .netns
        .socket(dst, None, false)?
        .connect(dst)
        .await
        .with_context(|| format!("passthrough connect to {dst}"))?;
    let labels = conn_labels("source", Some(&pod.workload), Some(pod.id.principal()), w, None, false);
    let mut guard = ctx.metrics.connection(labels);
    let result = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
    if let Ok((up, down)) = result {
        guard.client_to_server = up;
        guard.server_to_client = down;
    }
    Ok(result.map(drop)?)
}
