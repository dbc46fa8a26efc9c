//! Same node: the destination pod is enrolled on this agent too, so nothing
//! needs to leave the node or be encrypted. The agent authorizes the
//! connection as the destination's agent would, dials the app from inside the
//! destination pod with the client's IP, and then pairs its two sockets in
//! the kernel (agent-ebpf/src/splice.rs): each one's incoming bytes are sent
//! out of the other without entering userspace. Both apps keep plain TCP.
//!
//! With a keeper (keeper.rs) holding copies of the two sockets, a spliced
//! connection outlives the agent, and the next agent adopts it.
//!
//! The agent stays on the connection to pass half-closes on, in order: when
//! one app's FIN arrives, it waits until everything before it has left the
//! other socket, then shuts that socket's write side. Anything the kernel
//! handed to the agent instead (a splice that could not start) is copied as
//! usual.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};
use tracing::{debug, info, warn};

use super::{conn_labels, socket::APP_CONNECT_TIMEOUT, Ctx, PodCtx};
use crate::{
    bpf::{socket_cookie, SpliceMaps},
    keeper::Kept,
    metrics::{DenyLabels, StatusLabels},
    policy::{authorize, Decision, Source},
};

/// Removes the map entries however the connection ends.
struct Forget<'a>(&'a SpliceMaps, [u64; 2]);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(&self.1);
    }
}

pub async fn splice(
    app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &PodCtx,
    dst_pod: &PodCtx,
    maps: &SpliceMaps,
    ctx: &Ctx,
) -> Result<()> {
    let source = Source::authenticated(src.id.principal(), peer.ip());
    if let Decision::Deny { policy } = authorize(&ctx.state(), &dst_pod.workload, &source, dst.port()) {
        ctx.metrics.auth_denials.get_or_create(&DenyLabels { reporter: "destination", policy: policy.clone() }).inc();
        reset(&app);
        anyhow::bail!("denied by policy {policy}");
    }
    let upstream = match tokio::time::timeout(
        APP_CONNECT_TIMEOUT,
        dst_pod.netns.socket_marked(dst, Some(SocketAddr::new(peer.ip(), 0)), true, dst_pod.app_mark)?.connect(dst),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(refused(&app, ctx, e)).with_context(|| format!("splice: connecting to {dst}")),
        Err(_) => return Err(refused(&app, ctx, std::io::ErrorKind::TimedOut.into())).context("splice connect"),
    };
    let cookies = [socket_cookie(&app)?, socket_cookie(&upstream)?];
    // What each socket counts as sent before anyone wrote to it (the SYN,
    // for the one the agent dialled), so the drain check compares payload.
    let base = [queued(&app)?, queued(&upstream)?];
    let forget = Forget(maps, cookies);
    let kept = match maps.join(&app, &upstream, cookies) {
        // Segments that arrived before the join wait in the receive queues;
        // a peek makes the kernel run them through the verdict now, in order.
        Ok(()) => {
            kick(&app);
            kick(&upstream);
            debug!("spliced");
            keep(ctx, &app, &upstream, cookies, base, peer, dst)
        }
        // Typically an app that already half-closed (the kernel only takes
        // ESTABLISHED sockets): the agent copies this one itself.
        Err(e) => {
            debug!(error = format!("{e:#}"), "not spliced; copying");
            None
        }
    };
    carry(app, upstream, base, Some(src), Some(dst_pod), forget, kept, ctx).await
}

/// Takes over a spliced connection a previous agent left with the keeper.
pub async fn adopt(kept: Kept, ctx: Arc<Ctx>) -> Result<()> {
    let maps = ctx.splice.as_ref().context("adopting a spliced connection without eBPF splice maps")?;
    let [a, b]: [OwnedFd; 2] =
        kept.fds.try_into().map_err(|_| anyhow::anyhow!("keeper entry {} without two sockets", kept.id))?;
    let tcp = |fd: OwnedFd| -> Result<TcpStream> {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        Ok(TcpStream::from_std(std)?)
    };
    let (app, upstream) = (tcp(a)?, tcp(b)?);
    let cookies = [socket_cookie(&app)?, socket_cookie(&upstream)?];
    let pod = |key: &str| kept.meta[key].as_str().and_then(|ip| ip.parse().ok()).and_then(|ip| ctx.local_pod(ip));
    let (src, dst) = (pod("src_ip"), pod("dst_ip"));
    let base = [0, 1].map(|i| kept.meta["base"][i].as_u64().unwrap_or(i as u64));
    info!(id = %kept.id, "adopted a spliced connection from the keeper");
    carry(app, upstream, base, src.as_deref(), dst.as_deref(), Forget(maps, cookies), Some(kept.id), &ctx).await
}

/// Gives the keeper copies of the two sockets, so the connection survives
/// this agent; returns the id to release when it ends.
fn keep(
    ctx: &Ctx,
    app: &TcpStream,
    upstream: &TcpStream,
    cookies: [u64; 2],
    base: [u64; 2],
    peer: SocketAddr,
    dst: SocketAddr,
) -> Option<String> {
    let keeper = ctx.keeper.as_ref()?;
    let id = format!("{}-{}", cookies[0], cookies[1]);
    let meta = serde_json::json!({ "src_ip": peer.ip().to_string(), "dst_ip": dst.ip().to_string(), "base": base });
    match keeper.hold(&id, meta, [app.as_fd(), upstream.as_fd()]) {
        Ok(()) => Some(id),
        Err(e) => {
            warn!(error = format!("{e:#}"), "the keeper did not take the connection; it ends if this agent dies");
            None
        }
    }
}

