//! The server half of HBONE, on 15008 inside the destination pod's netns.
//!
//! Per CONNECT stream, in this order (ztunnel's answers):
//! not CONNECT → 400; `:authority` not an IP:port of the address this TCP
//! connection arrived on → 400; policy denies → 401; app unreachable → 503;
//! otherwise 200, sent only once the upstream connection is up.
//!
//! Before any stream, the connection itself is bounded (`settings`): the
//! HTTP/2 preface must come within a deadline, the peer must answer PINGs,
//! and h2 enforces the header-list and concurrent-stream limits (431 and
//! RST_STREAM(REFUSED_STREAM)), so a hostile peer cannot hold the agent's
//! sockets and tasks for ever.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
};
use tracing::{debug, info_span, warn, Instrument};

use super::{copy::copy_bidirectional_until, settings, CopyResult};

/// What the server knows about one inbound stream when it asks the handler.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The destination the client asked for (`:authority`).
    pub target: SocketAddr,
    /// The TCP peer of the HBONE connection: the client pod's address.
    pub peer: SocketAddr,
    /// The client's verified identity, from its TLS certificate.
    pub peer_identity: Option<String>,
}

/// Why the server refused a stream, mapped to the HTTP status it answers.
#[derive(Debug)]
pub enum Refusal {
    BadRequest(String),
    Denied(String),
    Unavailable(io::Error),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Why [`serve_connection`] ended a connection before the client did.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("no HTTP/2 preface within {0:?} of the TLS handshake")]
    HandshakeTimeout(Duration),
    #[error("a PING went unanswered for {0:?}: the peer is gone or stalling")]
    Unresponsive(Duration),
}

/// Held by the server for as long as a stream it opened runs, and dropped
/// when the stream ends, however it ends.
pub trait StreamGuard: Send + 'static {
    /// Resolves when the handler wants the stream gone (a new policy denies
    /// it): both sides are then reset.
    fn closed(&mut self) -> impl Future<Output = ()> + Send;
}

impl StreamGuard for () {
    async fn closed(&mut self) {
        std::future::pending().await
    }
}

/// The agent's side of each stream: authorize and dial, then account.
pub trait Handler: Send + Sync + 'static {
    type Guard: StreamGuard;
    /// Decides and, when allowed, connects to the app.
    fn open(&self, req: &InboundRequest) -> impl Future<Output = Result<(TcpStream, Self::Guard), Refusal>> + Send;
    /// Called once per stream that was answered, with what moved.
    fn finished(&self, req: &InboundRequest, status: StatusCode, bytes: CopyResult);
    /// Called for a stream refused before `open`: not a CONNECT, or an
    /// `:authority` this connection may not reach (so it can be counted;
    /// a peer can send these as fast as it likes, so they are not logged
    /// above debug).
    fn rejected(&self, _peer: SocketAddr, _status: StatusCode) {}
}

/// Serves one HBONE connection (after the TLS handshake) until the client
/// closes it or `shutdown` flips, in which case it sends GOAWAY and lets the
/// streams already open run to completion. A client that sends no preface
/// within [`settings::HANDSHAKE_TIMEOUT`], or leaves a PING unanswered for
/// [`settings::PING_TIMEOUT`], is dropped: its socket closes, and the
/// streams it had open end with it.
pub async fn serve_connection<IO, H>(
    io: IO,
    local: SocketAddr,
    peer: SocketAddr,
    peer_identity: Option<String>,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let handshake = settings::server_builder().handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(settings::HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout(settings::HANDSHAKE_TIMEOUT))??;
    let keepalive = keepalive(conn.ping_pong().expect("a new connection still has its PingPong"));
    tokio::pin!(keepalive);
    let mut draining = *shutdown.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            // Dropping `conn` closes the socket; a GOAWAY first could block
            // on a peer that reads nothing.
            () = &mut keepalive => return Err(ServeError::Unresponsive(settings::PING_TIMEOUT)),
        };
        let Some(next) = next else { return Ok(()) };
        let (req, respond) = next?;
        let handler = handler.clone();
        let peer_identity = peer_identity.clone();
        let span = info_span!("inbound", %peer, identity = peer_identity.as_deref().unwrap_or("-"));
        tokio::spawn(handle_stream(req, respond, local, peer, peer_identity, handler).instrument(span));
    }
}

/// Resolves once the peer leaves a PING unanswered for
/// [`settings::PING_TIMEOUT`]; PINGs every [`settings::PING_INTERVAL`]. The
/// PINGs move only while the connection is polled, which `serve_connection`
/// does for as long as it runs.
async fn keepalive(mut ping_pong: h2::PingPong) {
    loop {
        tokio::time::sleep(settings::PING_INTERVAL).await;
        match tokio::time::timeout(settings::PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection failed or closed: `accept` says so and ends it.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

async fn handle_stream<H: Handler>(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    local: SocketAddr,
    peer: SocketAddr,
    peer_identity: Option<String>,
    handler: Arc<H>,
) {
    let target = match validate(&req, local) {
        Ok(target) => target,
        Err(refusal) => {
            handler.rejected(peer, refusal.status());
            return refuse(&mut respond, &refusal);
        }
    };
    let inbound = InboundRequest { target, peer, peer_identity };
    let (upstream, mut guard) = match handler.open(&inbound).await {
        Ok(s) => s,
        Err(refusal) => {
            refuse(&mut respond, &refusal);
            handler.finished(&inbound, refusal.status(), CopyResult::default());
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return warn!(error = %e, "client went away before 200"),
    };
    let (bytes, outcome) = copy_bidirectional_until(upstream, send, req.into_body(), guard.closed()).await;
    if let Err(e) = outcome {
        debug!(error = %e, "stream ended with an error");
    }
    handler.finished(&inbound, StatusCode::OK, bytes);
}

/// Checks the request is a CONNECT to an address this connection may reach.
fn validate(req: &Request<h2::RecvStream>, local: SocketAddr) -> Result<SocketAddr, Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal::BadRequest(format!("method {} is not CONNECT", req.method())));
    }
    let authority = req.uri().authority().ok_or_else(|| Refusal::BadRequest("CONNECT without :authority".into()))?;
    let target: SocketAddr = authority
        .as_str()
        .parse()
        .map_err(|_| Refusal::BadRequest(format!(":authority {authority} is not IP:port")))?;
    // A client may only reach the pod whose address it dialled: otherwise
    // one pod's HBONE port would be a relay to every other address.
    if canonical(target.ip()) != canonical(local.ip()) {
        return Err(Refusal::BadRequest(format!(
            ":authority {} does not match the address {} this connection arrived on",
            target.ip(),
            local.ip()
        )));
    }
    Ok(target)
}

fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(Into::into).unwrap_or(ip),
        v4 => v4,
    }
}

fn refuse(respond: &mut SendResponse<Bytes>, refusal: &Refusal) {
    match refusal {
        Refusal::Denied(why) => debug!(%why, "denied"),
        Refusal::BadRequest(why) => debug!(%why, "bad HBONE request"),
        Refusal::Unavailable(e) => warn!(error = %e, "app unreachable"),
    }
    let resp = Response::builder().status(refusal.status()).body(()).expect("static response is valid");
    let _ = respond.send_response(resp, true);
}
