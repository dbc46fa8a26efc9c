//! The node-side HTTP endpoints: admin (`/config_dump`, localhost only),
//! Prometheus (`/metrics`) and readiness (`/healthz/ready`). Each is a tiny
//! hyper HTTP/1 server; none is on a hot path.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

/// SO_REUSEPORT, so an upgraded agent can start beside the old one (two
/// DaemonSet pods on one node during a surge) instead of failing to bind.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

/// Answers one request: (status, content type, body).
pub type Route = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// Binds now (so a port clash fails the start, loudly) and serves in the
/// background until the runtime ends.
pub async fn serve(name: &'static str, addr: SocketAddr, route: Route) -> Result<SocketAddr> {
    let listener = bind_reuseport(addr).with_context(|| format!("binding the {name} endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    info!(endpoint = name, addr = %bound, "listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let route = route.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (status, ctype, body) = route(req.uri().path());
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid");
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
                {
                    debug!(endpoint = name, error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(bound)
}
