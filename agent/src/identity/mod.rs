//! Workload identity: SPIFFE IDs, the CA that signs them into certificates,
//! and the cache that keeps every local workload's certificate fresh.

mod ca;
mod cache;
mod chain;
mod der;
mod error;
mod files;
mod keys;
mod spiffe;
mod validity;
mod workload;

#[cfg(test)]
mod ca_tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use ca::{Ca, CA_KEY_FILE, CERT_CHAIN_FILE, CLOCK_SKEW, ROOT_CERT_FILE};
pub use cache::CertCache;
pub use error::{CaError, MIN_RSA_BITS};
pub use spiffe::{validate_trust_domain, CertIdError, SpiffeId, SpiffeIdError};
pub use workload::WorkloadCert;
