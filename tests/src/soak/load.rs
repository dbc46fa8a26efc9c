//! The load itself, run inside the pods by `sluice-soak echo`, `hold` and
//! `burst`: an echo server and two clients on tokio, so that 10,000 open
//! connections cost a few MiB in the test processes and no thread each.
//!
//! Every connection carries bytes only it can produce ([`payload`]: its own
//! number, then a pattern seeded by it), so a byte lost, duplicated or
//! crossed over from another connection inside the agent shows as a
//! mismatch at the client, which checks every byte.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// The bytes connection `id` sends in round `round`: its id (8 bytes, big
/// endian), the round, then a pattern that depends on both.
pub fn payload(id: u64, round: u8, len: usize) -> Vec<u8> {
    let len = len.max(9);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&id.to_be_bytes());
    v.push(round);
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(round);
    while v.len() < len {
        // xorshift: cheap, and different for every id.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

/// Soft RLIMIT_NOFILE up to the hard limit, for 10,000 sockets in one process.
pub fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0, "getrlimit(NOFILE)");
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct it is given.
        ensure!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0, "setrlimit(NOFILE, {})", lim.rlim_max);
    }
    Ok(lim.rlim_cur)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")
}

/// One line to stdout, flushed: the orchestrator reads it through a pipe.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------------------------------------------------------------- server --

/// `sluice-soak echo`: echoes on `echo_port` until the client's EOF, then
/// shuts down writing (the client closes first); on `close_port` echoes the
/// first `close_after` bytes and shuts down writing at once (the server
/// closes first, as an HTTP/1.0 server does), then drains to EOF.
pub fn echo(ip: std::net::IpAddr, echo_port: u16, close_port: u16, close_after: usize) -> Result<()> {
    let limit = raise_nofile()?;
    runtime()?.block_on(async move {
        let echo = TcpListener::bind((ip, echo_port)).await.with_context(|| format!("bind {ip}:{echo_port}"))?;
        let close = TcpListener::bind((ip, close_port)).await.with_context(|| format!("bind {ip}:{close_port}"))?;
        say(&format!("LISTENING {ip} {echo_port} {close_port} nofile={limit}"));
        let errors = Arc::new(AtomicU64::new(0));
        let a = tokio::spawn(serve(echo, None, errors.clone()));
        let b = tokio::spawn(serve(close, Some(close_after), errors));
        let _ = tokio::join!(a, b);
        Ok(())
    })
}

