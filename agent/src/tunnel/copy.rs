//! Byte copy between a TCP socket and an HTTP/2 CONNECT stream, both ways at
//! once, honouring half-close: TCP EOF becomes END_STREAM, END_STREAM becomes
//! `shutdown(SHUT_WR)`. A reset on either side becomes a reset on the other
//! (RST_STREAM CANCEL towards HTTP/2; SO_LINGER 0 + close towards TCP).
//!
//! Every socket handed here already has TCP_NODELAY: the agent creates its
//! sockets with it (`netns::agent_socket`) and accepted sockets inherit it
//! from their listener (checked by a test below), so a 1-byte write leaves
//! at once. h2 flushes after each batch of frames it writes, so one read
//! from TCP becomes one TLS write without waiting for more.
//!
//! Buffers: reads go into one `BytesMut` and leave as frozen slices of it,
//! which h2 holds until they are written into TLS. A new allocation is made
//! only when less than [`MIN_READ`] is left; once h2 has dropped every slice
//! of the old one, `reserve` takes that same allocation back, so a steady
//! stream (or a chatty request/response) reuses its buffer instead of
//! allocating per read.

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Read size from TCP. One read fills at most one DATA frame.
const READ_CHUNK: usize = 256 * 1024;
/// Below this much room left in the buffer, a fresh (or reclaimed) one of
/// [`READ_CHUNK`] is taken, so reads stay large.
const MIN_READ: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct CopyResult {
    /// Bytes read from TCP and sent into the stream.
    pub tcp_to_stream: u64,
    /// Bytes received from the stream and written to TCP.
    pub stream_to_tcp: u64,
}

/// Copies until both directions have finished. Returns the byte counts even
/// on error, so telemetry counts what did move.
pub async fn copy_bidirectional(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
) -> (CopyResult, io::Result<()>) {
    copy_bidirectional_until(tcp, send, recv, std::future::pending()).await
}

