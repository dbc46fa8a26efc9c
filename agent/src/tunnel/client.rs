//! The client half of HBONE: one HTTP/2 connection (already over mTLS) and
//! the CONNECT streams opened on it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::settings::{self, MAX_STREAMS_PER_CONN};

/// Why a CONNECT did not produce a stream. `status` is the HTTP status the
/// peer answered, when it answered one (for the HBONE-errors metric).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("HBONE peer answered {0}")]
    Status(StatusCode),
    #[error("HBONE connection failed: {0}")]
    H2(#[from] h2::Error),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl ConnectError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ConnectError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// One HTTP/2 connection to a peer's 15008. Cheap to share; the pool hands
/// out `Arc<Connection>`.
pub struct Connection {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    last_used: Mutex<Instant>,
}

/// An open CONNECT stream. Dropping it releases its slot on the connection.
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    _slot: Slot,
}

/// A stream's place on a connection, counted from the moment it is taken.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    /// HTTP/2 handshake on an established (TLS) stream; the connection task
    /// runs until the peer or we close it.
    pub async fn handshake<IO>(io: IO) -> Result<Connection, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = settings::client_builder().handshake(io).await?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "HBONE connection ended");
            }
            flag.store(true, Ordering::Relaxed);
        });
        Ok(Connection { send, active: Arc::default(), closed, last_used: Mutex::new(Instant::now()) })
    }

    /// Takes a stream's place on this connection if it has one, in one
    /// atomic step: checking for room and counting the stream later would
    /// let two callers take the last place, and the extra stream would then
    /// wait inside h2 for the peer's concurrency limit until some other
    /// stream on the connection ends, which a long-lived one never does.
    pub fn reserve(&self) -> Option<Slot> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS_PER_CONN as usize).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.active.clone()))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn idle_since(&self) -> Option<Instant> {
        (self.active_streams() == 0).then(|| *self.last_used.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Opens a CONNECT stream to `target` and waits for the peer's 200, which
    /// it sends only once the destination app accepted the connection.
    pub async fn connect(&self, target: SocketAddr, forwarded_for: IpAddr) -> Result<Stream, ConnectError> {
        self.connect_in(self.force_slot(), target, forwarded_for).await
    }

    /// A place counted whether or not there is room (a connection used
    /// directly, outside the pool).
    pub fn force_slot(&self) -> Slot {
        self.active.fetch_add(1, Ordering::Relaxed);
        Slot(self.active.clone())
    }

    /// [`Self::connect`] on a place already taken with [`Self::reserve`].
    pub async fn connect_in(
        &self,
        slot: Slot,
        target: SocketAddr,
        forwarded_for: IpAddr,
    ) -> Result<Stream, ConnectError> {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", format!("for={}", forwarded(forwarded_for)))
            .body(())?;
        let mut sender = self.send.clone().ready().await?;
        let (response, send) = sender.send_request(req, false)?;
        let response = response.await?;
        if response.status() != StatusCode::OK {
            return Err(ConnectError::Status(response.status()));
        }
        Ok(Stream { send, recv: response.into_body(), _slot: slot })
    }
}

/// RFC 7239: IPv6 addresses are quoted and bracketed.
fn forwarded(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}
