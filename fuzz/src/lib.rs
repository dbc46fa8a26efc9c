//! What the fuzz targets share: the HBONE harness (the real
//! `serve_connection` over an in-memory duplex, with a stub handler whose
//! allowed streams reach a real echo server on loopback) and the readable
//! input formats of the structure-aware targets.
//!
//! A panic anywhere, in a spawned task too, aborts the process:
//! libfuzzer-sys installs a panic hook that does, so libFuzzer sees it as a
//! crash and saves the input.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use sluice::tunnel::server::{serve_connection, Handler, InboundRequest, Refusal};
use sluice::tunnel::CopyResult;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long one input may keep the server busy after the client is done
/// before it counts as a hang (libFuzzer's own -timeout is the backstop).
pub const HANG: Duration = Duration::from_secs(5);

/// The address the HBONE connection arrived on: `:authority` must name it.
pub fn local_addr(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)), 15008)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 15008)
    }
}

pub const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40000);
pub const PEER_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// What the stub handler does with a stream, by the target port, so that
/// an input chooses the path: `port % 3 == 1` (8080, 80, 443, 15001)
/// connects to the echo server (200), `== 2` (8081) is denied (401), `== 0`
/// (8082, 15006) is unavailable (503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Echo,
    Deny,
    Unavailable,
}

pub fn verdict(port: u16) -> Verdict {
    match port % 3 {
        1 => Verdict::Echo,
        2 => Verdict::Deny,
        _ => Verdict::Unavailable,
    }
}

impl Verdict {
    pub fn status(self) -> StatusCode {
        match self {
            Verdict::Echo => StatusCode::OK,
            Verdict::Deny => StatusCode::UNAUTHORIZED,
            Verdict::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The agent's side, stubbed: no policy, no dial of the real target. It
/// records what `finished` was told, for the targets' checks.
#[derive(Default)]
pub struct Stub {
    pub finished: Mutex<Vec<(SocketAddr, StatusCode, CopyResult)>>,
}

impl Handler for Stub {
    type Guard = ();

    async fn open(&self, req: &InboundRequest) -> Result<(TcpStream, ()), Refusal> {
        match verdict(req.target.port()) {
            Verdict::Deny => Err(Refusal::Denied("fuzz stub: odd port class".into())),
            Verdict::Unavailable => Err(Refusal::Unavailable(io::Error::from(io::ErrorKind::ConnectionRefused))),
            Verdict::Echo => {
                let stream = TcpStream::connect(echo_addr()).await.map_err(Refusal::Unavailable)?;
                // A reset instead of TIME_WAIT on close: thousands of
                // connections a second would run out of ephemeral ports.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                Ok((stream, ()))
            }
        }
    }

    fn finished(&self, req: &InboundRequest, status: StatusCode, bytes: CopyResult) {
        self.finished.lock().unwrap().push((req.target, status, bytes));
    }
}

/// An echo server on 127.0.0.1, on its own thread, for the whole process:
/// what an allowed stream reaches. It echoes until EOF, then closes.
pub fn echo_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the echo server");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    loop {
                        let Ok((mut s, _)) = listener.accept().await else { continue };
                        tokio::spawn(async move {
                            let (mut rd, mut wr) = s.split();
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                            let _ = wr.shutdown().await;
                        });
                    }
                });
            })
            .expect("starting the echo thread");
        addr
    })
}

/// `SLUICE_FUZZ_DEBUG=1`: the harness says what each input did (run a
/// target binary on one file to see it).
pub fn debug() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SLUICE_FUZZ_DEBUG").is_some())
}

/// A fresh single-threaded runtime per input: dropping it cancels every
/// task the input started, so no input leaks into the next.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Reads and drops whatever the server writes, so it never blocks on a
/// full pipe; returns how many bytes it read.
pub async fn drain(mut rd: impl AsyncRead + Unpin) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => {
                if debug() {
                    eprintln!("server wrote: {}", describe_frames(&buf[..n]));
                }
                total += n
            }
        }
    }
}

/// `type(stream) flags len` for each whole frame in `bytes`, for debugging.
pub fn describe_frames(mut bytes: &[u8]) -> String {
    const NAMES: [&str; 10] = [
        "DATA",
        "HEADERS",
        "PRIORITY",
        "RST_STREAM",
        "SETTINGS",
        "PUSH_PROMISE",
        "PING",
        "GOAWAY",
        "WINDOW_UPDATE",
        "CONTINUATION",
    ];
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        let name = NAMES.get(usize::from(bytes[3])).copied().unwrap_or("?");
        let payload = &bytes[9..(9 + len).min(bytes.len())];
        out.push(format!("{name}({stream}) flags={:#x} {payload:02x?}", bytes[4]));
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    out.join(", ")
}