/// [`copy_bidirectional`], cut short when `stop` resolves (a new policy
/// denies the connection): both sides are then reset as on an error, the
/// TCP side with a RST and the stream with RST_STREAM CANCEL (h2 sends it
/// when the stream's last handle is dropped while it is open), and the
/// result is a `ConnectionReset` error.
pub async fn copy_bidirectional_until(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    stop: impl std::future::Future<Output = ()>,
) -> (CopyResult, io::Result<()>) {
    keep_freed_buffers();
    let (mut rd, mut wr) = tcp.into_split();
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    let outcome = {
        let up = tcp_to_stream(&mut rd, send, &mut up_bytes);
        let down = stream_to_tcp(recv, &mut wr, &mut down_bytes);
        tokio::pin!(up, down, stop);
        let (mut up_done, mut down_done) = (false, false);
        // One direction ending cleanly is a half-close: keep the other going.
        // One direction failing ends both, or the other could wait forever.
        loop {
            tokio::select! {
                r = &mut up, if !up_done => { up_done = true; if let Err(e) = r { break Err(e) } }
                r = &mut down, if !down_done => { down_done = true; if let Err(e) = r { break Err(e) } }
                () = &mut stop => break Err(io::Error::new(io::ErrorKind::ConnectionReset, "closed by the agent")),
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    if outcome.is_err() {
        // Pass the failure on as a reset, not as a clean close: the app must
        // not mistake a broken tunnel for a complete response.
        if let Ok(tcp) = rd.reunite(wr) {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    (CopyResult { tcp_to_stream: up_bytes, stream_to_tcp: down_bytes }, outcome)
}

async fn tcp_to_stream(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    mut send: SendStream<Bytes>,
    n: &mut u64,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if buf.capacity() < MIN_READ {
            // Reclaims the whole allocation in place when no slice of it is
            // still held by h2; allocates READ_CHUNK otherwise.
            buf.reserve(READ_CHUNK);
        }
        let read = match rd.read_buf(&mut buf).await {
            Ok(read) => read,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if read == 0 {
            return send.send_data(Bytes::new(), true).map_err(h2_io);
        }
        let mut chunk = buf.split().freeze();
        // Respect the peer's window: send only what it granted.
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by peer")),
            };
            let part = chunk.split_to(granted.min(chunk.len()));
            *n += part.len() as u64;
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

async fn stream_to_tcp(mut recv: RecvStream, wr: &mut tokio::net::tcp::OwnedWriteHalf, n: &mut u64) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        let len = data.len();
        wr.write_all(&data).await?;
        *n += len as u64;
        // Hand the window back only once the bytes are in the socket, so a
        // slow app pushes back on the sender instead of growing our memory.
        let _ = recv.flow_control().release_capacity(len);
    }
    wr.shutdown().await
}

pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() { io::ErrorKind::ConnectionReset } else { io::ErrorKind::Other };
    io::Error::new(kind, e)
}

/// What glibc's malloc may keep of freed memory: below this size a buffer
/// comes from (and goes back to) the heap instead of its own mmap, and up to
/// this much free memory stays at the top of each heap instead of being
/// trimmed. With the defaults (128 KiB each, the mmap one creeping up as
/// large buffers are freed) every buffer on this path, ours and the frame
/// and record buffers h2 and rustls allocate, went back to the kernel when
/// freed and was faulted in again on the next use: ~100k page faults/s at a
/// few Gbit/s, ~10% of the agent's CPU.
const MALLOC_KEEP: usize = 4 * 1024 * 1024;

/// Tunes glibc's malloc for the byte path, once per process. The agent calls
/// it at startup; the byte path calls it too (a cheap `Once` check) so that
/// library users such as the tests get the same behaviour.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let keep = MALLOC_KEEP as libc::c_int;
            // SAFETY: mallopt only sets allocator parameters; both are
            // valid options with valid values. It returns 0 on failure,
            // which leaves glibc's defaults: slower, not wrong.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, keep);
                libc::mallopt(libc::M_TRIM_THRESHOLD, keep);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use socket2::{Domain, Protocol, Socket, Type};

    /// The agent sets TCP_NODELAY on its listeners only; Linux copies it to
    /// each accepted socket, which is what the 1-byte latency relies on.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener.set_tcp_nodelay(true).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        listener.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        client.connect(&addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.tcp_nodelay().unwrap(), "accepted socket lost TCP_NODELAY");
        assert!(!client.tcp_nodelay().unwrap(), "control: a plain socket has Nagle on");
    }

    /// Buffers freed on the byte path stay with the process: taking the same
    /// amount again does not fault pages in again. (With glibc's defaults
    /// the 2 MiB freed here is trimmed back to the kernel every time.)
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_buffers_are_not_faulted_in_again() {
        super::keep_freed_buffers();
        let minor_faults = || {
            // SAFETY: getrusage fills the struct it is given.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
            u.ru_minflt
        };
        let cycle = || {
            let bufs: Vec<bytes::BytesMut> = (0..8)
                .map(|_| {
                    let mut b = bytes::BytesMut::with_capacity(super::READ_CHUNK);
                    b.resize(super::READ_CHUNK, 1);
                    b
                })
                .collect();
            std::hint::black_box(&bufs);
        };
        cycle();
        let before = minor_faults();
        for _ in 0..20 {
            cycle();
        }
        let faults = minor_faults() - before;
        // 20 cycles of 2 MiB would be 10240 faults if it all went back.
        assert!(faults < 100, "{faults} page faults re-taking freed buffers");
    }

    /// `reserve` after every slice was dropped reuses the allocation.
    #[test]
    fn read_buffer_is_reclaimed_once_its_slices_are_gone() {
        let mut buf = bytes::BytesMut::with_capacity(super::READ_CHUNK);
        let first = buf.as_ptr();
        buf.extend_from_slice(&[7u8; 1000]);
        let chunk = buf.split().freeze();
        buf.reserve(super::READ_CHUNK);
        assert_ne!(buf.as_ptr(), first, "the slice is still held: a new buffer is needed");
        drop(chunk);
        let second = buf.as_ptr();
        buf.extend_from_slice(&[1u8; 10]);
        drop(buf.split());
        buf.reserve(super::READ_CHUNK);
        assert_eq!(buf.as_ptr(), second, "no slice left: the allocation is taken back");
    }
}
