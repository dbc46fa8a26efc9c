//! The agent's side of the same-node splice (agent-ebpf/src/splice.rs is the
//! kernel's): it pairs two of its own sockets so that what arrives on one is
//! sent out of the other inside the kernel. Maps are opened from the pins,
//! so they work beside the loaded object.

use std::{os::fd::AsRawFd, sync::Mutex};

use agent_common::SpliceFlow;
use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError, SockHash};

use super::PinRoot;

pub struct SpliceMaps {
    flows: Mutex<HashMap<MapData, u64, SpliceFlow>>,
    socks: Mutex<SockHash<MapData, u64>>,
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
            flows: Mutex::new(HashMap::try_from(open("splice_flows")?).context("splice_flows")?),
            socks: Mutex::new(SockHash::try_from(open("splice_socks")?).context("splice_socks")?),
        })
    }

    /// Splices `a` and `b` (with these cookies): from now on each one's
    /// incoming bytes, including any already queued, are sent out of the
    /// other. On error the caller still copies: whatever the kernel could
    /// not send on is handed to the agent, in order.
    pub fn join(&self, a: &impl AsRawFd, b: &impl AsRawFd, [ca, cb]: [u64; 2]) -> Result<()> {
        {
            let mut flows = lock(&self.flows);
            flows.insert(ca, SpliceFlow { peer: cb, ..Default::default() }, 0).context("writing splice_flows")?;
            flows.insert(cb, SpliceFlow { peer: ca, ..Default::default() }, 0).context("writing splice_flows")?;
        }
        let mut socks = lock(&self.socks);
        // Until both are in, a segment arriving on the first one finds no
        // partner and sends that direction to the agent for good (see
        // SpliceFlow::passed); `b` first leaves only its side that window.
        socks.insert(cb, b.as_raw_fd(), 0).context("adding a socket to splice_socks")?;
        socks.insert(ca, a.as_raw_fd(), 0).context("adding a socket to splice_socks")?;
        Ok(())
    }

    /// Bytes the kernel has moved from the socket with `cookie` to its partner.
    pub fn spliced(&self, cookie: u64) -> u64 {
        lock(&self.flows).get(&cookie, 0).map(|f| f.bytes).unwrap_or(0)
    }

    pub fn forget(&self, cookies: &[u64]) {
        for cookie in cookies {
            for r in [lock(&self.socks).remove(cookie), lock(&self.flows).remove(cookie)] {
                match r {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => tracing::debug!(error = %e, cookie, "removing a splice map entry"),
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// SO_COOKIE: the id the kernel programs know a socket by (bpf_get_socket_cookie).
pub fn socket_cookie(s: &impl AsRawFd) -> Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a u64 buffer with its length.
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading SO_COOKIE");
    }
    Ok(cookie)
}