/// Raw HTTP/2: the server sees the preface, then `frames` exactly as
/// given. `flags` bit 0: the agent is already draining (GOAWAY first);
/// bit 1: the connection arrived on an IPv6 address; bit 2: drain starts
/// after the frames are in. The server gets some scheduler turns to act on
/// the frames (open streams, dial the echo, copy), then the client closes;
/// `serve_connection` must then return within [`HANG`].
pub fn run_frames(flags: u8, frames: &[u8]) {
    let rt = runtime();
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (shutdown_tx, shutdown_rx) = watch::channel(flags & 1 != 0);
        let handler = Arc::new(Stub::default());
        let serve = tokio::spawn(serve_connection(
            server,
            local_addr(flags & 2 != 0),
            PEER,
            Some(PEER_IDENTITY.into()),
            handler.clone(),
            shutdown_rx,
        ));
        let (rd, mut wr) = tokio::io::split(client);
        let drained = tokio::spawn(drain(rd));
        let write = async {
            wr.write_all(PREFACE).await?;
            wr.write_all(frames).await?;
            settle().await;
            if flags & 4 != 0 {
                let _ = shutdown_tx.send(true);
                settle().await;
            }
            wr.shutdown().await
        };
        // A write error is the server having closed: fine.
        if tokio::time::timeout(HANG, write).await.is_err() {
            panic!("the server stopped reading: {} bytes of frames not taken within {HANG:?}", frames.len());
        }
        match tokio::time::timeout(HANG, serve).await {
            Err(_) => panic!("serve_connection still running {HANG:?} after the client closed its side"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(r) => {
                if debug() {
                    let out = drained.await.unwrap_or_default();
                    let finished = handler.finished.lock().unwrap().clone();
                    eprintln!("serve_connection: {r:?}; server wrote {out} bytes; streams finished: {finished:?}");
                }
            }
        }
        drop(shutdown_tx);
    });
}

/// Gives the other tasks of this runtime a few hundred turns (the I/O
/// driver runs every 61): enough for a loopback connect and a few copies.
pub async fn settle() {
    for _ in 0..256 {
        tokio::task::yield_now().await;
    }
}

/// One request of the `hbone_request` target, in its readable form:
///
/// ```text
/// CONNECT 10.0.0.2:8080
/// x-header: value
///
/// body bytes
/// ```
///
/// The first line is the method and the URI (`authority` alone is
/// authority-form, as CONNECT uses it). Header lines follow up to an empty
/// line; whatever is after it is the body. Requests are separated by a line
/// `%%`.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: Vec<u8>,
    pub uri: Vec<u8>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

pub const MAX_REQUESTS: usize = 8;

pub fn parse_requests(data: &[u8]) -> Vec<RequestSpec> {
    split(data, b"\n%%\n").take(MAX_REQUESTS).map(parse_request).collect()
}

fn parse_request(rec: &[u8]) -> RequestSpec {
    let (head, body) = match find(rec, b"\n\n") {
        Some(i) => (&rec[..i], &rec[i + 2..]),
        None => (rec, &[][..]),
    };
    let mut lines = head.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let (method, uri) = match first.iter().position(|&b| b == b' ') {
        Some(i) => (&first[..i], &first[i + 1..]),
        None => (first, &[][..]),
    };
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| match find(l, b": ") {
            Some(i) => (l[..i].to_vec(), l[i + 2..].to_vec()),
            None => (l.to_vec(), Vec::new()),
        })
        .collect();
    RequestSpec { method: method.to_vec(), uri: uri.to_vec(), headers, body: body.to_vec() }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split<'a>(mut data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match find(data, sep) {
            Some(i) => {
                let rec = &data[..i];
                data = &data[i + sep.len()..];
                Some(rec)
            }
            None => {
                done = true;
                Some(data)
            }
        }
    })
}

/// What the server must answer, by its documented rules: not CONNECT →
/// 400; `:authority` not an IP:port of the connection's own address → 400;
/// otherwise what the handler decides.
pub fn expected_status(method: &http::Method, uri: &http::Uri, local: SocketAddr) -> StatusCode {
    if method != http::Method::CONNECT {
        return StatusCode::BAD_REQUEST;
    }
    let Some(target) = uri.authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    if target.ip().to_canonical() != local.ip().to_canonical() {
        return StatusCode::BAD_REQUEST;
    }
    verdict(target.port()).status()
}

