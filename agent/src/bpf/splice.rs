//! The agent's side of the same-node splice maps (agent-ebpf's sk_msg.rs is
//! the kernel's). Opened from the pins, so they work beside the loaded
//! object, and for a new agent adopting an old one's connections.
//!
//! The agent writes only what the programs never write: the zeroed counts of
//! an app end it is about to dial, its own sockets in SOCK_PAIRS with how
//! much it has written to each, the routes, and the service VIPs that may be
//! spliced. Counts are written by sk_msg alone once they exist.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Mutex,
};

use agent_common::{ServiceInfo, ServiceKey, SockKey, SpliceCount};
use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError, SockHash};

use super::PinRoot;

pub struct SpliceMaps {
    counts: Mutex<HashMap<MapData, SockKey, SpliceCount>>,
    routes: Mutex<HashMap<MapData, SockKey, SockKey>>,
    written: Mutex<HashMap<MapData, SockKey, u64>>,
    pairs: Mutex<SockHash<MapData, SockKey>>,
    services: Mutex<HashMap<MapData, ServiceKey, ServiceInfo>>,
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
            services: Mutex::new(HashMap::try_from(open("splice_services")?).context("splice_services")?),
        })
    }

    /// Starts counting the app end `key` from zero, before it is connected
    /// (sock_ops then adds it to SOCK_PAIRS when it is accepted).
    pub fn expect_app(&self, key: SockKey) -> Result<()> {
        lock(&self.counts).insert(key, SpliceCount::default(), 0).context("writing splice_counts")
    }

    /// Whether sock_ops is counting the app end `key` (a captured app's
    /// socket is counted from its connect; without that it cannot be spliced).
    pub fn counted(&self, key: &SockKey) -> bool {
        lock(&self.counts).get(key, 0).is_ok()
    }

    /// Puts one of the agent's own sockets in SOCK_PAIRS under `key`, so the
    /// other app's bytes can be pushed into it, with `written` bytes written.
    pub fn add_agent_socket(&self, key: SockKey, socket: &impl AsRawFd, written: u64) -> Result<()> {
        self.written(key, written)?;
        lock(&self.pairs).insert(key, socket.as_raw_fd(), 0).context("adding the agent's socket to sock_pairs")
    }

    /// Records that the agent has written `total` bytes to its socket `key`
    /// so far. Call only after the write returned.
    pub fn written(&self, key: SockKey, total: u64) -> Result<()> {
        lock(&self.written).insert(key, total, 0).context("writing splice_written")
    }

    /// What the agent wrote to its socket `key` so far (0 if unknown).
    pub fn written_so_far(&self, key: &SockKey) -> u64 {
        lock(&self.written).get(key, 0).unwrap_or(0)
    }

    /// Arms the splice for the app end `sender`: once caught up, its bytes
    /// go into the agent socket `via`.
    pub fn route(&self, sender: SockKey, via: SockKey) -> Result<()> {
        lock(&self.routes).insert(sender, via, 0).context("writing splice_routes")
    }

    /// Bytes the app end `key` sent in the kernel, past the agent.
    pub fn spliced(&self, key: &SockKey) -> u64 {
        lock(&self.counts).get(key, 0).map(|c| c.spliced).unwrap_or(0)
    }

    /// Takes a captured app end that will not be spliced out of the maps
    /// (SOCK_PAIRS and its counts), so it is a plain TCP socket again and
    /// the sockmap's blocking-read limit cannot touch it. sock_ops counted it
    /// because it dialled a service with a local endpoint, and the endpoint
    /// picked is elsewhere. Returns whether it was there.
    pub fn release_app(&self, key: SockKey) -> bool {
        if !self.counted(&key) {
            return false;
        }
        self.forget(&[key]);
        true
    }

    /// Makes SPLICE_SERVICES hold exactly `want`: service VIP:ports that
    /// have a ready endpoint enrolled on this node. Entries a previous agent
    /// left are replaced too, since the map is read back, not remembered.
    pub fn set_services(&self, want: &StdHashMap<ServiceKey, ServiceInfo>) -> Result<()> {
        let mut map = lock(&self.services);
        let stale: Vec<ServiceKey> = map.keys().filter_map(Result::ok).filter(|k| !want.contains_key(k)).collect();
        for key in stale {
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing from splice_services"),
            }
        }
        for (key, info) in want {
            if map.get(key, 0).ok().as_ref() != Some(info) {
                map.insert(*key, *info, 0).context("writing splice_services")?;
            }
        }
        Ok(())
    }

    /// Removes every entry for these sockets (ones the kernel already
    /// dropped are fine).
    pub fn forget(&self, keys: &[SockKey]) {
        for key in keys {
            for r in [
                lock(&self.routes).remove(key),
                lock(&self.counts).remove(key),
                lock(&self.written).remove(key),
                lock(&self.pairs).remove(key),
            ] {
                match r {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => tracing::debug!(error = %e, "removing a splice map entry"),
                }
            }
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

/// The SOCK_PAIRS / SPLICE_* key of the socket at `local` talking to
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
