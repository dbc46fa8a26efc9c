//! 15008: HBONE from other agents. TLS proves the client's SPIFFE identity;
//! each CONNECT stream is then authorized by L4 policy and dialled to the app
//! inside this pod, with the client pod's IP as source. The `:authority` is
//! this pod's address and the app's port (for a service, the endpoint and
//! target port the client's agent picked), so policy is checked against the
//! port the app really serves. Each open stream is registered, so a policy
//! that later denies it resets it (registry.rs).

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info_span, warn, Instrument};

use super::{
    canonical_ip, conn_labels, connect_app,
    registry::{self, Kind, Registered},
    services::inbound_service,
    Ctx, PodCtx, Security,
};
use crate::{
    identity::SpiffeId,
    metrics::{DenyLabels, StatusLabels},
    policy::{authorize_conn, Conn, Decision, Source},
    tls,
    tunnel::{
        server::{serve_connection, Handler, InboundRequest, Refusal},
        CopyResult,
    },
};

pub async fn serve(listener: TcpListener, pod: Arc<PodCtx>, ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    let acceptor = TlsAcceptor::from(pod.server_tls.clone());
    let handler = Arc::new(InboundHandler { pod: pod.clone(), ctx: ctx.clone() });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = %pod.workload.uid, error = %e, "HBONE accept failed");
                continue;
            }
        };
        let (acceptor, handler, shutdown, ctx) = (acceptor.clone(), handler.clone(), shutdown.clone(), ctx.clone());
        let span = info_span!("hbone", pod = %pod.workload.uid, %peer);
        tokio::spawn(
            async move {
                // Counted until its last stream ends, so shutdown drains it.
                let _active = ctx.track();
                if let Err(e) = connection(tcp, peer, acceptor, handler, shutdown).await {
                    debug!(error = format!("{e:#}"), "HBONE connection ended");
                }
            }
            .instrument(span),
        );
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<InboundHandler>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let local = tcp.local_addr()?;
    let tls = acceptor.accept(tcp).await?;
    let identity = tls::peer_identity(tls.get_ref().1);
    serve_connection(tls, local, peer, identity.map(|id| id.to_string()), handler, shutdown).await?;
    Ok(())
}

struct InboundHandler {
    pod: Arc<PodCtx>,
    ctx: Arc<Ctx>,
}

impl Handler for InboundHandler {
    type Guard = Registered;

    async fn open(&self, req: &InboundRequest) -> Result<(TcpStream, Registered), Refusal> {
        let w = &self.pod.workload;
        if !w.ips.iter().any(|ip| canonical_ip(*ip) == canonical_ip(req.target.ip())) {
            return Err(Refusal::BadRequest(format!("{} is not an address of {}", req.target.ip(), w.uid)));
        }
        let principal =
            req.peer_identity.as_deref().and_then(|id| id.parse::<SpiffeId>().ok()).map(|id| id.principal());
        let source = match principal {
            Some(p) => Source::authenticated(p, req.peer.ip()),
            None => Source::plaintext(req.peer.ip()),
        };
        let state = self.ctx.state();
        let w = self.pod.current(&state);
        if let Decision::Deny { policy } = authorize_conn(&state, &Conn { src: &source, dst: &w, dst_addr: req.target })
        {
            self.ctx
                .metrics
                .auth_denials
                .get_or_create(&DenyLabels { reporter: "destination", policy: policy.clone() })
                .inc();
            return Err(Refusal::Denied(policy));
        }
        let app = connect_app(&self.pod.netns, req.peer.ip(), req.target, self.pod.app_mark)
            .await
            .map_err(Refusal::Unavailable)?;
        Ok((app, registry::register(Kind::Hbone, source, &w.uid, req.target)))
    }

    fn finished(&self, req: &InboundRequest, status: StatusCode, bytes: CopyResult) {
        let m = &self.ctx.metrics;
        if status != StatusCode::OK {
            m.hbone_errors
                .get_or_create(&StatusLabels { direction: "inbound", status: status.as_u16().to_string() })
                .inc();
            return;
        }
        let state = self.ctx.state();
        let src = state.workload_by_ip(req.peer.ip());
        let src_id = req.peer_identity.as_deref().and_then(|id| id.parse::<SpiffeId>().ok());
        let dst = self.pod.current(&state);
        let service = inbound_service(&state, &dst, req.target.port());
        let labels = conn_labels(
            "destination",
            src.as_deref(),
            src_id.as_ref(),
            Some(&dst),
            Some(&self.pod.id),
            service.as_deref(),
            Security::MutualTls,
        );
        let mut guard = m.connection(labels);
        guard.client_to_server = bytes.stream_to_tcp;
        guard.server_to_client = bytes.tcp_to_stream;
    }
}
