//! Shared types of the `sluice-peer` traffic tool and how to find it.

use crate::tcpinfo::TcpInfo;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The JSON line `sluice-peer send` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SendReport {
    pub ok: bool,
    pub bytes_sent: u64,
    pub bytes_verified: u64,
    pub first_mismatch_offset: Option<u64>,
    pub elapsed_ms: u64,
    pub tcp_info: TcpInfo,
    /// Why `ok` is false (timeout, reset, mismatch...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The JSON line `sluice-peer serve --mode discard-then-report` sends back
/// to the client after the client's EOF.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServeReport {
    pub bytes_received: u64,
    pub first_mismatch_offset: Option<u64>,
}

/// Path of the `sluice-peer` binary. `SLUICE_PEER_BIN` overrides; otherwise
/// it is looked up next to the running test executable (cargo puts test
/// binaries in `target/<profile>/deps/` and bins in `target/<profile>/`).
/// Integration tests can equally use `env!("CARGO_BIN_EXE_sluice-peer")`.
///
/// # Panics
/// If it cannot be found (e.g. `cargo test --lib` does not build bins).
pub fn peer_bin() -> PathBuf {
    target_bin("sluice-peer", "SLUICE_PEER_BIN")
}

/// A binary cargo built next to the running test (`target/<profile>/NAME`),
/// or the path in `env_override`.
pub fn target_bin(name: &str, env_override: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_override) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe() of the test binary");
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|dir| dir.join(name)).collect();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} not found at {candidates:?}; build it (cargo xtask test builds everything) or set {env_override}"
        )
    })
}

/// The JSON line `sluice-peer rr` prints: 1-byte request/response round
/// trips on one connection, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RrReport {
    /// Round trips measured (after the warmup).
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
    pub elapsed_ms: u64,
    /// True if the time bound cut the run short.
    pub truncated: bool,
}

/// One slice of a `sluice-peer connrate` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnSlice {
    /// Connections completed in this slice.
    pub conns: u64,
    pub secs: f64,
    pub per_sec: f64,
}

/// The JSON line `sluice-peer connrate` prints: connect, 1 byte each way,
/// close, repeated; the rate overall and per consecutive slice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnRateReport {
    pub conns: u64,
    pub errors: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub concurrency: usize,
    pub slices: Vec<ConnSlice>,
    /// The first few distinct errors, for diagnosis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
    /// True if the time or error bound stopped the run before `conns` hit
    /// the requested count.
    pub truncated: bool,
}
