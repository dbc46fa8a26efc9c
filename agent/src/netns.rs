//! Opening sockets inside a pod's network namespace.
//!
//! A socket belongs to the netns it was created in, for its whole life, no
//! matter which thread later uses it. So the agent stays in the node's netns
//! and only *creates* pod sockets from inside the pod: the calling thread
//! `setns`es into the pod, creates the socket, and `setns`es back before doing
//! anything else. Two syscalls, no helper thread per connection. Network
//! namespaces (unlike mount or user namespaces) may be switched per thread in
//! a multi-threaded process.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use agent_common::AGENT_MARK;
use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// An open handle on a pod's netns. Holding the fd keeps the netns alive and
/// pins it, even if the path is later unmounted.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

/// The agent's own netns, opened once, to return to after each `enter`.
fn home() -> io::Result<&'static File> {
    static HOME: OnceLock<File> = OnceLock::new();
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    let f = File::open("/proc/self/ns/net")?;
    Ok(HOME.get_or_init(|| f))
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self> {
        home().context("opening the agent's own netns /proc/self/ns/net")?;
        let file = File::open(path).with_context(|| format!("opening pod netns {}", path.display()))?;
        Ok(Netns { path: path.to_owned(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the same netns (a dup of the fd).
    pub fn clone_handle(&self) -> Result<Netns> {
        Ok(Netns { path: self.path.clone(), file: self.file.try_clone().context("duplicating a netns fd")? })
    }

    /// The kernel's cookie for this netns (SO_NETNS_COOKIE, 5.14+): the key
    /// the eBPF programs use to tell pods apart.
    pub fn cookie(&self) -> Result<u64> {
        self.run(|| socket_netns_cookie(&Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)?))
            .context("reading the netns cookie (SO_NETNS_COOKIE needs Linux 5.14)")
    }

    /// Runs `f` with the current thread inside this netns. `f` must only
    /// create sockets (or run netlink) and must not await or block.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> Result<T> {
        let home = home().context("opening the agent's own netns")?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering netns {}", self.path.display()))?;
        let result = f();
        // If we cannot get back, this thread would silently serve the wrong
        // pod: there is no safe way to go on.
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("sluice: fatal: cannot return to the node netns after {}: {e}", self.path.display());
            std::process::abort();
        }
        result.with_context(|| format!("in netns {}", self.path.display()))
    }

    /// A command that runs `program` inside this netns (for `iptables-restore`,
    /// `ip rule`, ...). The child `setns`es between fork and exec, so the
    /// agent's own threads never move; this is safe where `run` would not be,
    /// since a child process must not inherit a half-switched thread. The
    /// netns fd is duplicated now and owned by the command, so it stays valid
    /// even if this `Netns` is dropped before `spawn`.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        // A failed dup surfaces as the spawn error rather than a panic here.
        let fd = self.file.as_fd().try_clone_to_owned().map_err(|e| e.raw_os_error().unwrap_or(libc::EBADF));
        // SAFETY: between fork and exec only async-signal-safe calls are
        // allowed; setns is a plain syscall and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let fd = fd.as_ref().map_err(|&e| io::Error::from_raw_os_error(e))?;
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A TCP listener in this netns, marked so capture leaves it alone, with
    /// SO_REUSEPORT so a new agent can bind beside the old one during an
    /// upgrade and take over without refusing connections.
    pub fn listen(&self, addr: SocketAddr, transparent: bool) -> Result<std::net::TcpListener> {
        self.run(|| {
            let s = agent_socket(addr)?;
            // Port 0 is a listener reached only through bpf_sk_assign, which
            // before Linux 6.5 refuses SO_REUSEPORT sockets (ESOCKTNOSUPPORT);
            // it needs no port of its own to share during an upgrade either.
            s.set_reuse_port(addr.port() != 0)?;
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                // The v4 listener is a separate socket on the same port.
                s.set_only_v6(true)?;
            }
            if transparent {
                set_transparent(&s, addr)?;
            }
            s.bind(&addr.into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .with_context(|| format!("listening on {addr}"))
    }

    /// An unconnected TCP socket in this netns, marked 0x539. With
    /// `bind_to`, the socket is bound first; `transparent` lets that address
    /// be a foreign one (the client's IP, so the app sees its real peer).
    pub fn socket(
        &self,
        peer: SocketAddr,
        bind_to: Option<SocketAddr>,
        transparent: bool,
    ) -> Result<tokio::net::TcpSocket> {
        self.socket_marked(peer, bind_to, transparent, AGENT_MARK)
    }

    /// [`Netns::socket`] with another mark, for connections whose return
    /// path is steered by mark (see `redirect::Redirect::app_mark`).
    pub fn socket_marked(
        &self,
        peer: SocketAddr,
        bind_to: Option<SocketAddr>,
        transparent: bool,
        mark: u32,
    ) -> Result<tokio::net::TcpSocket> {
        self.make_socket(peer, bind_to, transparent, mark, true)
    }

    /// [`Netns::socket_marked`] bound to `local` with its port chosen now,
    /// so the caller knows the full 4-tuple before connect() (the splice
    /// registers the app's end of the connection before dialling it).
    pub fn socket_with_port(&self, peer: SocketAddr, local: SocketAddr, mark: u32) -> Result<tokio::net::TcpSocket> {
        self.make_socket(peer, Some(local), true, mark, false)
    }

    fn make_socket(
        &self,
        peer: SocketAddr,
        bind_to: Option<SocketAddr>,
        transparent: bool,
        mark: u32,
        defer_port: bool,
    ) -> Result<tokio::net::TcpSocket> {
        let s = self.run(|| {
            let s = agent_socket(peer)?;
            if mark != AGENT_MARK {
                s.set_mark(mark)?;
            }
            if let Some(local) = bind_to {
                if transparent {
                    set_transparent(&s, local)?;
                }
                if local.port() == 0 && defer_port {
                    // Pick the port at connect(), from the full 4-tuple, not at
                    // bind() from the address alone: under tens of thousands of
                    // TIME_WAIT sockets a bind-time search is what collapses
                    // the connection rate.
                    set_bind_address_no_port(&s)?;
                }
                s.bind(&SockAddr::from(local))?;
            }
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
        Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
    }
}

/// The cookie of the netns a socket lives in (SO_NETNS_COOKIE, 5.14+).
pub fn socket_netns_cookie(s: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP socket of `addr`'s family carrying the agent mark.
pub fn agent_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_mark(AGENT_MARK)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

fn set_bind_address_no_port(s: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_transparent(s: &Socket, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => s.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => s.set_ip_transparent_v6(true),
    }
}

/// The destination the app asked for before capture rewrote it: iptables
/// REDIRECT records it in conntrack, and the eBPF getsockopt hook answers the
/// same calls, so the accept path is one code in both modes.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let answer = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    // No guess from the port when this fails: connections tc assigned
    // (bpf_sk_assign) never ask; their listener knows (proxy::Arrival).
    answer?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "SO_ORIGINAL_DST returned a non-IP address"))
}
