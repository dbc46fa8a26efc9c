//! Workload certificates, issued on first use and renewed at half-life.
//!
//! Two sources: the local CA (`ca.dir`: this process holds the CA key and
//! signs in `get`), or a CA service (`ca.address`: keys are made here, CSRs
//! go to the service, see `remote`).
//!
//! Rotation never touches a live connection: a TLS session keeps the
//! certificate it was established with, and the resolvers in `tls` ask this
//! cache again on every handshake, so new sessions get the fresh one.
//!
//! With `ca.dir`, the directory is looked at again on every renewal tick
//! ([`CertCache::check_dir`]); when its files change, the CA is loaded anew:
//!
//! - a CA whose leaves the running agent's peers accept (a new signing
//!   certificate or intermediate under a root the agents were started
//!   with) replaces the old one at once, and the cached leaves are dropped
//!   so that every workload gets one from it at its next handshake;
//! - a CA that cannot be loaded (files missing, half written, a key that
//!   does not match), or one signing under a root the agent was not started
//!   with (peers check certificates against the roots loaded at start, so
//!   its leaves would be refused until the agents restart), is not used:
//!   the CA held so far keeps signing, the certificates issued so far stay,
//!   and `sluice_ca_source_healthy` goes to 0, with the reason in
//!   `/config_dump` (`ca.lastError`) and one log line per distinct reason.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    client::verify_server_cert_signed_by_trust_anchor,
    pki_types::{CertificateDer, UnixTime},
    server::ParsedCertificate,
    RootCertStore,
};

use super::{
    remote::{CaCollector, Remote},
    Ca, CaClient, CaError, SpiffeId, WorkloadCert, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE,
};

pub struct CertCache {
    source: Source,
    ttl: Duration,
}

enum Source {
    Local { ca: RwLock<Arc<Ca>>, certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>, dir: Arc<LocalSource> },
    Remote(Arc<Remote>),
}

/// How the `ca.dir` source is doing: what was last seen in the directory,
/// whether it could be used, and the reloads so far.
#[derive(Debug)]
pub struct LocalSource {
    /// The roots peers' certificates are checked against: those of the CA
    /// loaded at start (the TLS configs hold them). A new CA is used only if
    /// its leaves verify up to one of them.
    trusted: RootCertStore,
    healthy: AtomicBool,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    dir: Option<PathBuf>,
    /// Each CA file's identity when last loaded (or tried).
    files: Option<Vec<Option<FileStamp>>>,
    /// Why the directory cannot be used now; `None` when it can.
    error: Option<String>,
    error_at: Option<SystemTime>,
    reloaded_at: Option<SystemTime>,
}

/// Device, inode, size and modification time (ns): any rewrite, rename or
/// Kubernetes secret update (a new `..data` symlink target) changes one.
type FileStamp = (u64, u64, u64, i64, i64);

fn stamp(dir: &Path) -> Vec<Option<FileStamp>> {
    [ROOT_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).ok().map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())))
        .collect()
}

/// The certificate that signs `ca`'s leaves: the first of `cert-chain.pem`,
/// else the root.
fn signer(ca: &Ca) -> Option<&CertificateDer<'static>> {
    ca.intermediates().first().or_else(|| ca.root_certs().first())
}

/// Whether a leaf `ca` issues verifies up to `trusted`, as a peer of this
/// agent would check it.
fn accepted_by(ca: &Ca, trusted: &RootCertStore) -> Result<(), String> {
    let probe = SpiffeId::new("reload.sluice.invalid", "sluice", "reload").map_err(|e| e.to_string())?;
    let leaf =
        ca.issue(&probe, Duration::from_secs(300)).map_err(|e| format!("cannot sign a test certificate: {e}"))?;
    let end_entity = ParsedCertificate::try_from(&leaf.chain[0]).map_err(|e| e.to_string())?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    verify_server_cert_signed_by_trust_anchor(&end_entity, trusted, &leaf.chain[1..], UnixTime::now(), algs.all)
        .map_err(|e| e.to_string())
}

