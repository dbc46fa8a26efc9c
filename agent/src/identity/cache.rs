//! Workload certificates, issued on first use and renewed at half-life.
//!
//! Rotation never touches a live connection: a TLS session keeps the
//! certificate it was established with, and the resolvers in `tls` ask this
//! cache again on every handshake, so new sessions get the fresh one.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use super::{Ca, CaError, SpiffeId, WorkloadCert};

pub struct CertCache {
    ca: Arc<Ca>,
    ttl: Duration,
    certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>,
}

impl CertCache {
    pub fn new(ca: Arc<Ca>, ttl: Duration) -> Self {
        Self { ca, ttl, certs: RwLock::new(HashMap::new()) }
    }

    /// The current certificate for `id`, issuing one if there is none or the
    /// cached one is past its half-life.
    ///
    /// If renewal fails while the old certificate is still valid, the old one
    /// is returned: a CA hiccup should shorten nobody's connectivity.
    pub fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CaError> {
        let now = SystemTime::now();
        let current = self.read().get(id).cloned();
        if let Some(cert) = &current {
            if now < cert.refresh_at() {
                return Ok(cert.clone());
            }
        }
        // Signing happens outside the lock so that one slow issuance (RSA CA
        // keys take milliseconds) does not stall handshakes of every other
        // workload. Racing callers may each issue; the later-expiring wins.
        let fresh = match self.ca.issue(id, self.ttl) {
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
        let mut certs = self.write();
        let slot = certs.entry(id.clone()).or_insert_with(|| fresh.clone());
        if slot.not_after < fresh.not_after {
            *slot = fresh;
        }
        Ok(slot.clone())
    }

    /// Drops the certificate of a workload that has left the node. A `get`
    /// racing with this may re-add it; that costs one certificate, not trust.
    pub fn forget(&self, id: &SpiffeId) -> bool {
        self.write().remove(id).is_some()
    }

    /// The cached certificate, without issuing or renewing one.
    pub fn peek(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.read().get(id).cloned()
    }

    /// Identities with a cached certificate, sorted for stable output.
    pub fn ids(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.read().keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    // The map is consistent after any panic (each update is one insert or
    // remove), so a poisoned lock is safe to keep using.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
        self.certs.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
        self.certs.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache").field("ttl", &self.ttl).field("certs", &self.read().len()).finish_non_exhaustive()
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
