//! Workload certificates, issued on first use and renewed at half-life.
//!
//! Two sources: the local CA (`ca.dir`: this process holds the CA key and
//! signs in `get`), or a CA service (`ca.address`: keys are made here, CSRs
//! go to the service, see `remote`).
//!
//! Rotation never touches a live connection: a TLS session keeps the
//! certificate it was established with, and the resolvers in `tls` ask this
//! cache again on every handshake, so new sessions get the fresh one.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use super::{
    remote::{CaCollector, Remote},
    Ca, CaClient, CaError, SpiffeId, WorkloadCert,
};

pub struct CertCache {
    source: Source,
    ttl: Duration,
}

enum Source {
    Local { ca: Arc<Ca>, certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>> },
    Remote(Arc<Remote>),
}

impl CertCache {
    /// Signs locally with `ca`.
    pub fn new(ca: Arc<Ca>, ttl: Duration) -> Self {
        Self { source: Source::Local { ca, certs: RwLock::new(HashMap::new()) }, ttl }
    }

    /// Asks the CA service behind `client`; starts the renewal driver on
    /// the current tokio runtime (a multi-thread one: a first `get` for an
    /// identity blocks its thread until the CA answers).
    pub fn remote(client: Arc<CaClient>, ttl: Duration) -> Self {
        Self { source: Source::Remote(Remote::start(client)), ttl }
    }

    /// The current certificate for `id`, issuing one if there is none or the
    /// cached one is past its half-life (remote: renewed in the background).
    ///
    /// If renewal fails while the old certificate is still valid, the old one
    /// is returned: a CA hiccup should shorten nobody's connectivity.
    pub fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CaError> {
        let (ca, certs) = match &self.source {
            Source::Remote(remote) => return remote.get(id),
            Source::Local { ca, certs } => (ca, certs),
        };
        let now = SystemTime::now();
        let current = read(certs).get(id).cloned();
        if let Some(cert) = &current {
            if now < cert.refresh_at() {
                return Ok(cert.clone());
            }
        }
        // Signing happens outside the lock so that one slow issuance (RSA CA
        // keys take milliseconds) does not stall handshakes of every other
        // workload. Racing callers may each issue; the later-expiring wins.
        let fresh = match ca.issue(id, self.ttl) {
            Ok(fresh) => Arc::new(fresh),
            Err(e) => match current {
                Some(cert) if !cert.is_expired_at(now) => {
                    tracing::warn!(%id, error = %e, "certificate renewal failed; keeping the current one until it expires");
                    return Ok(cert);
                }
                _ => return Err(e),
            },
        };
        tracing::debug!(%id, not_after = ?fresh.not_after, "issued workload certificate");
        let mut certs = write(certs);
        let slot = certs.entry(id.clone()).or_insert_with(|| fresh.clone());
        if slot.not_after < fresh.not_after {
            *slot = fresh;
        }
        Ok(slot.clone())
    }

    /// Drops the certificate of a workload that has left the node. A `get`
    /// racing with this may re-add it; that costs one certificate, not trust.
    pub fn forget(&self, id: &SpiffeId) -> bool {
        match &self.source {
            Source::Local { certs, .. } => write(certs).remove(id).is_some(),
            Source::Remote(remote) => remote.forget(id),
        }
    }

    /// The cached certificate, without issuing or renewing one.
    pub fn peek(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        match &self.source {
            Source::Local { certs, .. } => read(certs).get(id).cloned(),
            Source::Remote(remote) => remote.peek(id),
        }
    }

    /// Identities with a cached certificate, sorted for stable output.
    pub fn ids(&self) -> Vec<SpiffeId> {
        match &self.source {
            Source::Local { certs, .. } => {
                let mut ids: Vec<_> = read(certs).keys().cloned().collect();
                ids.sort();
                ids
            }
            Source::Remote(remote) => remote.ids(),
        }
    }

    /// The local CA, when this cache signs itself.
    pub fn ca(&self) -> Option<&Arc<Ca>> {
        match &self.source {
            Source::Local { ca, .. } => Some(ca),
            Source::Remote(_) => None,
        }
    }

    /// The CA service client, when certificates come from one.
    pub fn client(&self) -> Option<&Arc<CaClient>> {
        match &self.source {
            Source::Local { .. } => None,
            Source::Remote(remote) => Some(remote.client()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Where certificates come from and how that is going, for
    /// `/config_dump`: the CA service's address, requests ok and failed,
    /// the last error, and each identity's expiry and renewal time.
    pub fn dump(&self) -> serde_json::Value {
        match &self.source {
            Source::Local { .. } => serde_json::json!({ "mode": "local", "certTtl": format!("{:?}", self.ttl) }),
            Source::Remote(remote) => {
                let mut dump = remote.dump();
                dump["certTtl"] = format!("{:?}", self.ttl).into();
                dump
            }
        }
    }

    /// The CA request metrics (remote only) for the agent's registry.
    pub fn collector(&self) -> Option<CaCollector> {
        match &self.source {
            Source::Local { .. } => None,
            Source::Remote(remote) => Some(CaCollector(remote.stats.clone())),
        }
    }
}

// The map is consistent after any panic (each update is one insert or
// remove), so a poisoned lock is safe to keep using.
fn read(
    certs: &RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>,
) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
    certs.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(
    certs: &RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>,
) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
    certs.write().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache").field("ttl", &self.ttl).field("certs", &self.ids().len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testutil;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn issues_once_and_reuses_until_half_life() {
        let (_dir, ca) = testutil::new_ca();
        let cache = CertCache::new(ca, Duration::from_secs(3600));
        let first = cache.get(&id("a")).unwrap();
        let again = cache.get(&id("a")).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.id, id("a"));
        assert_eq!(cache.ids(), vec![id("a")]);
    }

    #[test]
    fn reissues_after_half_life() {
        let (_dir, ca) = testutil::new_ca();
        let cache = CertCache::new(ca, Duration::from_secs(2));
        let first = cache.get(&id("a")).unwrap();
        std::thread::sleep(
            first.refresh_at().duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50),
        );
        let second = cache.get(&id("a")).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.chain[0], second.chain[0]);
    }

    #[test]
    fn forget_drops_only_that_workload() {
        let (_dir, ca) = testutil::new_ca();
        let cache = CertCache::new(ca, Duration::from_secs(3600));
        cache.get(&id("a")).unwrap();
        cache.get(&id("b")).unwrap();
        assert!(cache.forget(&id("a")));
        assert!(!cache.forget(&id("a")));
        assert_eq!(cache.ids(), vec![id("b")]);
    }

    #[test]
    fn is_shareable_across_threads() {
        let (_dir, ca) = testutil::new_ca();
        let cache = Arc::new(CertCache::new(ca, Duration::from_secs(3600)));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let cache = cache.clone();
                std::thread::spawn(move || cache.get(&id(&format!("sa{}", i % 2))).map(|c| c.id.clone()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        assert_eq!(cache.ids().len(), 2);
    }
}
