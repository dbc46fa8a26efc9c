//! The benchmark clients behind `sluice-peer rr` and `sluice-peer connrate`.
//! Both talk to `sluice-peer serve --mode echo` and are bounded in count and
//! in time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::peer::{ConnRateReport, ConnSlice, RrReport};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `warmup` then up to `count` 1-byte round trips on one connection with
/// TCP_NODELAY, stopping early after `max`.
pub fn rr(addr: SocketAddr, count: u64, warmup: u64, max: Duration) -> Result<RrReport> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true).context("TCP_NODELAY")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut byte = [0u8; 1];
    let mut round_trip = |s: &mut TcpStream, i: u64| -> Result<()> {
        s.write_all(&[i as u8]).context("write")?;
        s.read_exact(&mut byte).context("read echo")?;
        ensure!(byte[0] == i as u8, "echo returned {} for {}", byte[0], i as u8);
        Ok(())
    };
    let start = Instant::now();
    for i in 0..warmup {
        round_trip(&mut s, i).with_context(|| format!("warmup round trip {i}"))?;
        if start.elapsed() > max {
            break;
        }
    }
    let start = Instant::now();
    let mut ns = Vec::with_capacity(count.min(1 << 22) as usize);
    let mut truncated = false;
    for i in 0..count {
        let t = Instant::now();
        round_trip(&mut s, i).with_context(|| format!("round trip {i}"))?;
        ns.push(t.elapsed().as_nanos() as u64);
        if start.elapsed() > max {
            truncated = i + 1 < count;
            break;
        }
    }
    ensure!(!ns.is_empty(), "no round trips measured");
    ns.sort_unstable();
    let us = |v: u64| v as f64 / 1000.0;
    Ok(RrReport {
        samples: ns.len() as u64,
        p50_us: us(percentile(&ns, 0.50)),
        p90_us: us(percentile(&ns, 0.90)),
        p99_us: us(percentile(&ns, 0.99)),
        mean_us: us(ns.iter().sum::<u64>() / ns.len() as u64),
        max_us: us(*ns.last().unwrap_or(&0)),
        elapsed_ms: start.elapsed().as_millis() as u64,
        truncated,
    })
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub struct ConnRateArgs {
    /// Stop after this many connections...
    pub count: u64,
    /// ...or after this long.
    pub max: Duration,
    /// Worker threads, each with one connection in flight.
    pub concurrency: usize,
    /// Connections per reported slice.
    pub slice: u64,
    /// Stop once this many connections failed.
    pub max_errors: u64,
}

struct Shared {
    started: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
    /// (connections done, when) at every slice boundary.
    marks: Mutex<Vec<(u64, Instant)>>,
    error_samples: Mutex<Vec<String>>,
}

/// Connect, write 1 byte, read it back, close; `concurrency` at a time.
pub fn connrate(addr: SocketAddr, a: ConnRateArgs) -> Result<ConnRateReport> {
    let sh = Shared {
        started: AtomicU64::new(0),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        marks: Mutex::new(Vec::new()),
        error_samples: Mutex::new(Vec::new()),
    };
    let start = Instant::now();
    let deadline = start + a.max;
    std::thread::scope(|scope| {
        for _ in 0..a.concurrency {
            scope.spawn(|| worker(addr, &a, &sh, deadline));
        }
    });
    let end = Instant::now();
    let done = sh.done.load(Ordering::SeqCst);
    let errors = sh.errors.load(Ordering::SeqCst);
    let mut marks = sh.marks.into_inner().unwrap_or_else(|p| p.into_inner());
    marks.sort_by_key(|m| m.0);
    if marks.last().map(|m| m.0) != Some(done) {
        marks.push((done, end));
    }
    let mut slices = Vec::new();
    let mut prev = (0u64, start);
    for (n, t) in marks {
        let secs = t.duration_since(prev.1).as_secs_f64();
        let conns = n - prev.0;
        slices.push(ConnSlice { conns, secs, per_sec: if secs > 0.0 { conns as f64 / secs } else { 0.0 } });
        prev = (n, t);
    }
    let secs = end.duration_since(start).as_secs_f64();
    Ok(ConnRateReport {
        conns: done,
        errors,
        secs,
        per_sec: done as f64 / secs.max(1e-9),
        concurrency: a.concurrency,
        slices,
        error_samples: sh.error_samples.into_inner().unwrap_or_default(),
        truncated: done < a.count,
    })
}

fn worker(addr: SocketAddr, a: &ConnRateArgs, sh: &Shared, deadline: Instant) {
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if sh.started.fetch_add(1, Ordering::SeqCst) >= a.count {
            break;
        }
        match one_conn(addr) {
            Ok(()) => {
                let n = sh.done.fetch_add(1, Ordering::SeqCst) + 1;
                if n.is_multiple_of(a.slice) {
                    let now = Instant::now();
                    if let Ok(mut m) = sh.marks.lock() {
                        m.push((n, now));
                    }
                }
            }
            Err(e) => {
                if sh.errors.fetch_add(1, Ordering::SeqCst) + 1 >= a.max_errors {
                    sh.stop.store(true, Ordering::SeqCst);
                }
                if let Ok(mut samples) = sh.error_samples.lock() {
                    let e = format!("{e:#}");
                    if samples.len() < 5 && !samples.contains(&e) {
                        samples.push(e);
                    }
                }
            }
        }
    }
}

fn one_conn(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).context("connect")?;
    s.set_nodelay(true).context("TCP_NODELAY")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"x").context("write")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).context("read echo")?;
    ensure!(b[0] == b'x', "echo returned {:?}", b[0]);
    Ok(())
}
