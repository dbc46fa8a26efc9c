//! Certificate resolvers backed by the cert cache. They ask the cache on
//! every handshake, which is what makes rotation hitless: established
//! sessions keep the certificate they started with, new ones get the fresh
//! one, and no config has to be rebuilt or swapped.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::{
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    SignatureScheme,
};

use crate::identity::{CertCache, SpiffeId, WorkloadCert};

/// The current certificate of one identity as a rustls `CertifiedKey`.
#[derive(Debug)]
struct CurrentKey {
    cache: Arc<CertCache>,
    id: SpiffeId,
    provider: Arc<CryptoProvider>,
    /// Parsing the private key costs more than the handshake's lookup, so
    /// the last conversion is kept until the cache hands out a new cert.
    last: Mutex<Option<(Arc<WorkloadCert>, Arc<CertifiedKey>)>>,
}

impl CurrentKey {
    fn new(cache: Arc<CertCache>, id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self { cache, id, provider, last: Mutex::new(None) }
    }

    /// `None` fails the handshake; rustls has no way to carry our reason, so
    /// it is logged here.
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let cert = match self.cache.get(&self.id) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "no certificate for TLS handshake");
                return None;
            }
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, key)) = last.as_ref() {
            if Arc::ptr_eq(seen, &cert) {
                return Some(key.clone());
            }
        }
        match CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &self.provider) {
            Ok(key) => {
                let key = Arc::new(key);
                *last = Some((cert, key.clone()));
                Some(key)
            }
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "workload certificate unusable for TLS");
                None
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct ServerResolver(CurrentKey);

impl ServerResolver {
    pub(crate) fn new(cache: Arc<CertCache>, id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self(CurrentKey::new(cache, id, provider))
    }
}

impl ResolvesServerCert for ServerResolver {
    // No SNI in HBONE: the listener is per workload, so the identity is
    // known before the ClientHello arrives.
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get()
    }
}

#[derive(Debug)]
pub(crate) struct ClientResolver(CurrentKey);

impl ClientResolver {
    pub(crate) fn new(cache: Arc<CertCache>, id: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        Self(CurrentKey::new(cache, id, provider))
    }
}

impl ResolvesClientCert for ClientResolver {
    // Root hints and schemes are not consulted: leaves are always ECDSA
    // P-256, which every TLS 1.3 peer accepts, and there is one identity.
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
