//! Shares HBONE connections. Keyed by (source workload, source identity,
//! destination identity, destination address): a connection carries exactly
//! one pair of proven identities, and it was dialled from inside one pod, so
//! it leaves with that pod's address. Two pods of one service account must
//! not share it (as ztunnel keys its pool): the second pod's streams would
//! reach the destination with the first pod's source IP, and die with it.
//! A connection takes up to `MAX_STREAMS_PER_CONN` streams; past that the
//! pool dials another. Connections idle longer than the idle timeout close.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Mutex as AsyncMutex;

use super::client::{Connection, Slot};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source pod's uid: connections are dialled from its netns.
    pub src_workload: String,
    pub src_identity: String,
    pub dst_identity: String,
    pub dst: SocketAddr,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Connection>>,
}

pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Arc<AsyncMutex<Entry>>>>,
    idle_timeout: Duration,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PoolStats {
    pub connections: usize,
    pub active_streams: usize,
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Arc<Pool> {
        let pool = Arc::new(Pool { entries: Mutex::default(), idle_timeout });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout.max(Duration::from_millis(100)) / 2);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.reap();
            }
        });
        pool
    }

    /// A place for one more stream on a connection, dialling one when none
    /// has room. The place is taken under the key's lock, so concurrent
    /// callers never overfill a connection. Dials for one key are
    /// serialized, so a burst of new streams shares one new connection
    /// instead of opening one each.
    pub async fn get<F, Fut, E>(&self, key: &PoolKey, dial: F) -> Result<(Arc<Connection>, Slot), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, E>>,
    {
        let entry = self.entries.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        let mut entry = entry.lock().await;
        entry.conns.retain(|c| !c.is_closed());
        if let Some(found) = entry.conns.iter().find_map(|c| c.reserve().map(|slot| (c.clone(), slot))) {
            return Ok(found);
        }
        let conn = Arc::new(dial().await?);
        entry.conns.push(conn.clone());
        // A new connection has every place free, unless it closed at once.
        match conn.reserve() {
            Some(slot) => Ok((conn, slot)),
            None => Ok((conn.clone(), conn.force_slot())),
        }
    }

    /// Drops closed connections and those idle past the timeout. Dropping
    /// the last handle of an idle connection closes it with GOAWAY.
    pub fn reap(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.idle_timeout;
        entries.retain(|_, entry| {
            let Ok(mut entry) = entry.try_lock() else {
                return true;
            };
            entry.conns.retain(|c| !c.is_closed() && c.idle_since().is_none_or(|t| t.elapsed() < timeout));
            !entry.conns.is_empty()
        });
    }

    pub fn stats(&self) -> PoolStats {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = PoolStats::default();
        for entry in entries.values() {
            if let Ok(entry) = entry.try_lock() {
                stats.connections += entry.conns.len();
                stats.active_streams += entry.conns.iter().map(|c| c.active_streams()).sum::<usize>();
            }
        }
        stats
    }

    /// Drops the connections dialled for `src_workload` (the pod left);
    /// returns how many. Streams still open on them keep running until they
    /// end: the connection closes with its last handle.
    pub fn remove_source(&self, src_workload: &str) -> usize {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = 0;
        entries.retain(|key, entry| {
            if key.src_workload != src_workload {
                return true;
            }
            dropped += entry.try_lock().map(|e| e.conns.len()).unwrap_or(0);
            false
        });
        dropped
    }

    /// Closes every pooled connection (agent shutdown).
    pub fn clear(&self) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