async fn serve(listener: TcpListener, close_after: Option<usize>, errors: Arc<AtomicU64>) {
    let mut pause = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                pause = Duration::from_millis(10);
                let errors = errors.clone();
                tokio::spawn(async move {
                    if let Err(e) = echo_one(s, close_after).await {
                        // The first few only: the client reports failures too.
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("sluice-soak echo: {e:#}");
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("sluice-soak echo: accept: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn echo_one(mut s: TcpStream, close_after: Option<usize>) -> Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 4096];
    let mut left = close_after;
    loop {
        let want = left.map_or(buf.len(), |l| l.min(buf.len()));
        if want == 0 {
            break;
        }
        let n = s.read(&mut buf[..want]).await.context("read")?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).await.context("write")?;
        left = left.map(|l| l - n);
    }
    s.shutdown().await.context("shutdown(Write)")?;
    if close_after.is_some() {
        // Drain: the client only closes once it has read our EOF.
        while s.read(&mut buf).await.context("drain")? > 0 {}
    }
    Ok(())
}

// ---------------------------------------------------------------- clients --

/// What a client run did; the orchestrator reads it as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    /// Connections whose every byte came back right.
    pub ok: u64,
    pub failed: u64,
    /// Bytes sent and verified, both ways counted once.
    pub bytes_verified: u64,
    pub secs: f64,
    pub per_sec: f64,
    /// The first few distinct errors.
    pub error_samples: Vec<String>,
}

struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn new() -> Tally {
        Tally { ok: AtomicU64::new(0), failed: AtomicU64::new(0), bytes: AtomicU64::new(0), samples: Mutex::default() }
    }

    fn note(&self, r: &Result<u64>) {
        match r {
            Ok(bytes) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(*bytes, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let e = format!("{e:#}");
                let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
                if s.len() < 5 && !s.contains(&e) {
                    s.push(e);
                }
            }
        }
    }

    fn report(&self, start: Instant) -> ClientReport {
        let secs = start.elapsed().as_secs_f64();
        let ok = self.ok.load(Ordering::Relaxed);
        ClientReport {
            ok,
            failed: self.failed.load(Ordering::Relaxed),
            bytes_verified: self.bytes.load(Ordering::Relaxed),
            secs,
            per_sec: ok as f64 / secs.max(1e-9),
            error_samples: self.samples.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: timed out after {IO_TIMEOUT:?}"),
    }
}

/// Writes connection `id`'s round `round` and checks the echo byte for byte.
async fn round_trip(s: &mut TcpStream, id: u64, round: u8, len: usize) -> Result<u64> {
    let out = payload(id, round, len);
    timed("write", s.write_all(&out)).await?;
    let mut back = vec![0u8; out.len()];
    timed("read echo", s.read_exact(&mut back)).await?;
    if let Some(i) = out.iter().zip(&back).position(|(a, b)| a != b) {
        bail!("connection {id} round {round}: byte {i} came back {:#04x}, sent {:#04x}", back[i], out[i]);
    }
    Ok(2 * out.len() as u64)
}

/// Reads until EOF; anything more than nothing is an error.
async fn expect_eof(s: &mut TcpStream, id: u64) -> Result<()> {
    let mut extra = [0u8; 64];
    let n = timed("read EOF", s.read(&mut extra)).await?;
    ensure!(n == 0, "connection {id}: {n} unexpected bytes after the echo");
    Ok(())
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r.with_context(|| format!("connect {addr}"))?,
        Err(_) => bail!("connect {addr}: timed out after {CONNECT_TIMEOUT:?}"),
    };
    s.set_nodelay(true)?;
    Ok(s)
}

/// `sluice-soak hold`: opens `count` connections, `parallel` at a time, each
/// with one verified round trip, and keeps them all open. Prints `HELD
/// <report>` and waits for a line on stdin; then does a second verified
/// round trip on every connection (all were alive at once), half-closes
/// each, checks the server's EOF, and prints `DONE <report>`.
pub fn hold(addr: SocketAddr, count: u64, parallel: usize, bytes: usize) -> Result<()> {
    raise_nofile()?;
    runtime()?.block_on(async move {
        let tally = Tally::new();
        let start = Instant::now();
        let opened: Vec<(u64, TcpStream)> = stream::iter(0..count)
            .map(|id| async move {
                let r = async {
                    let mut s = connect(addr).await?;
                    let n = round_trip(&mut s, id, 0, bytes).await?;
                    Ok::<_, anyhow::Error>((s, n))
                }
                .await;
                (id, r)
            })
            .buffer_unordered(parallel.max(1))
            .filter_map(|(id, r)| {
                tally.note(&r.as_ref().map(|(_, n)| *n).map_err(|e| anyhow::anyhow!("{e:#}")));
                std::future::ready(r.ok().map(|(s, _)| (id, s)))
            })
            .collect()
            .await;
        say(&format!("HELD {}", serde_json::to_string(&tally.report(start))?));

        let mut line = String::new();
        BufReader::new(tokio::io::stdin()).read_line(&mut line).await.context("waiting for the go on stdin")?;

        let tally = Tally::new();
        let start = Instant::now();
        stream::iter(opened)
            .map(|(id, mut s)| async move {
                let n = round_trip(&mut s, id, 1, bytes).await?;
                timed("shutdown(Write)", s.shutdown()).await?;
                expect_eof(&mut s, id).await?;
                Ok::<_, anyhow::Error>(n)
            })
            .buffer_unordered(parallel.max(1))
            .for_each(|r| {
                tally.note(&r);
                std::future::ready(())
            })
            .await;
        say(&format!("DONE {}", serde_json::to_string(&tally.report(start))?));
        Ok(())
    })
}

/// `sluice-soak burst`: `count` short connections, `parallel` in flight, to
/// a server that closes first after `bytes` (`echo --close-port`): connect,
/// send, check the echo, read the server's EOF, close. Stops early after
/// `max` or once `max_errors` failed. Prints one JSON report.
pub fn burst(
    addr: SocketAddr,
    count: u64,
    parallel: usize,
    bytes: usize,
    max: Duration,
    max_errors: u64,
) -> Result<()> {
    raise_nofile()?;
    runtime()?.block_on(async move {
        let tally = Tally::new();
        let start = Instant::now();
        let deadline = start + max;
        let next = AtomicU64::new(0);
        let workers = (0..parallel.max(1)).map(|_| async {
            loop {
                if Instant::now() > deadline || tally.failed.load(Ordering::Relaxed) >= max_errors {
                    break;
                }
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= count {
                    break;
                }
                let r = async {
                    let mut s = connect(addr).await?;
                    let n = round_trip(&mut s, id, 0, bytes).await?;
                    expect_eof(&mut s, id).await?;
                    Ok(n)
                }
                .await;
                tally.note(&r);
            }
        });
        futures::future::join_all(workers).await;
        say(&serde_json::to_string(&tally.report(start))?);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::payload;

    #[test]
    fn payloads_differ_per_connection_and_round() {
        assert_eq!(payload(7, 0, 64), payload(7, 0, 64));
        assert_ne!(payload(7, 0, 64), payload(8, 0, 64));
        assert_ne!(payload(7, 0, 64)[9..], payload(7, 1, 64)[9..]);
        assert_eq!(payload(1, 0, 3).len(), 9, "room for the id and the round at least");
    }
}
