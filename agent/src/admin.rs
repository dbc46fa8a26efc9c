//! The node-side HTTP endpoints: admin (`/config_dump`, loopback unless
//! `--admin` says otherwise, with a warning),
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
use tracing::{debug, info, warn};

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

/// The admin endpoint's default address. `/config_dump` shows every local
/// workload, its certificate's state and the policies, so it stays on
/// loopback unless the operator says otherwise (`--admin`); metrics and
/// readiness are meant to be scraped and probed, and bind 0.0.0.0.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// The warning for an admin endpoint reachable from beyond the node, if
/// `addr` is one; `None` for loopback and for the other endpoints.
pub fn exposure_warning(name: &str, addr: SocketAddr) -> Option<String> {
    (name == "admin" && !addr.ip().is_loopback()).then(|| {
        format!(
            "the admin endpoint (/config_dump) listens on {addr}, which is not loopback: anyone who can reach it \
             sees this node's workloads, certificate state and policies; use --admin {DEFAULT_ADMIN} unless that \
             is intended"
        )
    })
}

/// Answers one request: (status, content type, body).
pub type Route = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// Binds now (so a port clash fails the start, loudly) and serves in the
/// background until the runtime ends.
pub async fn serve(name: &'static str, addr: SocketAddr, route: Route) -> Result<SocketAddr> {
    let listener = bind_reuseport(addr).with_context(|| format!("binding the {name} endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    info!(endpoint = name, addr = %bound, "listening");
    if let Some(warning) = exposure_warning(name, bound) {
        warn!(endpoint = name, addr = %bound, "{warning}");
    }
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like do not clear at once: do not spin.
                    debug!(endpoint = name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_stays_on_loopback_unless_told_otherwise() {
        let default: SocketAddr = DEFAULT_ADMIN.parse().unwrap();
        assert!(default.ip().is_loopback() && default.port() == 15000, "{default}");
        assert_eq!(exposure_warning("admin", default), None);
        assert_eq!(exposure_warning("admin", "[::1]:15000".parse().unwrap()), None);
        for exposed in ["0.0.0.0:15000", "10.1.2.3:15000", "[::]:15000"] {
            let warning = exposure_warning("admin", exposed.parse().unwrap()).unwrap();
            assert!(warning.contains(exposed) && warning.contains("not loopback"), "{warning}");
        }
        // Metrics and readiness are for scrapers and probes.
        assert_eq!(exposure_warning("metrics", "0.0.0.0:15020".parse().unwrap()), None);
        assert_eq!(exposure_warning("readiness", "0.0.0.0:15021".parse().unwrap()), None);
    }

    /// The warning reaches the log when the endpoint is bound.
    #[test]
    fn a_non_loopback_admin_is_logged_as_a_warning() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let route: Route = Arc::new(|_| (StatusCode::OK, "text/plain", String::new()));
        rt.block_on(async {
            serve("admin", "127.0.0.1:0".parse().unwrap(), route.clone()).await.unwrap();
            serve("metrics", "0.0.0.0:0".parse().unwrap(), route.clone()).await.unwrap();
        });
        assert!(!String::from_utf8_lossy(&sink.0.lock().unwrap()).contains("WARN"), "loopback admin warned");
        rt.block_on(serve("admin", "0.0.0.0:0".parse().unwrap(), route)).unwrap();
        let log = String::from_utf8_lossy(&sink.0.lock().unwrap()).to_string();
        let line = log.lines().find(|l| l.contains("WARN")).unwrap_or_else(|| panic!("no warning:\n{log}"));
        assert!(line.contains("admin endpoint (/config_dump)") && line.contains("not loopback"), "{line}");
    }
}
