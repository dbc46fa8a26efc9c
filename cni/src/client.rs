//! The plugin's side of the agent socket: one request, one answer, every
//! wait bounded. The plugin is a short-lived process run by the container
//! runtime; an agent that hangs must cost a pod a bounded delay and an error
//! that names the socket, never a stuck kubelet.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::protocol::{Request, Response, MAX_MESSAGE};

/// How long connecting may take. A Unix `connect` blocks while the agent's
/// backlog is full (an agent that stopped accepting), so it runs on a
/// helper thread with this deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the exchange failed. `Unreachable` means the agent never saw the
/// request (so the pod was not touched); `Broken` means it may have.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent is not reachable at {socket}: {reason}")]
    Unreachable { socket: PathBuf, reason: String },
    #[error("the agent at {socket} did not answer properly: {reason}")]
    Broken { socket: PathBuf, reason: String },
}

/// Sends `req` to the agent at `socket` and waits at most `timeout` for its
/// answer.
pub fn exchange(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { socket: socket.to_owned(), reason };
    let broken = |reason: String| ClientError::Broken { socket: socket.to_owned(), reason };

    let mut stream = connect(socket, CONNECT_TIMEOUT).map_err(unreachable)?;
    let deadline = Instant::now() + timeout;
    let mut line = serde_json::to_vec(req).map_err(|e| broken(format!("encoding the request: {e}")))?;
    line.push(b'\n');
    stream.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(|e| broken(e.to_string()))?;
    // A write that fails outright (EPIPE: the agent closed at once) is as
    // good as unreachable: nothing was read on the other side.
    stream.write_all(&line).map_err(|e| unreachable(format!("sending the request: {e}")))?;

    let answer = read_line(&mut stream, deadline).map_err(broken)?;
    serde_json::from_slice(&answer).map_err(|e| broken(format!("unreadable answer: {e}")))
}

fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_owned();
    // Detached on timeout: the process exits soon after, taking it along.
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&path));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connect did not complete within {} s", timeout.as_secs())),
    }
}

/// Reads up to the first `\n`, at most [`MAX_MESSAGE`] bytes, before
/// `deadline` (each read's timeout is what is left, so a trickling agent
/// cannot stretch it).
fn read_line(stream: &mut UnixStream, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within the deadline ({} bytes received)", out.len()));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the answer: {e}")),
        };
        if n == 0 {
            return Err(format!("the agent closed the connection without an answer ({} bytes received)", out.len()));
        }
        if let Some(pos) = buf[..n].iter().position(|b| *b == b'\n') {
            out.extend_from_slice(&buf[..pos]);
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > MAX_MESSAGE {
            return Err(format!("answer longer than {MAX_MESSAGE} bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, Outcome};
    use std::os::unix::net::UnixListener;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn status() -> Request {
        Request { command: Command::Status, pod: Default::default(), valid_attachments: vec![] }
    }

    #[test]
    fn no_socket_is_unreachable_and_named() {
        let d = dir();
        let sock = d.path().join("none.sock");
        let err = exchange(&sock, &status(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    #[test]
    fn answers_are_read_and_silence_times_out() {
        let d = dir();
        let sock = d.path().join("a.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            // First: a proper answer, split over two writes.
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 256];
            let _ = s.read(&mut req).unwrap();
            s.write_all(br#"{"result":{"Ok":"ready"},"#).unwrap();
            s.write_all(b"\"detail\":\"up\"}\n").unwrap();
            // Second: accepts and says nothing.
            let (s2, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            drop(s2);
            // Third: reads the request, then closes without an answer
            // (reading first, so the close is a FIN, not a reset).
            let (mut s3, _) = l.accept().unwrap();
            let _ = s3.read(&mut req).unwrap();
            drop(s3);
        });
        let r = exchange(&sock, &status(), Duration::from_secs(5)).unwrap();
        assert_eq!(r.result, Ok(Outcome::Ready));
        assert_eq!(r.detail, "up");
        let started = Instant::now();
        let err = exchange(&sock, &status(), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ClientError::Broken { .. }) && err.to_string().contains("deadline"), "{err}");
        assert!(started.elapsed() < Duration::from_millis(700), "bounded by the deadline");
        std::thread::sleep(Duration::from_millis(600));
        let err = exchange(&sock, &status(), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, ClientError::Broken { .. }) && err.to_string().contains("without an answer"), "{err}");
        t.join().unwrap();
    }
}
