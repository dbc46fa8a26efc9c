//! Real traffic between pods with `sluice-peer`: an echo server and a client
//! that checks every byte came back, in order, exactly once.

use std::{process::Command, time::Duration};

use anyhow::{ensure, Context, Result};

use crate::{peer_bin, ChildGuard, Place, SendReport};

/// Starts an echo server in `place` on `listen` (port 0 picks one); returns
/// the guard and the address it bound.
pub fn echo_server(place: &(impl Place + ?Sized), listen: &str, extra: &[&str]) -> Result<(ChildGuard, String)> {
    let mut serve = Command::new(peer_bin());
    serve.args(["serve", "--listen", listen, "--mode", "echo"]).args(extra);
    let mut server = crate::spawn_in(place, serve)?;
    let line = server.wait_for_line("LISTENING ", Duration::from_secs(5))?;
    Ok((server, line.trim_start_matches("LISTENING ").trim().to_owned()))
}

/// Sends `bytes` from `place` to `addr` and verifies the echo byte-exact.
pub fn send_verified(place: &(impl Place + ?Sized), addr: &str, bytes: u64, timeout: Duration) -> Result<SendReport> {
    let report = send(place, addr, bytes, timeout)?;
    ensure!(report.ok && report.bytes_verified == bytes, "echo to {addr} not byte-exact: {report:?}");
    Ok(report)
}

/// Like [`send_verified`] but returns the report whatever it says.
pub fn send(place: &(impl Place + ?Sized), addr: &str, bytes: u64, timeout: Duration) -> Result<SendReport> {
    let mut send = Command::new(peer_bin());
    send.args(["send", "--connect", addr, "--bytes", &bytes.to_string()])
        .args(["--timeout-secs", &timeout.as_secs().max(1).to_string()]);
    let out = crate::output_in(place, send, timeout + Duration::from_secs(5))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.trim().is_empty() && !out.status.success() {
        // Refused or reset before any report could be written (a policy
        // denial looks like this): a failed exchange, not a harness error.
        return Ok(SendReport {
            ok: false,
            error: Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            ..Default::default()
        });
    }
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "sluice-peer send to {addr} printed no report ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
