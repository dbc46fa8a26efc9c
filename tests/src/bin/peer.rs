//! `sluice-peer`: real TCP traffic for end-to-end tests.
//!
//! `serve` accepts connections (echo / sink / discard-then-report) and
//! prints `LISTENING <addr>` once bound and `PEER <addr>` per connection, so
//! a test can wait for readiness and check which client address the app saw.
//! `send` streams a deterministic pattern, verifies what comes back byte for
//! byte, and prints one JSON [`SendReport`] line.
//! `rr` and `connrate` are the benchmark clients (against an echo server):
//! 1-byte round-trip latency, and new connections per second.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_tests::bench::clients as bench;
use sluice_tests::{pattern, tcp_info, SendReport, ServeReport, TcpInfo};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "sluice-peer", about = "TCP traffic tool for Sluice's tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept TCP connections.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value_t = Mode::Echo)]
        mode: Mode,
        /// Serve one connection, then exit.
        #[arg(long)]
        once: bool,
        /// Print `PEER <ip>:<port>` for every accepted connection.
        #[arg(long)]
        print_peer: bool,
        /// Set TCP_NODELAY on every accepted connection.
        #[arg(long)]
        nodelay: bool,
    },
    /// Send a pattern and verify the reply.
    Send {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 64 * 1024)]
        chunk: usize,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// What the server sends back: the bytes (echo), a ServeReport
        /// (report, for discard-then-report) or nothing (none, for sink).
        #[arg(long, value_enum, default_value_t = Expect::Echo)]
        expect: Expect,
        /// One thread: write everything, half-close, then read the answer
        /// (the shape of an HTTP/1.0 client or `nc -N`). Default: a reader
        /// thread runs alongside the writer from the start.
        #[arg(long)]
        sequential: bool,
        /// Pace the writes to at most this many bytes per second (0: as
        /// fast as the connection takes them), so a transfer is provably
        /// still in flight while a test changes something under it.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Print `PROGRESS <elapsed ms> <bytes sent> <bytes verified>` every
        /// this many milliseconds while the transfer runs (0: never).
        #[arg(long, default_value_t = 0)]
        progress_ms: u64,
    },
    /// 1-byte request/response latency on one connection (TCP_NODELAY)
    /// against an echo server; prints one JSON RrReport line.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        #[arg(long, default_value_t = 1_000)]
        warmup: u64,
        /// Stop measuring after this long, whatever the count.
        #[arg(long, default_value_t = 30)]
        max_secs: u64,
    },
    /// New connections per second against an echo server: connect, write
    /// 1 byte, read it back, close; prints one JSON ConnRateReport line.
    Connrate {
        #[arg(long)]
        connect: SocketAddr,
        /// Stop after this many connections...
        #[arg(long, default_value_t = 25_000)]
        count: u64,
        /// ...or after this long, whichever comes first.
        #[arg(long, default_value_t = 30)]
        max_secs: u64,
        /// Connections in flight at once (one thread each).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Report the rate per slice of this many connections.
        #[arg(long, default_value_t = 2_500)]
        slice: u64,
        /// Give up after this many failed connections.
        #[arg(long, default_value_t = 200)]
        max_errors: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Send every byte back; after the client's EOF, finish and shut down writing.
    Echo,
    /// Read and drop everything.
    Sink,
    /// Read everything, check the pattern, then reply with one JSON ServeReport line.
    DiscardThenReport,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Expect {
    Echo,
    Report,
    None,
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Serve { listen, mode, once, print_peer, nodelay } => serve(listen, mode, once, print_peer, nodelay),
        Cmd::Send { connect, bytes, chunk, timeout_secs, expect, sequential, rate, progress_ms } => send(
            connect,
            bytes,
            chunk.max(1),
            Duration::from_secs(timeout_secs),
            expect,
            Pace { sequential, rate, progress: Duration::from_millis(progress_ms) },
        ),
        Cmd::Rr { connect, count, warmup, max_secs } => {
            bench::rr(connect, count, warmup, Duration::from_secs(max_secs)).and_then(|r| say_json(&r))
        }
        Cmd::Connrate { connect, count, max_secs, concurrency, slice, max_errors } => bench::connrate(
            connect,
            bench::ConnRateArgs {
                count,
                max: Duration::from_secs(max_secs),
                concurrency: concurrency.clamp(1, 64),
                slice: slice.max(1),
                max_errors,
            },
        )
        .and_then(|r| say_json(&r)),
    };
    if let Err(e) = result {
        eprintln!("sluice-peer: {e:#}");
        std::process::exit(1);
    }
}

/// One line to stdout, flushed at once: tests read it through a pipe.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn say_json(v: &impl serde::Serialize) -> Result<()> {
    say(&serde_json::to_string(v)?);
    Ok(())
}

fn serve(listen: SocketAddr, mode: Mode, once: bool, print_peer: bool, nodelay: bool) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    say(&format!("LISTENING {}", listener.local_addr().context("local_addr")?));
    loop {
        let (stream, peer) = listener.accept().context("accept")?;
        if nodelay {
            stream.set_nodelay(true).context("TCP_NODELAY")?;
        }
        if print_peer {
            say(&format!("PEER {peer}"));
        }
        if once {
            return handle(stream, mode).with_context(|| format!("connection from {peer}"));
        }
        std::thread::spawn(move || {
            if let Err(e) = handle(stream, mode) {
                eprintln!("sluice-peer: connection from {peer}: {e:#}");
            }
        });
    }
}

