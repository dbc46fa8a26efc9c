//! 15008: HBONE from other agents. TLS proves the client's SPIFFE identity;
//! each CONNECT stream is then authorized by L4 policy and dialled to the app
//! inside this pod, with the client pod's IP as source. The `:authority` is
//! this pod's address and the app's port (for a service, the endpoint and
//! target port the client's agent picked), so policy is checked against the
//! port the app really serves. Each open stream is registered, so a policy
//! that later denies it resets it (registry.rs).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;

use http::StatusCode;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info_span};

use super::{
    accept::accept_loop,
    canonical_ip, conn_labels, connect_app, own_ports,
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

/// How long a client may take to finish its TLS handshake: one that never
/// does must not hold a socket and a task for ever.
pub const TLS_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, pod: Arc<PodCtx>, ctx: Arc<Ctx>, shutdown: watch::Receiver<bool>) {
    let acceptor = TlsAcceptor::from(pod.server_tls.clone());
    let handler = Arc::new(InboundHandler { pod: pod.clone(), ctx: ctx.clone() });
    let span = |pod: &PodCtx, peer: SocketAddr| info_span!("hbone", pod = %pod.workload.uid, %peer);
    accept_loop(listener, "hbone", pod, ctx, span, move |tcp, peer, _pod, _ctx| {
        let (acceptor, handler, shutdown) = (acceptor.clone(), handler.clone(), shutdown.clone());
        // Counted as active until its last stream ends, so shutdown drains it.
        async move {
            if let Err(e) = connection(tcp, peer, acceptor, handler, shutdown).await {
                debug!(error = format!("{e:#}"), "HBONE connection ended");
            }
        }
    })
    .await
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<InboundHandler>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let local = tcp.local_addr()?;
    let tls = tokio::time::timeout(TLS_ACCEPT_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake not finished within {TLS_ACCEPT_TIMEOUT:?}"))?
        .context("TLS handshake")?;
    // The server config demands a client certificate from the mesh's root;
    // one whose identity cannot be read is refused outright: taken for a
    // plaintext source, it would slip past DENY rules on principals.
    let identity = tls::peer_identity(tls.get_ref().1)
        .context("the client certificate has no readable SPIFFE identity; refusing the connection")?;
    serve_connection(tls, local, peer, Some(identity.to_string()), handler, shutdown).await?;
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
        if self.pod.owns_port(req.target.port()) {
            own_ports::refused(&self.ctx, "inbound", &w.uid, req.target);
            return Err(Refusal::BadRequest(format!("{} is one of the agent's own ports", req.target.port())));
        }
        // Never read as plaintext: that would escape DENY-by-principal.
        let Some(principal) =
            req.peer_identity.as_deref().and_then(|id| id.parse::<SpiffeId>().ok()).map(|id| id.principal())
        else {
            return Err(Refusal::Denied("no verified peer identity".into()));
        };
        let source = Source::authenticated(principal, req.peer.ip());
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

    fn rejected(&self, _peer: SocketAddr, status: StatusCode) {
        let labels = StatusLabels { direction: "inbound", status: status.as_u16().to_string() };
        self.ctx.metrics.hbone_errors.get_or_create(&labels).inc();
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
