//! The agent's side of the same-node splice maps (see agent-ebpf's sk_msg.rs
//! for the kernel side). Opened from the pins, so they work beside the
//! loaded object and for any process that inspects them.
//!
//! The agent writes only what the programs never write: the zeroed counts of
//! sockets it is about to use, its own sockets in SOCK_PAIRS, and the routes.
//! Counts are written by sk_msg alone once they exist.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Mutex,
};

use agent_common::{SockKey, SpliceCount};
use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError, SockHash};

use super::PinRoot;

pub struct SpliceMaps {
    counts: Mutex<HashMap<MapData, SockKey, SpliceCount>>,
    routes: Mutex<HashMap<MapData, SockKey, SockKey>>,
    written: Mutex<HashMap<MapData, SockKey, u64>>,
    pairs: Mutex<SockHash<MapData, SockKey>>,
}

impl SpliceMaps {
    pub fn open(pins: &PinRoot) -> Result<SpliceMaps> {
        let open = |file: &str| {
            let path = pins.path().join(file);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .with_context(|| format!("opening pinned map {}", path.display()))
        };
        Ok(SpliceMaps {
            counts: Mutex::new(HashMap::try_from(open("splice_counts")?).context("splice_counts")?),
            routes: Mutex::new(HashMap::try_from(open("splice_routes")?).context("splice_routes")?),
            written: Mutex::new(HashMap::try_from(open("splice_written")?).context("splice_written")?),
            pairs: Mutex::new(SockHash::try_from(open("sock_pairs")?).context("sock_pairs")?),
        })
    }

    /// Starts counting the app end `key` from zero, before it is connected
    /// (sock_ops then adds it to SOCK_PAIRS when it is accepted).
    pub fn expect_app(&self, key: SockKey) -> Result<()> {
        lock(&self.counts).insert(key, SpliceCount::default(), 0).context("writing splice_counts")
    }

    /// Puts one of the agent's own sockets in SOCK_PAIRS under `key`, so the
    /// other app's bytes can be redirected into it, with nothing written yet.
    pub fn add_agent_socket(&self, key: SockKey, socket: &impl AsRawFd) -> Result<()> {
        lock(&self.written).insert(key, 0, 0).context("writing splice_written")?;
        lock(&self.pairs).insert(key, socket.as_raw_fd(), 0).context("adding the agent's socket to sock_pairs")
    }

    /// Records that the agent has written `total` bytes to its socket `key`
    /// so far. Call only after the write returned.
    pub fn written(&self, key: SockKey, total: u64) -> Result<()> {
        lock(&self.written).insert(key, total, 0).context("writing splice_written")
    }

    /// Arms the splice for the app end `sender`: once caught up, its bytes
    /// go into the agent socket `via`.
    pub fn route(&self, sender: SockKey, via: SockKey) -> Result<()> {
        lock(&self.routes).insert(sender, via, 0).context("writing splice_routes")
    }

    pub fn count(&self, key: &SockKey) -> Option<SpliceCount> {
        lock(&self.counts).get(key, 0).ok()
    }

    /// Removes every entry for these sockets (ones the kernel already
    /// dropped are fine).
    pub fn forget(&self, keys: &[SockKey]) {
        let ignore_missing = |r: Result<(), MapError>| match r {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => tracing::debug!(error = %e, "removing a splice map entry"),
        };
        for key in keys {
            ignore_missing(lock(&self.routes).remove(key));
            ignore_missing(lock(&self.counts).remove(key));
            ignore_missing(lock(&self.written).remove(key));
            ignore_missing(lock(&self.pairs).remove(key));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An address as the programs store it: IPv6, or IPv4-mapped IPv6, as four
/// words in network byte order.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The SOCK_PAIRS / SPLICE_COUNTS key of the socket at `local` talking to
/// `remote` inside the netns with cookie `netns_cookie`.
pub fn sock_key(netns_cookie: u64, local: SocketAddr, remote: SocketAddr) -> SockKey {
    SockKey {
        netns_cookie,
        local_ip: ip_words(local.ip()),
        remote_ip: ip_words(remote.ip()),
        local_port: local.port() as u32,
        remote_port: remote.port() as u32,
    }
}