/// Drives the real server with the h2 client: each request that the client
/// library accepts is sent, its status checked against
/// [`expected_status`], and on 200 its body must come back byte for byte
/// through the echo server. `v6`: the connection arrived on IPv6.
pub fn run_requests(specs: &[RequestSpec], v6: bool) {
    let local = local_addr(v6);
    let rt = runtime();
    rt.block_on(async {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let handler = Arc::new(Stub::default());
        let serve = tokio::spawn(serve_connection(
            server_io,
            local,
            PEER,
            Some(PEER_IDENTITY.into()),
            handler.clone(),
            shutdown_rx,
        ));
        let client = async {
            let (send, conn) = match sluice::tunnel::settings::client_builder().handshake::<_, Bytes>(client_io).await {
                Ok(x) => x,
                Err(e) => panic!("h2 handshake with the server failed: {e}"),
            };
            let conn_task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut streams = Vec::new();
            for spec in specs {
                let Some(req) = build(spec) else { continue };
                let expect = expected_status(req.method(), req.uri(), local);
                let mut send = match send.clone().ready().await {
                    Ok(s) => s,
                    Err(_) => break, // connection gone (GOAWAY after a protocol error)
                };
                let end = spec.body.is_empty();
                let Ok((response, mut body_tx)) = send.send_request(req, end) else { continue };
                if !end {
                    let _ = body_tx.send_data(Bytes::copy_from_slice(&spec.body), true);
                }
                let spec = spec.clone();
                streams.push(async move {
                    let Ok(resp) = response.await else { return };
                    let status = resp.status();
                    if debug() {
                        eprintln!(
                            "{} {} -> {status} (expected {expect})",
                            String::from_utf8_lossy(&spec.method),
                            String::from_utf8_lossy(&spec.uri)
                        );
                    }
                    // h2 refuses a header list over the server's limit itself
                    // (431); the smallest limit in use is 16 KiB.
                    if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE && header_list_size(&spec) >= 16 * 1024 {
                        return;
                    }
                    assert_eq!(status, expect, "server answered {status}, its rules say {expect} for {spec:?}");
                    if status != StatusCode::OK {
                        return;
                    }
                    let mut body = resp.into_body();
                    let mut got = Vec::new();
                    while let Some(chunk) = body.data().await {
                        let Ok(chunk) = chunk else { return };
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got.extend_from_slice(&chunk);
                    }
                    if debug() {
                        eprintln!("  echoed {} of {} body bytes", got.len(), spec.body.len());
                    }
                    assert!(
                        got == spec.body,
                        "echo through the tunnel changed the bytes: sent {:?}, got {:?}",
                        spec.body,
                        got
                    );
                });
            }
            futures_join_all(streams).await;
            drop(send);
            conn_task.abort();
        };
        if tokio::time::timeout(HANG, client).await.is_err() {
            panic!("requests not answered within {HANG:?}: {specs:?}");
        }
        let _ = shutdown_tx.send(true);
        match tokio::time::timeout(HANG, serve).await {
            Err(_) => panic!("serve_connection still running {HANG:?} after the client went away"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(_) => {}
        }
    });
}

/// The request's header list size as HTTP/2 counts it (RFC 9113 §6.5.2:
/// name + value + 32 per field), pseudo-headers included.
pub fn header_list_size(spec: &RequestSpec) -> usize {
    let pseudo = 7 + spec.method.len() + 32 + 10 + spec.uri.len() + 32;
    pseudo + spec.headers.iter().map(|(n, v)| n.len() + v.len() + 32).sum::<usize>()
}

/// The request the h2 client is given, or `None` when the http crate
/// refuses the method, URI or a header (such a request never reaches the
/// wire from this client; `hbone_frames` covers the bytes it would refuse).
pub fn build(spec: &RequestSpec) -> Option<http::Request<()>> {
    let method = http::Method::from_bytes(&spec.method).ok()?;
    let uri = http::Uri::try_from(spec.uri.as_slice()).ok()?;
    let mut req = http::Request::builder().method(method).uri(uri).version(http::Version::HTTP_2);
    for (name, value) in &spec.headers {
        let name = http::HeaderName::from_bytes(name).ok()?;
        let value = http::HeaderValue::from_bytes(value).ok()?;
        req = req.header(name, value);
    }
    req.body(()).ok()
}

/// Runs the futures to completion, concurrently (no `futures` dependency).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(futs: Vec<F>) {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    for h in handles {
        if let Err(e) = h.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// Splits the first byte off as flags.
pub fn flags_and_rest(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((f, rest)) => (*f, rest),
        None => (0, data),
    }
}

/// Records what passes through, for the seed generator.
pub struct Tee<T> {
    pub inner: T,
    pub written: Arc<Mutex<Vec<u8>>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tee<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tee<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.lock().unwrap().extend_from_slice(&buf[..*n]);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