impl CertCache {
    /// Signs locally with `ca`; its roots are the ones peers are checked
    /// against (see [`CertCache::check_dir`]).
    pub fn new(ca: Arc<Ca>, ttl: Duration) -> Self {
        let dir = Arc::new(LocalSource {
            trusted: ca.roots(),
            healthy: AtomicBool::new(true),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            seen: Mutex::default(),
        });
        Self { source: Source::Local { ca: RwLock::new(ca), certs: RwLock::new(HashMap::new()), dir }, ttl }
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
            Source::Local { ca, certs, .. } => (read(ca).clone(), certs),
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

    /// `ca.dir`: looks at the CA files in `dir` and, if they changed since
    /// the last look, loads them and uses the new CA when peers accept its
    /// leaves (see the module doc). Cheap when nothing changed (three
    /// `stat`s); a no-op with a CA service.
    pub fn check_dir(&self, dir: &Path) {
        let Source::Local { ca, certs, dir: source } = &self.source else { return };
        let files = stamp(dir);
        let mut seen = lock(&source.seen);
        if seen.dir.as_deref() == Some(dir) && seen.files.as_ref() == Some(&files) {
            return;
        }
        // The first look only confirms the CA loaded at start: not a reload.
        let first = seen.files.is_none();
        seen.dir = Some(dir.to_owned());
        seen.files = Some(files);
        let loaded =
            Ca::load(dir).map_err(|e| e.to_string()).and_then(|new| match accepted_by(&new, &source.trusted) {
                Ok(()) => Ok(new),
                Err(why) => Err(format!(
                    "the CA in {} signs under a root this agent was not started with, so peers would refuse its \
                 certificates ({why}); keeping the CA loaded before: restart the agents to trust the new root",
                    dir.display()
                )),
            });
        let now = SystemTime::now();
        match loaded {
            Ok(new) => {
                let new = Arc::new(new);
                let old = std::mem::replace(&mut *write(ca), new.clone());
                let changed = signer(&old) != signer(&new);
                if changed {
                    // Issued again at the next handshake or renewal tick.
                    write(certs).clear();
                    tracing::info!(dir = %dir.display(), ?new, "the CA changed; new certificates come from it");
                }
                if seen.error.take().is_some() {
                    tracing::info!(dir = %dir.display(), "the CA directory is usable again");
                }
                if !first {
                    seen.reloaded_at = Some(now);
                    source.reloads_ok.fetch_add(1, Ordering::Relaxed);
                }
                source.healthy.store(true, Ordering::Relaxed);
            }
            Err(why) => {
                if seen.error.as_ref() != Some(&why) {
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %why,
                        "the CA directory cannot be used; the CA loaded before keeps signing and issued certificates stay"
                    );
                }
                seen.error = Some(why);
                seen.error_at = Some(now);
                source.reloads_failed.fetch_add(1, Ordering::Relaxed);
                source.healthy.store(false, Ordering::Relaxed);
            }
        }
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

    /// The local CA signing now, when this cache signs itself.
    pub fn ca(&self) -> Option<Arc<Ca>> {
        match &self.source {
            Source::Local { ca, .. } => Some(read(ca).clone()),
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
            Source::Local { ca, dir, .. } => {
                let seen = lock(&dir.seen);
                let ca = read(ca).clone();
                serde_json::json!({
                    "mode": "local",
                    "certTtl": format!("{:?}", self.ttl),
                    "dir": seen.dir,
                    "healthy": dir.healthy.load(Ordering::Relaxed),
                    "reloads": {
                        "ok": dir.reloads_ok.load(Ordering::Relaxed),
                        "failed": dir.reloads_failed.load(Ordering::Relaxed),
                    },
                    "lastReload": seen.reloaded_at.map(unix),
                    "lastError": seen.error,
                    "lastErrorAt": seen.error.as_ref().and(seen.error_at).map(unix),
                    "signer": signer(&ca).and_then(|c| subject(c)),
                    "roots": ca.root_certs().len(),
                    "intermediates": ca.intermediates().len(),
                })
            }
            Source::Remote(remote) => {
                let mut dump = remote.dump();
                dump["certTtl"] = format!("{:?}", self.ttl).into();
                dump
            }
        }
    }

    /// The CA source's metrics for the agent's registry: requests to the
    /// CA service, or the `ca.dir` health and reloads.
    pub fn collector(&self) -> Option<CertCollector> {
        match &self.source {
            Source::Local { dir, .. } => Some(CertCollector::Local(dir.clone())),
            Source::Remote(remote) => Some(CertCollector::Remote(CaCollector(remote.stats.clone()))),
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some(parsed.subject().to_string())
}

/// The CA source's metrics: with a CA service `sluice_ca_requests_total`
/// and `sluice_ca_consecutive_failures`; with `ca.dir`
/// `sluice_ca_source_healthy` (the alert) and `sluice_ca_reloads_total`.
#[derive(Debug)]
pub enum CertCollector {
    Remote(CaCollector),
    Local(Arc<LocalSource>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl prometheus_client::collector::Collector for CertCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
        };
        let source = match self {
            CertCollector::Remote(remote) => return remote.encode(encoder),
            CertCollector::Local(source) => source,
        };
        let gauge = encoder.encode_descriptor(
            "sluice_ca_source_healthy",
            "1 while the CA directory (ca.dir) was usable at the last look: files present, loadable, and signing \
             under a root the agent's peers accept; 0 while not (the CA loaded before keeps signing)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(source.healthy.load(Ordering::Relaxed))).encode(gauge)?;
        let mut family = encoder.encode_descriptor(
            "sluice_ca_reloads",
            "Loads of the CA directory after its files changed, by result (error: not used, see ca.lastError)",
            None,
            MetricType::Counter,
        )?;
        for (result, value) in [("ok", &source.reloads_ok), ("error", &source.reloads_failed)] {
            ConstCounter::new(value.load(Ordering::Relaxed)).encode(family.encode_family(&ResultLabel { result })?)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// The map and the CA slot are consistent after any panic (each update is
// one insert, remove or swap), so a poisoned lock is safe to keep using.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
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

    fn health(cache: &CertCache) -> (bool, u64, u64, Option<String>) {
        let Source::Local { dir, .. } = &cache.source else { panic!("local") };
        let error = lock(&dir.seen).error.clone();
        (
            dir.healthy.load(Ordering::Relaxed),
            dir.reloads_ok.load(Ordering::Relaxed),
            dir.reloads_failed.load(Ordering::Relaxed),
            error,
        )
    }

    /// The files of a CA rooted at `root`, signing with `signer`'s key (and
    /// its certificate as cert-chain.pem when it is not the root).
    fn write_dir(
        dir: &Path,
        roots: &[&rcgen::Certificate],
        signer: (&rcgen::Certificate, &rcgen::KeyPair),
        root_signs: bool,
    ) {
        let roots_pem: String = roots.iter().map(|c| c.pem()).collect();
        let chain = (!root_signs).then(|| format!("{}{}", signer.0.pem(), roots[roots.len() - 1].pem()));
        for f in [ROOT_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        testutil::write_ca_dir(dir, &roots_pem, &signer.1.serialize_pem(), chain.as_deref());
    }

    #[test]
    fn ca_dir_rotation_under_the_same_root_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let (root, root_key) =
            testutil::rcgen_ca("root 1", now - Duration::from_secs(60), now + Duration::from_secs(86400), None);
        write_dir(dir.path(), &[&root], (&root, &root_key), true);
        let cache = CertCache::new(Arc::new(Ca::load(dir.path()).unwrap()), Duration::from_secs(3600));
        cache.check_dir(dir.path());
        assert_eq!(health(&cache), (true, 0, 0, None), "the first look confirms the CA loaded at start");
        let first = cache.get(&id("a")).unwrap();
        assert_eq!(first.chain.len(), 1, "signed by the root itself");

        let (inter, inter_key) = testutil::rcgen_ca(
            "intermediate 1",
            now - Duration::from_secs(60),
            now + Duration::from_secs(86400),
            Some((&root, &root_key)),
        );
        write_dir(dir.path(), &[&root], (&inter, &inter_key), false);
        cache.check_dir(dir.path());
        assert_eq!(health(&cache), (true, 1, 0, None));
        let second = cache.get(&id("a")).unwrap();
        assert_eq!(second.chain.len(), 2, "a leaf of the new intermediate, issued at once");
        assert_eq!(second.chain[1].as_ref(), inter.der().as_ref());
        cache.check_dir(dir.path());
        assert_eq!(health(&cache).1, 1, "unchanged files are not loaded again");
    }

    #[test]
    fn ca_dir_with_an_untrusted_root_or_removed_keeps_the_ca_and_raises_the_alert() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let life = (now - Duration::from_secs(60), now + Duration::from_secs(86400));
        let (root, root_key) = testutil::rcgen_ca("root 1", life.0, life.1, None);
        write_dir(dir.path(), &[&root], (&root, &root_key), true);
        let cache = CertCache::new(Arc::new(Ca::load(dir.path()).unwrap()), Duration::from_secs(2));
        cache.check_dir(dir.path());
        let first = cache.get(&id("a")).unwrap();

        // A new root the agent was not started with, even listed beside the old.
        let (root2, root2_key) = testutil::rcgen_ca("root 2", life.0, life.1, None);
        write_dir(dir.path(), &[&root2, &root], (&root2, &root2_key), true);
        cache.check_dir(dir.path());
        let (healthy, ok, failed, error) = health(&cache);
        assert!(!healthy && ok == 0 && failed == 1, "{:?}", health(&cache));
        assert!(error.unwrap_or_default().contains("restart the agents"), "the reason names the restart");
        std::thread::sleep(
            first.refresh_at().duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50),
        );
        let renewed = cache.get(&id("a")).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed), "renewed past half-life");
        assert_eq!(renewed.chain.len(), 1);
        let parsed = ParsedCertificate::try_from(&renewed.chain[0]).unwrap();
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let mut old_root = RootCertStore::empty();
        old_root.add(root.der().clone()).unwrap();
        verify_server_cert_signed_by_trust_anchor(&parsed, &old_root, &[], UnixTime::now(), algs.all)
            .expect("still signed by the CA loaded at start");

        // Removed: the CA held keeps signing, the alert stays up.
        for f in [ROOT_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        cache.check_dir(dir.path());
        let (healthy, _, failed, error) = health(&cache);
        assert!(!healthy && failed == 2);
        assert!(error.unwrap_or_default().contains(ROOT_CERT_FILE), "the reason names the missing file");
        assert!(cache.get(&id("b")).is_ok(), "a new workload still gets a certificate");

        // Back: healthy again, nothing else changed.
        write_dir(dir.path(), &[&root], (&root, &root_key), true);
        cache.check_dir(dir.path());
        assert_eq!(health(&cache), (true, 1, 2, None));
        let dump = cache.dump();
        assert_eq!(dump["healthy"], true, "{dump}");
        assert_eq!(dump["reloads"]["failed"], 2, "{dump}");
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
