//! The byte copy between two TCP sockets (passthrough and plaintext
//! inbound), with the same rules as the HBONE copy (tunnel/copy.rs): EOF
//! becomes a half-close on the other side, and an error on either side, or
//! `stop` (a new policy denies the connection), resets both, so neither
//! peer takes a failure for a complete answer. Byte counts are kept even
//! when it ends in an error, so telemetry counts what did move.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::reset;

const CHUNK: usize = 64 * 1024;

/// What moved: `a` to `b` and `b` to `a`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

pub async fn copy_tcp(
    a: &mut TcpStream,
    b: &mut TcpStream,
    stop: impl Future<Output = String>,
) -> (Moved, io::Result<()>) {
    let mut moved = Moved::default();
    let result = {
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let both = async {
            tokio::try_join!(pump(&mut ar, &mut bw, &mut moved.a_to_b), pump(&mut br, &mut aw, &mut moved.b_to_a))
        };
        tokio::select! {
            r = both => r.map(drop),
            why = stop => Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("closed: {why}"))),
        }
    };
    if result.is_err() {
        reset(a);
        reset(b);
    }
    (moved, result)
}

async fn pump<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// client <-> (a | copy | b) <-> server
    #[tokio::test]
    async fn half_close_passes_and_a_reset_becomes_a_reset() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let copier = tokio::spawn(async move { copy_tcp(&mut a, &mut b, std::future::pending()).await });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "bytes then EOF: the half-close crossed");
        server.write_all(b"bye").await.unwrap();
        // The server resets: the client must see a reset, not a clean EOF.
        socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(server);
        let mut back = Vec::new();
        let err = loop {
            let mut buf = [0u8; 16];
            match client.read(&mut buf).await {
                Ok(0) => panic!("clean EOF after {back:?}: the reset was turned into a FIN"),
                Ok(n) => back.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let (moved, result) = copier.await.unwrap();
        assert!(result.is_err());
        assert_eq!(moved.a_to_b, 5);
    }

    #[tokio::test]
    async fn stop_resets_both_sides() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let copier = tokio::spawn(async move { copy_tcp(&mut a, &mut b, async { "policy x".to_string() }).await });
        let (_, result) = copier.await.unwrap();
        assert!(result.unwrap_err().to_string().contains("policy x"));
        let mut buf = [0u8; 4];
        assert_eq!(client.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(server.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }
}