/// Runs a spliced connection to its end: passes half-closes on, copies what
/// the kernel hands the agent, and records the connection in the metrics.
#[allow(clippy::too_many_arguments)] // the parts of one connection, each needed once
async fn carry(
    app: TcpStream,
    upstream: TcpStream,
    base: [u64; 2],
    src: Option<&PodCtx>,
    dst: Option<&PodCtx>,
    forget: Forget<'_>,
    kept: Option<String>,
    ctx: &Ctx,
) -> Result<()> {
    let labels = |reporter| {
        conn_labels(
            reporter,
            src.map(|p| &*p.workload),
            src.map(|p| p.id.principal()),
            dst.map(|p| &*p.workload),
            dst.map(|p| p.id.principal()),
            true,
        )
    };
    let (mut source_side, mut dest_side) =
        (ctx.metrics.connection(labels("source")), ctx.metrics.connection(labels("destination")));
    let (app_r, app_w) = app.into_split();
    let (up_r, up_w) = upstream.into_split();
    let (up, down) = tokio::join!(relay(app_r, up_w, base[1]), relay(up_r, app_w, base[0]));
    let (maps, cookies) = (forget.0, forget.1);
    let (c2s, s2c) = (
        up.as_ref().copied().unwrap_or(0) + maps.spliced(cookies[0]),
        down.as_ref().copied().unwrap_or(0) + maps.spliced(cookies[1]),
    );
    for guard in [&mut source_side, &mut dest_side] {
        guard.client_to_server = c2s;
        guard.server_to_client = s2c;
    }
    if let (Some(keeper), Some(id)) = (&ctx.keeper, kept) {
        if let Err(e) = keeper.release(&id) {
            warn!(error = format!("{e:#}"), id, "releasing a kept connection");
        }
    }
    debug!(sent = c2s, received = s2c, "spliced connection done");
    up?;
    down?;
    Ok(())
}

/// One direction: copies whatever the kernel hands the agent (normally
/// nothing), and at EOF passes the half-close on once `to` has queued every
/// byte `from` received. Returns the bytes the agent copied itself.
async fn relay(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, to_base: u64) -> Result<u64> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut copied = 0u64;
    loop {
        let n = from.read(&mut buf).await.context("splice: reading")?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.context("splice: writing")?;
        copied += n as u64;
    }
    drained(from.as_ref(), to.as_ref(), to_base).await?;
    to.shutdown().await.context("splice: passing on the half-close")?;
    Ok(copied)
}

/// Waits until `to` has queued (sent or still sending) as many bytes as
/// `from` received: the kernel's redirected segments are sent from a work
/// queue, so EOF on `from` can be seen before the last of them left `to`.
/// Gives up only when no progress is made for a while (the far app stopped
/// reading), and then shuts down anyway rather than holding the connection.
async fn drained(from: &TcpStream, to: &TcpStream, to_base: u64) -> Result<()> {
    const STALL: Duration = Duration::from_secs(3);
    let mut last = None;
    let mut since = tokio::time::Instant::now();
    loop {
        // Called after EOF: the peer's FIN took one sequence number, which
        // TCP_INFO counts as a received byte.
        let received = tcp_info(from)?.tcpi_bytes_received.saturating_sub(1);
        let queued = queued(to)?.saturating_sub(to_base);
        if queued >= received {
            return Ok(());
        }
        if last != Some(queued) {
            (last, since) = (Some(queued), tokio::time::Instant::now());
        } else if since.elapsed() > STALL {
            let err = to.take_error().ok().flatten().map(|e| e.to_string()).unwrap_or_default();
            warn!(received, queued, err, "splice: bytes still queued after 30 s without progress; closing anyway");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn tcp_info(s: &TcpStream) -> Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd, and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading TCP_INFO");
    }
    Ok(info)
}

/// Everything the socket has taken to send: acknowledged, plus still in its
/// send queue (SIOCOUTQ).
fn queued(s: &TcpStream) -> Result<u64> {
    Ok(tcp_info(s)?.tcpi_bytes_acked + outq(s)?)
}

/// Bytes in the send queue not yet acknowledged (SIOCOUTQ).
fn outq(s: &TcpStream) -> Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: a valid fd and an int out-parameter, as SIOCOUTQ expects.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading SIOCOUTQ");
    }
    Ok(n.max(0) as u64)
}

/// A non-consuming, non-blocking peek, so segments queued before the join
/// go through the verdict now rather than when the next one arrives.
fn kick(s: &TcpStream) {
    let mut byte = [0u8; 1];
    // SAFETY: a valid fd and a one-byte buffer.
    unsafe { libc::recv(s.as_raw_fd(), byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
}

fn refused(app: &TcpStream, ctx: &Ctx, e: std::io::Error) -> std::io::Error {
    ctx.metrics.hbone_errors.get_or_create(&StatusLabels { direction: "outbound", status: "503".into() }).inc();
    reset(app);
    e
}

/// Reset, not close: the app must see a failed connect, not an EOF it could
/// take for a complete (empty) response.
fn reset(app: &TcpStream) {
    let _ = socket2::SockRef::from(app).set_linger(Some(std::time::Duration::ZERO));
}
