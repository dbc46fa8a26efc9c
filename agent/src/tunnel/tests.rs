//! The tunnel over plain loopback TCP (TLS is tested in `tls`): half-close,
//! reset propagation, pooling limits and idle reaping.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    client::Connection,
    pool::{Pool, PoolKey},
    server::{serve_connection, Handler, InboundRequest, Refusal},
    CopyResult,
};

/// Dials the app at `app` for every stream.
struct ToApp {
    app: SocketAddr,
    finished: AtomicUsize,
}

impl Handler for ToApp {
    type Guard = ();
    async fn open(&self, _: &InboundRequest) -> Result<(TcpStream, ()), Refusal> {
        Ok((TcpStream::connect(self.app).await.map_err(Refusal::Unavailable)?, ()))
    }
    fn finished(&self, _: &InboundRequest, _: StatusCode, _: CopyResult) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// An HBONE server on loopback in front of `app`; returns its address.
async fn hbone_server(app: SocketAddr) -> (SocketAddr, Arc<ToApp>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(ToApp { app, finished: AtomicUsize::new(0) });
    let (stop, stop_rx) = watch::channel(false);
    let h = handler.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let local = tcp.local_addr().unwrap();
            tokio::spawn(serve_connection(tcp, local, peer, None, h.clone(), stop_rx.clone()));
        }
    });
    (addr, handler, stop)
}

/// An app that reads to EOF, then answers with how many bytes it got.
async fn counting_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(format!("got {}", buf.len()).as_bytes()).await.unwrap();
            });
        }
    });
    addr
}

async fn connection(to: SocketAddr) -> Connection {
    Connection::handshake(TcpStream::connect(to).await.unwrap()).await.unwrap()
}

#[tokio::test]
async fn half_close_travels_both_ways() {
    let app = counting_app().await;
    let (hbone, handler, _stop) = hbone_server(app).await;
    let conn = connection(hbone).await;
    let mut stream = conn.connect(SocketAddr::new(hbone.ip(), app.port()), hbone.ip()).await.unwrap();
    // END_STREAM after the data: the app must see EOF, and still answer.
    stream.send.send_data(Bytes::from(vec![7u8; 300_000]), true).unwrap();
    let mut answer = Vec::new();
    while let Some(chunk) = stream.recv.data().await {
        let chunk = chunk.unwrap();
        stream.recv.flow_control().release_capacity(chunk.len()).unwrap();
        answer.extend_from_slice(&chunk);
    }
    assert_eq!(answer, b"got 300000");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handler.finished.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn unreachable_app_is_503_and_wrong_authority_400() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (hbone, _, _stop) = hbone_server(closed).await;
    let conn = connection(hbone).await;
    let err = conn.connect(SocketAddr::new(hbone.ip(), closed.port()), hbone.ip()).await.err().unwrap();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    let err = conn.connect("127.0.0.2:80".parse().unwrap(), hbone.ip()).await.err().unwrap();
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST), "authority not the dialled address");
}

#[tokio::test]
async fn pool_opens_another_connection_past_100_streams() {
    let app = counting_app().await;
    let (hbone, _, _stop) = hbone_server(app).await;
    let pool = Pool::new(Duration::from_secs(30));
    let key = PoolKey { src_workload: "ns/a-1".into(), src_identity: "a".into(), dst_identity: "b".into(), dst: hbone };
    let dials = AtomicUsize::new(0);
    let dial = || async {
        dials.fetch_add(1, Ordering::Relaxed);
        Ok::<_, std::io::Error>(connection(hbone).await)
    };
    let target = SocketAddr::new(hbone.ip(), app.port());
    let mut held = Vec::new();
    for _ in 0..100 {
        let (conn, slot) = pool.get(&key, dial).await.unwrap();
        held.push(conn.connect_in(slot, target, hbone.ip()).await.unwrap());
    }
    assert_eq!(dials.load(Ordering::Relaxed), 1, "100 streams fit one connection");
    let (conn, slot) = pool.get(&key, dial).await.unwrap();
    held.push(conn.connect_in(slot, target, hbone.ip()).await.unwrap());
    assert_eq!(dials.load(Ordering::Relaxed), 2, "the 101st stream needs a second connection");
    assert_eq!(pool.stats().connections, 2);
    assert_eq!(pool.stats().active_streams, 101);
}

#[tokio::test]
async fn idle_connections_are_reaped() {
    let app = counting_app().await;
    let (hbone, _, _stop) = hbone_server(app).await;
    let pool = Pool::new(Duration::from_millis(200));
    let key = PoolKey { src_workload: "ns/a-1".into(), src_identity: "a".into(), dst_identity: "b".into(), dst: hbone };
    let (conn, slot) = pool.get(&key, || async { Ok::<_, std::io::Error>(connection(hbone).await) }).await.unwrap();
    drop(conn.connect_in(slot, SocketAddr::new(hbone.ip(), app.port()), hbone.ip()).await.unwrap());
    drop(conn);
    assert_eq!(pool.stats().connections, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(pool.stats().connections, 0, "an idle connection outlived the idle timeout");
}

#[tokio::test]
async fn goaway_lets_open_streams_finish() {
    let app = counting_app().await;
    let (hbone, _, stop) = hbone_server(app).await;
    let conn = connection(hbone).await;
    let mut stream = conn.connect(SocketAddr::new(hbone.ip(), app.port()), hbone.ip()).await.unwrap();
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The open stream still completes after GOAWAY.
    stream.send.send_data(Bytes::from_static(b"abc"), true).unwrap();
    let mut answer = Vec::new();
    while let Some(chunk) = stream.recv.data().await {
        answer.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(answer, b"got 3");
    // New streams are refused.
    assert!(conn.connect(SocketAddr::new(hbone.ip(), app.port()), hbone.ip()).await.is_err());
}

/// Places are taken under the pool's lock: 150 callers at once never put
/// more than 100 streams on one connection (before, two could take the
/// last place, and the extra stream waited inside h2 for the peer's limit).
#[tokio::test]
async fn concurrent_gets_never_overfill_a_connection() {
    let app = counting_app().await;
    let (hbone, _, _stop) = hbone_server(app).await;
    let pool = Pool::new(Duration::from_secs(30));
    let key = PoolKey { src_workload: "ns/a-1".into(), src_identity: "a".into(), dst_identity: "b".into(), dst: hbone };
    let gets = (0..150).map(|_| pool.get(&key, || async { Ok::<_, std::io::Error>(connection(hbone).await) }));
    let leases: Vec<_> = futures::future::join_all(gets).await.into_iter().map(Result::unwrap).collect();
    let mut per_conn: Vec<(*const crate::tunnel::client::Connection, usize)> = Vec::new();
    for (conn, _) in &leases {
        let p = std::sync::Arc::as_ptr(conn);
        match per_conn.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => per_conn.push((p, 1)),
        }
    }
    assert_eq!(per_conn.len(), 2, "150 places take two connections: {per_conn:?}");
    assert!(per_conn.iter().all(|(_, n)| *n <= 100), "a connection got more than 100 places: {per_conn:?}");
    assert_eq!(pool.stats().active_streams, 150);
}