fn handle(mut s: TcpStream, mode: Mode) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut mismatch = None;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read"),
        };
        match mode {
            Mode::Echo => s.write_all(&buf[..n]).context("write echo")?,
            Mode::Sink => {}
            Mode::DiscardThenReport => {
                if mismatch.is_none() {
                    mismatch = pattern::first_mismatch(total, &buf[..n]);
                }
            }
        }
        total += n as u64;
    }
    if let Mode::DiscardThenReport = mode {
        let report = ServeReport { bytes_received: total, first_mismatch_offset: mismatch };
        let line = serde_json::to_string(&report)? + "\n";
        s.write_all(line.as_bytes()).context("write report")?;
    }
    // Half-close honoured: we only stop writing after the client's EOF.
    s.shutdown(Shutdown::Write).context("shutdown(Write)")?;
    Ok(())
}

/// How `send` paces itself and reports.
struct Pace {
    sequential: bool,
    /// Bytes per second; 0 for no limit.
    rate: u64,
    /// Progress line interval; zero for none.
    progress: Duration,
}

/// Bytes written so far, shared between the writer and the progress lines.
static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn send(addr: SocketAddr, total: u64, chunk: usize, timeout: Duration, expect: Expect, pace: Pace) -> Result<()> {
    let Pace { sequential, rate, progress } = pace;
    // Small writes when paced, so the bytes arrive steadily.
    let chunk = if rate > 0 { chunk.min((rate / 20).max(1) as usize) } else { chunk };
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone().context("clone socket")?;
    let mut write_all = move || -> Result<u64> {
        let mut buf = vec![0u8; chunk];
        let mut sent = 0u64;
        while sent < total {
            let n = chunk.min((total - sent) as usize);
            pattern::fill(sent, &mut buf[..n]);
            if rate > 0 {
                // Not ahead of `rate`: this chunk may start once the bytes
                // before it are due.
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            writer.write_all(&buf[..n]).with_context(|| format!("write at offset {sent}"))?;
            sent += n as u64;
            SENT.store(sent, std::sync::atomic::Ordering::Relaxed);
        }
        writer.shutdown(Shutdown::Write).context("shutdown(Write)")?;
        Ok(sent)
    };
    let sender = if sequential {
        let sent = write_all();
        std::thread::spawn(move || sent)
    } else {
        std::thread::spawn(write_all)
    };

    let mut report = SendReport::default();
    let received = receive(&stream, total, expect, start + timeout, &mut report, progress);
    if received.is_err() || report.first_mismatch_offset.is_some() {
        // Unblock the sender (EPIPE) instead of waiting for its write timeout.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
    report.bytes_sent = match &sent {
        Ok(n) => *n,
        Err(_) => 0,
    };
    report.tcp_info = tcp_info(&stream).unwrap_or_else(|e| {
        eprintln!("sluice-peer: TCP_INFO: {e}");
        TcpInfo::default()
    });
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    let failure = match (sent, received) {
        (Err(e), _) | (_, Err(e)) => Some(format!("{e:#}")),
        _ if report.first_mismatch_offset.is_some() => {
            Some(format!("data mismatch at offset {}", report.first_mismatch_offset.unwrap_or_default()))
        }
        _ if expect != Expect::None && report.bytes_verified != total => {
            Some(format!("verified {} of {total} bytes", report.bytes_verified))
        }
        _ => None,
    };
    report.ok = failure.is_none();
    report.error = failure.clone();
    say(&serde_json::to_string(&report)?);
    drop(stream);
    match failure {
        Some(f) => bail!("{f}"),
        None => Ok(()),
    }
}

/// Read until EOF, checking what comes back against `expect`.
fn receive(
    mut s: &TcpStream,
    total: u64,
    expect: Expect,
    deadline: Instant,
    report: &mut SendReport,
    progress: Duration,
) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut text = Vec::new();
    let start = Instant::now();
    let mut next_progress = start;
    if !progress.is_zero() {
        // Wake up for the progress lines even while nothing arrives.
        s.set_read_timeout(Some(progress))?;
    }
    loop {
        if !progress.is_zero() && Instant::now() >= next_progress {
            let sent = SENT.load(std::sync::atomic::Ordering::Relaxed);
            say(&format!("PROGRESS {} {sent} {}", start.elapsed().as_millis(), report.bytes_verified));
            next_progress += progress;
        }
        if Instant::now() > deadline {
            bail!("timed out after {got} bytes back");
        }
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // With progress lines the read timeout is the progress interval:
            // only the deadline ends the transfer.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) && !progress.is_zero() => {
                continue
            }
            // SO_RCVTIMEO is the whole timeout, so a real one is past the
            // deadline. Before it, EAGAIN on this blocking socket is the
            // sockmap's (README, "Limits": a blocking read woken without
            // data, as when our writer thread half-closes while we read);
            // an app reads again, and so do we.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("timed out after {got} bytes back")
            }
            Err(e) => return Err(e).with_context(|| format!("read after {got} bytes back")),
        };
        match expect {
            Expect::Echo => {
                // Anything past `total` is a duplicate: it mismatches at `total`.
                let m = pattern::first_mismatch(got, &buf[..n]).or((got + n as u64 > total).then_some(total.max(got)));
                if let Some(off) = m {
                    report.first_mismatch_offset = Some(off);
                    report.bytes_verified = off;
                    return Ok(());
                }
                report.bytes_verified = got + n as u64;
            }
            Expect::Report => text.extend_from_slice(&buf[..n]),
            Expect::None => bail!("server sent {n} unexpected bytes"),
        }
        got += n as u64;
    }
    if expect == Expect::Report {
        let r: ServeReport = serde_json::from_slice(&text)
            .with_context(|| format!("bad report {:?}", String::from_utf8_lossy(&text)))?;
        report.first_mismatch_offset = r.first_mismatch_offset;
        report.bytes_verified = r.first_mismatch_offset.unwrap_or(r.bytes_received);
    }
    Ok(())
}
