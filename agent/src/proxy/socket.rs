//! Sockets the proxies open inside a pod's netns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};

use crate::netns::Netns;

/// Listeners on `port` for each address family the pod has (a v4-only pod
/// has no IPv6 to listen on, and binding [::] there would fail).
pub fn listen_both(netns: &Netns, port: u16, ips: &[IpAddr]) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        let l = netns.listen(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), false)?;
        out.push(TcpListener::from_std(l)?);
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        let l = netns.listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), false)?;
        out.push(TcpListener::from_std(l)?);
    }
    Ok(out)
}

pub(super) const APP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the app at `target` from inside the pod, with the client's
/// IP as source (IP_TRANSPARENT), so the app sees its real peer. The reply
/// finds its way back through the connmark + ip rule the capture installs.
pub async fn connect_app(netns: &Netns, client: IpAddr, target: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let socket = netns
        .socket_marked(target, Some(SocketAddr::new(client, 0)), true, mark)
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    // A SYN nobody answers must become a 503 in seconds, not a two-minute
    // wait the client cannot tell from a hang.
    match tokio::time::timeout(APP_CONNECT_TIMEOUT, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to the app at {target}"))),
    }
}

/// Resets a connected TCP socket now, whoever else holds it (the keeper
/// keeps copies of spliced sockets, so closing ours would not end it):
/// `connect(AF_UNSPEC)` is `tcp_disconnect`, which sends the peer a RST and
/// wakes our own readers and writers with ECONNRESET.
pub(super) fn abort(fd: std::os::fd::RawFd) {
    // SAFETY: a zeroed sockaddr with only the family set, and its length;
    // `fd` is a socket the caller keeps open for this call.
    let rc = unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(fd, &sa, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "resetting a socket (connect AF_UNSPEC)");
    }
}
