//! Same node: the destination pod is enrolled on this agent too, so nothing
//! needs to leave the node or be encrypted. The agent authorizes the
//! connection as the destination's agent would, dials the app from inside the
//! destination pod with the client's IP, and then lets the kernel take over:
//! sk_msg pushes each app's bytes straight into the agent's socket facing the
//! other app (agent-ebpf/src/sk_msg.rs), so they never reach userspace.
//!
//! Until the kernel has taken a direction over, the agent copies it, and
//! publishes after every write how much it has written; that count is what
//! lets the kernel switch without losing or reordering a byte. After the
//! switch the copy only waits for EOF, which it passes on as a half-close,
//! so each side still learns when the other is done.

use std::net::SocketAddr;

use agent_common::SockKey;
use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};
use tracing::debug;

use super::{conn_labels, socket::APP_CONNECT_TIMEOUT, Ctx, PodCtx};
use crate::{
    bpf::{sock_key, SpliceMaps},
    metrics::{DenyLabels, StatusLabels},
    policy::{authorize, Decision, Source},
};

/// The four sockets of one spliced connection, by their map keys.
struct Keys {
    /// The source app's socket and the agent's accepted end of it.
    src_app: SockKey,
    src_agent: SockKey,
    /// The destination app's accepted socket and the agent's dialled end.
    dst_app: SockKey,
    dst_agent: SockKey,
}

/// Removes the map entries however the connection ends.
struct Forget<'a>(&'a SpliceMaps, [SockKey; 4]);

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
    let local = app.local_addr()?;
    let socket = dst_pod.netns.socket_with_port(dst, SocketAddr::new(peer.ip(), 0), dst_pod.app_mark)?;
    let dialled_from = socket.local_addr().context("reading the splice socket's bound address")?;
    let keys = Keys {
        src_app: sock_key(src.netns_cookie, peer, local),
        src_agent: sock_key(src.netns_cookie, local, peer),
        dst_app: sock_key(dst_pod.netns_cookie, dst, dialled_from),
        dst_agent: sock_key(dst_pod.netns_cookie, dialled_from, dst),
    };
    let _forget = Forget(maps, [keys.src_app, keys.src_agent, keys.dst_app, keys.dst_agent]);
    // Before dialling, so sock_ops adds the app's accepted socket to
    // SOCK_PAIRS and sk_msg counts it from its first byte.
    maps.expect_app(keys.dst_app)?;
    let upstream = match tokio::time::timeout(APP_CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(refused(&app, ctx, e)).with_context(|| format!("splice: connecting to {dst}")),
        Err(_) => return Err(refused(&app, ctx, std::io::ErrorKind::TimedOut.into())).context("splice connect"),
    };
    maps.add_agent_socket(keys.src_agent, &app)?;
    maps.add_agent_socket(keys.dst_agent, &upstream)?;
    maps.route(keys.src_app, keys.dst_agent)?;
    maps.route(keys.dst_app, keys.src_agent)?;
    debug!(from = %dialled_from, "splice armed");

    let labels = |reporter| {
        conn_labels(
            reporter,
            Some(&src.workload),
            Some(src.id.principal()),
            Some(&dst_pod.workload),
            Some(dst_pod.id.principal()),
            true,
        )
    };
    let (mut source_side, mut dest_side) =
        (ctx.metrics.connection(labels("source")), ctx.metrics.connection(labels("destination")));
    let (app_r, app_w) = app.into_split();
    let (up_r, up_w) = upstream.into_split();
    let (up, down) =
        tokio::join!(copy(app_r, up_w, maps, keys.dst_agent), copy(up_r, app_w, maps, keys.src_agent));
    let spliced = |k: &SockKey| maps.count(k).map(|c| c.spliced).unwrap_or(0);
    let (c2s, s2c) = (
        up.as_ref().copied().unwrap_or(0) + spliced(&keys.src_app),
        down.as_ref().copied().unwrap_or(0) + spliced(&keys.dst_app),
    );
    for guard in [&mut source_side, &mut dest_side] {
        guard.client_to_server = c2s;
        guard.server_to_client = s2c;
    }
    debug!(sent = c2s, received = s2c, "spliced connection done");
    up?;
    down?;
    Ok(())
}

/// Copies one direction until EOF, then half-closes the other side.
/// Publishes the running total after every write, for the kernel's switch.
async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, maps: &SpliceMaps, to_key: SockKey) -> Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await.context("splice: reading")?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.context("splice: writing")?;
        total += n as u64;
        maps.written(to_key, total)?;
    }
    to.shutdown().await.context("splice: passing on the half-close")?;
    Ok(total)
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
