//! `sluice keeper`: holds duplicates of the agent's spliced sockets so that
//! spliced connections outlive the agent process.
//!
//! A spliced connection runs in the kernel, but the two sockets it runs
//! through belong to the agent: if the agent is killed, the kernel closes
//! them and both apps see the connection end. The keeper is a separate,
//! tiny process (a second container in the DaemonSet pod, sharing
//! /var/run/sluice) that keeps a copy of each pair open. A new agent asks it
//! for them and takes the connections over: the bytes never stopped, and the
//! new agent passes each app's half-close on, as the old one would have.
//!
//! Wire: SOCK_SEQPACKET on a unix socket, one JSON [`Msg`] per packet, with
//! the sockets of a `hold` (and of each `flow` reply) as SCM_RIGHTS.
//!
//! Those are live plaintext sockets of pods' connections, so the socket is
//! mode 0600 and each peer is checked with SO_PEERCRED: only root and the
//! keeper's own user are served.

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use nix::{
    cmsg_space,
    sys::socket::{
        accept, bind, connect, getsockopt, listen, recvmsg, sendmsg, socket, sockopt, AddressFamily, Backlog,
        ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    },
    unistd::geteuid,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// Sockets per held connection: the agent's two ends of one splice.
const FDS: usize = 2;
const MAX_MSG: usize = 4096;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Msg {
    /// `hold`, `release`, `list`; replies `flow` and `end`.
    op: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    id: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    meta: serde_json::Value,
}

/// A connection the keeper hands back: its id, what the agent stored with
/// it, and the two sockets.
pub struct Kept {
    pub id: String,
    pub meta: serde_json::Value,
    pub fds: Vec<OwnedFd>,
}

/// The keeper process: serves `path` until killed.
pub fn serve(path: &Path) -> Result<()> {
    let listener = listen_private(path)?;
    info!(socket = %path.display(), mode = "0600", "keeper ready");
    println!("READY");
    accept_loop(&listener);
}

/// The keeper's socket, which only its owner can reach: the file is set to
/// mode 0600 after bind and before listen, so whatever the umask, no
/// connection is ever accepted while it is more open than that (a connect
/// before listen is refused).
fn listen_private(path: &Path) -> Result<OwnedFd> {
    // A socket file left by a keeper that died would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = seqpacket().context("creating the keeper socket")?;
    let addr = UnixAddr::new(path).with_context(|| format!("keeper socket path {}", path.display()))?;
    bind(listener.as_raw_fd(), &addr).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private (0600)", path.display()))?;
    listen(&listener, Backlog::new(16)?).context("listening on the keeper socket")?;
    Ok(listener)
}

/// Only root and the keeper's own user may talk to it: it hands out live
/// sockets of other pods' connections.
fn peer_allowed(uid: u32) -> bool {
    uid == 0 || uid == geteuid().as_raw()
}

fn accept_loop(listener: &OwnedFd) -> ! {
    let held: Arc<Mutex<BTreeMap<String, Kept>>> = Arc::default();
    loop {
        let conn = match accept(listener.as_raw_fd()) {
            // SAFETY: accept returned a new fd that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(e) => {
                // EMFILE and the like do not clear at once: do not spin.
                warn!(error = %e, "keeper accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        match getsockopt(&conn, sockopt::PeerCredentials) {
            Ok(cred) if peer_allowed(cred.uid()) => {}
            Ok(cred) => {
                warn!(uid = cred.uid(), pid = cred.pid(), "keeper: refused a peer that is neither root nor our user");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "keeper: cannot read the peer's credentials; refused");
                continue;
            }
        }
        let held = held.clone();
        std::thread::spawn(move || {
            if let Err(e) = session(&conn, &held) {
                debug!(error = format!("{e:#}"), "keeper session ended");
            }
        });
    }
}

fn session(conn: &OwnedFd, held: &Mutex<BTreeMap<String, Kept>>) -> Result<()> {
    while let Some((msg, fds)) = recv(conn)? {
        let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
        match msg.op.as_str() {
            "hold" if fds.len() == FDS => {
                debug!(id = %msg.id, "holding");
                held.insert(msg.id.clone(), Kept { id: msg.id, meta: msg.meta, fds });
            }
            "hold" => warn!(id = %msg.id, fds = fds.len(), "hold without its two sockets; ignored"),
            "release" => {
                held.remove(&msg.id);
            }
            "list" => {
                for k in held.values() {
                    let fds: Vec<RawFd> = k.fds.iter().map(AsRawFd::as_raw_fd).collect();
                    let reply = Msg { op: "flow".into(), id: k.id.clone(), meta: k.meta.clone() };
                    send(conn, &reply, &fds)?;
                }
                send(conn, &Msg { op: "end".into(), ..Default::default() }, &[])?;
            }
            other => warn!(op = other, "unknown keeper request; ignored"),
        }
    }
    Ok(())
}

/// The agent's connection to the keeper. Connected on first use and again
/// after any error, so the keeper may start after the agent or restart.
pub struct Keeper {
    path: PathBuf,
    conn: Mutex<Option<OwnedFd>>,
}

impl Keeper {
    pub fn new(path: &Path) -> Keeper {
        Keeper { path: path.to_owned(), conn: Mutex::new(None) }
    }

    /// Hands the keeper copies of one spliced connection's two sockets.
    pub fn hold(&self, id: &str, meta: serde_json::Value, fds: [BorrowedFd<'_>; FDS]) -> Result<()> {
        let raw = fds.map(|f| f.as_raw_fd());
        self.with_conn(|c| send(c, &Msg { op: "hold".into(), id: id.into(), meta: meta.clone() }, &raw))
            .context("keeper hold")
    }

    /// The connection ended: the keeper closes its copies.
    pub fn release(&self, id: &str) -> Result<()> {
        self.with_conn(|c| send(c, &Msg { op: "release".into(), id: id.into(), ..Default::default() }, &[]))
            .context("keeper release")
    }

    /// Every connection the keeper holds (it keeps holding them until each
    /// is released, so a second crash loses nothing either).
    pub fn list(&self) -> Result<Vec<Kept>> {
        self.with_conn(|conn| {
            send(conn, &Msg { op: "list".into(), ..Default::default() }, &[])?;
            let mut out = Vec::new();
            loop {
                let Some((msg, fds)) = recv(conn)? else { bail!("the keeper closed the connection while listing") };
                match msg.op.as_str() {
                    "end" => return Ok(out),
                    "flow" if fds.len() == FDS => out.push(Kept { id: msg.id, meta: msg.meta, fds }),
                    other => bail!("unexpected keeper reply {other:?} with {} sockets", fds.len()),
                }
            }
        })
    }

    /// Runs `f` on the connection, connecting first if needed; an error
    /// drops the connection so the next call starts afresh.
    fn with_conn<T>(&self, f: impl FnOnce(&OwnedFd) -> Result<T>) -> Result<T> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let conn = seqpacket()?;
            connect(conn.as_raw_fd(), &UnixAddr::new(&self.path)?)
                .with_context(|| format!("connecting to the keeper at {}", self.path.display()))?;
            *slot = Some(conn);
        }
        let result = f(slot.as_ref().expect("connected above"));
        if result.is_err() {
            *slot = None;
        }
        result
    }
}

