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
//!
//! With a keeper (keeper.rs) holding copies of the agent's two sockets, a
//! spliced connection outlives the agent, and the next agent adopts it.
//!
//! A connection to a service VIP whose picked endpoint is local comes here
//! too, with the endpoint as `dst`: sock_ops counted its app socket because
//! the VIP is in SPLICE_SERVICES.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use agent_common::SockKey;
use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};
use tracing::{debug, info, warn};

use super::{
    conn_labels,
    registry::{self, Kind},
    socket::{abort, APP_CONNECT_TIMEOUT},
    Ctx, PodCtx, Security,
};
use crate::{
    bpf::{sock_key, SpliceMaps},
    keeper::Kept,
    metrics::{DenyLabels, StatusLabels},
    netns::socket_netns_cookie,
    policy::{authorize_conn, Conn, Decision, Source},
    state::Service,
};

/// The four sockets of one spliced connection, by their map keys.
#[derive(Clone, Copy)]
struct Keys {
    /// The source app's socket and the agent's accepted end of it.
    src_app: SockKey,
    src_agent: SockKey,
    /// The destination app's accepted socket and the agent's dialled end.
    dst_app: SockKey,
    dst_agent: SockKey,
}

impl Keys {
    /// The keys of a connection the agent holds as `app` (accepted) and
    /// `upstream` (dialled), read from the sockets themselves.
    fn of(app: &TcpStream, upstream: &TcpStream) -> Result<Keys> {
        let agent_end = |s: &TcpStream| -> Result<SockKey> {
            Ok(sock_key(socket_netns_cookie(s)?, s.local_addr()?, s.peer_addr()?))
        };
        let (src_agent, dst_agent) = (agent_end(app)?, agent_end(upstream)?);
        Ok(Keys { src_app: src_agent.peer(), src_agent, dst_app: dst_agent.peer(), dst_agent })
    }

    fn all(&self) -> [SockKey; 4] {
        [self.src_app, self.src_agent, self.dst_app, self.dst_agent]
    }
}

/// Removes the map entries however the connection ends.
struct Forget<'a>(&'a SpliceMaps, Keys);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(&self.1.all());
    }
}

/// `dst` is the destination app's address (a pod address, or the service
/// endpoint picked, with its target port); `service` the service the app
/// dialled, if it did.
#[allow(clippy::too_many_arguments)]
pub async fn splice(
    app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &PodCtx,
    dst_pod: &PodCtx,
    maps: &SpliceMaps,
    ctx: &Ctx,
    service: Option<&Service>,
) -> Result<()> {
    let source = Source::authenticated(src.id.principal(), peer.ip());
    let state = ctx.state();
    let dst_workload = dst_pod.current(&state);
    if let Decision::Deny { policy } = authorize_conn(&state, &Conn { src: &source, dst: &dst_workload, dst_addr: dst })
    {
        ctx.metrics.auth_denials.get_or_create(&DenyLabels { reporter: "destination", policy: policy.clone() }).inc();
        reset(&app);
        anyhow::bail!("denied by policy {policy}");
    }
    // The port is bound now, so the app's end can be registered before the
    // SYN: sock_ops then puts it in SOCK_PAIRS when the app accepts it, and
    // sk_msg counts it from its first byte.
    let socket = dst_pod.netns.socket_with_port(dst, SocketAddr::new(peer.ip(), 0), dst_pod.app_mark)?;
    let from = socket.local_addr().context("reading the splice socket's bound address")?;
    let dst_app = sock_key(dst_pod.netns_cookie, dst, from);
    maps.expect_app(dst_app)?;
    let upstream = match tokio::time::timeout(APP_CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            maps.forget(&[dst_app]);
            return Err(refused(&app, ctx, e)).with_context(|| format!("splice: connecting to {dst}"));
        }
        Err(_) => {
            maps.forget(&[dst_app]);
            return Err(refused(&app, ctx, std::io::ErrorKind::TimedOut.into())).context("splice connect");
        }
    };
    let keys = Keys::of(&app, &upstream)?;
    let forget = Forget(maps, keys);
    arm(maps, &keys, &app, &upstream, [0, 0]);
    let kept = keep(ctx, &app, &upstream, peer, dst, service);
    carry(app, upstream, Some(src), Some(dst_pod), service, forget, kept, ctx).await
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
    let keys = Keys::of(&app, &upstream)?;
    // The old agent's counts stay valid: carry on from them.
    let written = [maps.written_so_far(&keys.src_agent), maps.written_so_far(&keys.dst_agent)];
    arm(maps, &keys, &app, &upstream, written);
    let pod = |key: &str| kept.meta[key].as_str().and_then(|ip| ip.parse().ok()).and_then(|ip| ctx.local_pod(ip));
    let (src, dst) = (pod("src_ip"), pod("dst_ip"));
    let state = ctx.state();
    let service = kept
        .meta
        .get("service")
        .and_then(|s| s.as_str())
        .and_then(|key| state.services().find(|svc| format!("{}/{}", svc.namespace, svc.hostname) == key).cloned());
    info!(id = %kept.id, "adopted a spliced connection from the keeper");
    let (src, dst, service) = (src.as_deref(), dst.as_deref(), service.as_deref());
    carry(app, upstream, src, dst, service, Forget(maps, keys), Some(kept.id), &ctx).await
}

