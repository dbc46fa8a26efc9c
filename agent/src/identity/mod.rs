//! Workload identity: SPIFFE IDs, the CA that signs them into certificates,
//! the cache that keeps every local workload's certificate fresh, and
//! Istio's certificate API on both ends: the agent's CSR client (`client`)
//! and the CA service that holds the key (`service`).

mod ca;
mod cache;
mod chain;
pub mod client;
pub mod csr;
mod error;
mod files;
mod keys;
pub mod proto;
mod remote;
pub mod service;
mod spiffe;
mod validity;
mod workload;

#[cfg(test)]
mod ca_tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use ca::{Ca, SignedLeaf, CA_KEY_FILE, CERT_CHAIN_FILE, CLOCK_SKEW, ROOT_CERT_FILE};
pub use cache::CertCache;
pub use client::{CaClient, ClientSettings};
pub use error::{CaError, MIN_RSA_BITS};
pub use remote::CaCollector;
pub use spiffe::{validate_trust_domain, CertIdError, SpiffeId, SpiffeIdError};
pub use workload::WorkloadCert;

/// The certificate cache and the roots peers must chain to, for the
/// config's `ca:` section: the local CA in `ca.dir`, or the CA service at
/// `ca.address` (then no CA key is read; keys are made here, per workload).
/// Call inside the agent's (multi-thread) tokio runtime.
pub fn open_certs(
    section: &crate::state::CaSection,
) -> anyhow::Result<(std::sync::Arc<CertCache>, std::sync::Arc<rustls::RootCertStore>)> {
    use anyhow::Context;
    use std::sync::Arc;
    match section.source() {
        Some(crate::state::CaSource::Local { dir }) => {
            let ca = Ca::load(&dir).with_context(|| format!("loading the CA from {}", dir.display()))?;
            let roots = Arc::new(ca.roots());
            Ok((Arc::new(CertCache::new(Arc::new(ca), section.cert_ttl)), roots))
        }
        Some(crate::state::CaSource::Remote { address, root_cert, token_file }) => {
            let settings = ClientSettings { address: address.clone(), root_cert, token_file, ttl: section.cert_ttl };
            let client = CaClient::new(&settings).with_context(|| format!("setting up the CA client for {address}"))?;
            let roots = Arc::new(client.roots());
            tracing::info!(ca = client.address(), "workload certificates come from a CA service; no CA key here");
            Ok((Arc::new(CertCache::remote(Arc::new(client), section.cert_ttl)), roots))
        }
        None => anyhow::bail!("the ca section names no complete certificate source (set ca.dir or ca.address)"),
    }
}
