//! One measurement each: iperf3 throughput, 1-byte RR latency, new
//! connections per second; client in one pod, server in another. Every run
//! is bounded in time.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::peer::{ConnRateReport, RrReport};
use crate::{peer_bin, traffic::echo_server, Pod};

/// An iperf3 run as the receiver saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Iperf {
    pub streams: u32,
    pub bits_per_second: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub retransmits: Option<u64>,
}

impl Iperf {
    pub fn gbits(&self) -> f64 {
        self.bits_per_second / 1e9
    }
}

/// `iperf3 -s -1 -p PORT` in `server`, then `iperf3 -c -t SECS -P STREAMS -J`
/// in `client`.
pub fn iperf(client: &Pod, server: &Pod, port: u16, streams: u32, secs: u32) -> Result<Iperf> {
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-p", &port.to_string()]);
    let srv = server.spawn(srv).context("starting iperf3 -s")?;
    wait_listening(server, port, Duration::from_secs(5))?;
    let mut cli = Command::new("iperf3");
    cli.args(["-c", &server.ipv4().to_string(), "-p", &port.to_string()]).args([
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]);
    let out = client.output(cli, Duration::from_secs(secs as u64 + 30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let _ = srv.finish(Duration::from_secs(5));
    let v: Value = serde_json::from_str(&stdout).with_context(|| {
        format!("iperf3 -c printed no JSON ({}): {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    })?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    let bps = recv["bits_per_second"].as_f64().context("iperf3 JSON: no end.sum_received.bits_per_second")?;
    Ok(Iperf {
        streams,
        bits_per_second: bps,
        bytes: recv["bytes"].as_u64().unwrap_or(0),
        seconds: recv["seconds"].as_f64().unwrap_or(0.0),
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
    })
}

/// Polls `ss` in `pod` until something listens on `port`.
pub fn wait_listening(pod: &Pod, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        let out = pod.exec_ok(&["ss", "-Hltn", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {} after {timeout:?}", pod.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh `sluice-peer serve --mode echo --nodelay` on `server:port`, and
/// `sluice-peer rr` against it from `client`.
pub fn rr(client: &Pod, server: &Pod, port: u16, count: u64, warmup: u64) -> Result<RrReport> {
    let listen = format!("{}:{port}", server.ipv4());
    let (_srv, addr) = echo_server(server, &listen, &["--nodelay"])?;
    let mut cmd = Command::new(peer_bin());
    cmd.args(["rr", "--connect", &addr, "--count", &count.to_string()]).args([
        "--warmup",
        &warmup.to_string(),
        "--max-secs",
        "30",
    ]);
    peer_json(client, cmd, Duration::from_secs(60))
}

/// Connection rate: a fresh echo server on `server:port`, and `sluice-peer
/// connrate` against it from `client`.
pub fn connrate(
    client: &Pod,
    server: &Pod,
    port: u16,
    count: u64,
    max_secs: u64,
    slice: u64,
) -> Result<ConnRateReport> {
    let listen = format!("{}:{port}", server.ipv4());
    let (_srv, addr) = echo_server(server, &listen, &["--nodelay"])?;
    let mut cmd = Command::new(peer_bin());
    cmd.args(["connrate", "--connect", &addr, "--count", &count.to_string()])
        .args(["--max-secs", &max_secs.to_string(), "--concurrency", "4"])
        .args(["--slice", &slice.to_string()]);
    let r: ConnRateReport = peer_json(client, cmd, Duration::from_secs(max_secs + 30))?;
    ensure!(r.conns > 0, "no connection succeeded: {:?}", r.error_samples);
    Ok(r)
}

fn peer_json<T: serde::de::DeserializeOwned>(pod: &Pod, cmd: Command, timeout: Duration) -> Result<T> {
    let what = format!("{cmd:?}");
    let out = pod.output(cmd, timeout)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{what} in {} failed ({}): {}",
        pod.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).with_context(|| format!("{what} printed {stdout:?}"))
}

/// TCP sockets in TIME_WAIT in `pod`'s netns.
pub fn time_wait(pod: &Pod) -> Result<u64> {
    let out = pod.exec_ok(&["ss", "-Htan", "state", "time-wait"])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count() as u64)
}