/// Puts the agent's two sockets in SOCK_PAIRS and routes each app end into
/// the agent socket facing the other app. Whatever cannot be armed is not
/// spliced, and the agent copies it: an app end sock_ops is not counting
/// (not captured by eBPF), or a socket the kernel refuses because the app
/// already half-closed (SOCKHASH takes only ESTABLISHED sockets; an adopted
/// socket in that state is still in the map from before).
fn arm(maps: &SpliceMaps, k: &Keys, app: &TcpStream, upstream: &TcpStream, written: [u64; 2]) {
    let armed = (|| -> Result<()> {
        maps.add_agent_socket(k.src_agent, app, written[0])?;
        maps.add_agent_socket(k.dst_agent, upstream, written[1])?;
        for (sender, via) in [(k.src_app, k.dst_agent), (k.dst_app, k.src_agent)] {
            if maps.counted(&sender) {
                maps.route(sender, via)?;
            }
        }
        Ok(())
    })();
    match armed {
        Ok(()) => debug!("splice armed"),
        Err(e) => debug!(error = format!("{e:#}"), "not spliced; the agent copies"),
    }
}

/// Gives the keeper copies of the two sockets, so the connection survives
/// this agent; returns the id to release when it ends.
fn keep(
    ctx: &Ctx,
    app: &TcpStream,
    upstream: &TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    service: Option<&Service>,
) -> Option<String> {
    let keeper = ctx.keeper.as_ref()?;
    let id = format!("{peer}->{dst}:{}", upstream.local_addr().map(|a| a.port()).unwrap_or_default());
    let mut meta = serde_json::json!({ "src_ip": peer.ip().to_string(), "dst_ip": dst.ip().to_string() });
    if let Some(svc) = service {
        meta["service"] = format!("{}/{}", svc.namespace, svc.hostname).into();
    }
    match keeper.hold(&id, meta, [app.as_fd(), upstream.as_fd()]) {
        Ok(()) => Some(id),
        Err(e) => {
            warn!(error = format!("{e:#}"), "the keeper did not take the connection; it ends if this agent dies");
            None
        }
    }
}

/// Runs a spliced connection to its end: copies what the kernel has not
/// taken over yet, passes half-closes on, and records the connection in the
/// metrics with the bytes the kernel moved. Registered (registry.rs) while
/// it runs, so a policy that now denies it resets both apps.
#[allow(clippy::too_many_arguments)]
async fn carry(
    app: TcpStream,
    upstream: TcpStream,
    src: Option<&PodCtx>,
    dst: Option<&PodCtx>,
    service: Option<&Service>,
    forget: Forget<'_>,
    kept: Option<String>,
    ctx: &Ctx,
) -> Result<()> {
    let state = ctx.state();
    let (src_w, dst_w) = (src.map(|p| p.current(&state)), dst.map(|p| p.current(&state)));
    let labels = |reporter| {
        conn_labels(
            reporter,
            src_w.as_deref(),
            src.map(|p| &p.id),
            dst_w.as_deref(),
            dst.map(|p| &p.id),
            service,
            Security::MutualTls,
        )
    };
    let (mut source_side, mut dest_side) =
        (ctx.metrics.connection(labels("source")), ctx.metrics.connection(labels("destination")));
    let mut registered = match (src, dst, app.peer_addr(), upstream.peer_addr()) {
        (Some(src), Some(dst), Ok(client), Ok(target)) => Some(registry::register(
            Kind::Spliced,
            Source::authenticated(src.id.principal(), client.ip()),
            &dst.workload.uid,
            target,
        )),
        _ => None,
    };
    let _kept = kept.as_ref().map(|_| KeptGuard::new(&ctx.kept));
    let (maps, k) = (forget.0, forget.1);
    let (app_fd, up_fd) = (app.as_raw_fd(), upstream.as_raw_fd());
    let (app_r, app_w) = app.into_split();
    let (up_r, up_w) = upstream.into_split();
    let both = async { tokio::join!(copy(app_r, up_w, maps, k.dst_agent), copy(up_r, app_w, maps, k.src_agent)) };
    tokio::pin!(both);
    let denied = async {
        match &mut registered {
            Some(r) => r.closed().await,
            None => std::future::pending().await,
        }
    };
    let (up, down) = tokio::select! {
        done = &mut both => done,
        policy = denied => {
            // Both sockets are still open (inside `both`): reset the two
            // apps. Works whoever else holds the sockets (the keeper).
            abort(app_fd);
            abort(up_fd);
            (Err(anyhow::anyhow!("closed: policy {policy} now denies this connection")), Ok(()))
        }
    };
    let c2s = maps.written_so_far(&k.dst_agent) + maps.spliced(&k.src_app);
    let s2c = maps.written_so_far(&k.src_agent) + maps.spliced(&k.dst_app);
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

/// Counts a connection the keeper holds for as long as this agent carries it.
struct KeptGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> KeptGuard<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        KeptGuard(n)
    }
}

impl Drop for KeptGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies one direction until EOF, then half-closes the other side.
/// Publishes the running total after every write, for the kernel's switch.
async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, maps: &SpliceMaps, to_key: SockKey) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = maps.written_so_far(&to_key);
    loop {
        let n = from.read(&mut buf).await.context("splice: reading")?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.context("splice: writing")?;
        total += n as u64;
        maps.written(to_key, total)?;
    }
    // The kernel's pushes went into `to` synchronously, before the app's
    // FIN was even sent, so the FIN queued now comes after every byte.
    to.shutdown().await.context("splice: passing on the half-close")
}

fn refused(app: &TcpStream, ctx: &Ctx, e: std::io::Error) -> std::io::Error {
    ctx.metrics.hbone_errors.get_or_create(&StatusLabels { direction: "outbound", status: "503".into() }).inc();
    reset(app);
    e
}

/// Reset, not close: the app must see a failed connect, not an EOF it could
/// take for a complete (empty) response.
fn reset(app: &TcpStream) {
    super::reset(app);
}