fn seqpacket() -> Result<OwnedFd> {
    Ok(socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

fn send(conn: &OwnedFd, msg: &Msg, fds: &[RawFd]) -> Result<()> {
    let body = serde_json::to_vec(msg)?;
    let cmsgs = if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(fds)] };
    sendmsg::<()>(conn.as_raw_fd(), &[IoSlice::new(&body)], &cmsgs, MsgFlags::empty(), None)
        .with_context(|| format!("sending {:?} to the keeper socket", msg.op))?;
    Ok(())
}

/// One message, or None when the peer closed.
fn recv(conn: &OwnedFd) -> Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = cmsg_space!([RawFd; FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let r = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .context("reading the keeper socket")?;
    let mut fds = Vec::new();
    for c in r.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: SCM_RIGHTS gave us new fds that nothing else owns.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let len = r.bytes;
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..len]).context("a keeper message that is not JSON")?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use nix::{
        errno::Errno,
        sys::{
            socket::{recv, send, setsockopt},
            time::{TimeVal, TimeValLike},
            wait::{waitpid, WaitStatus},
        },
        unistd::{fork, setgid, setgroups, setuid, ForkResult, Gid, Uid},
    };

    use super::*;

    const NOBODY: u32 = 65534;
    /// Exit codes of the unprivileged child.
    const CONNECT_DENIED: i32 = 10;
    const CLOSED_UNSERVED: i32 = 20;
    const SERVED: i32 = 30;

    /// As `nobody`, connect to `addr` and ask for the held sockets: what
    /// happened, as an exit code. Forked, so only syscalls after the fork.
    fn as_nobody(addr: &UnixAddr) -> i32 {
        // SAFETY: the child makes raw syscalls on stack buffers and _exits.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = (|| {
                    if setgroups(&[]).is_err()
                        || setgid(Gid::from_raw(NOBODY)).is_err()
                        || setuid(Uid::from_raw(NOBODY)).is_err()
                    {
                        return 90;
                    }
                    let Ok(fd) = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::empty(), None) else {
                        return 91;
                    };
                    match connect(fd.as_raw_fd(), addr) {
                        Err(Errno::EACCES) => return CONNECT_DENIED,
                        Err(_) => return 92,
                        Ok(()) => {}
                    }
                    let _ = setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::seconds(5));
                    let _ = send(fd.as_raw_fd(), br#"{"op":"list"}"#, MsgFlags::empty());
                    let mut buf = [0u8; 256];
                    match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(0) | Err(Errno::ECONNRESET) => CLOSED_UNSERVED,
                        Ok(_) => SERVED,
                        Err(_) => 93,
                    }
                })();
                // SAFETY: _exit ends the child without running the parent's atexit hooks.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, code) => code,
                other => panic!("the unprivileged child ended with {other:?}"),
            },
        }
    }

    /// The socket is 0600, whatever the umask, so another user cannot even
    /// connect; and were it opened up, SO_PEERCRED still turns that user
    /// away while root is served.
    #[test]
    fn only_root_and_our_user_may_talk_to_the_keeper() {
        sluice_tests::require_root!();
        let dir = tempfile::tempdir().unwrap();
        // The directory must let nobody reach the socket for the test to
        // show the socket's own mode at work.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("keeper.sock");
        let listener = listen_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "the keeper socket is {mode:04o}");
        std::thread::spawn(move || accept_loop(&listener));

        let addr = UnixAddr::new(&path).unwrap();
        assert_eq!(as_nobody(&addr), CONNECT_DENIED, "nobody connected to a 0600 socket");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(as_nobody(&addr), CLOSED_UNSERVED, "the keeper served another user (SO_PEERCRED not checked)");
        // Root is served, on the same socket.
        assert!(Keeper::new(&path).list().unwrap().is_empty());
        assert!(peer_allowed(0) && peer_allowed(geteuid().as_raw()));
    }
}
