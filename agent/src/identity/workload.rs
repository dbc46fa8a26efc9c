//! A workload's issued certificate and key.

use std::{fmt, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::SpiffeId;

/// A certificate issued to one workload, ready to hand to rustls.
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf first, then intermediates. The root is left out: peers have it,
    /// and sending it would only cost bytes on every handshake.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8.
    pub key: PrivateKeyDer<'static>,
    /// Backdated from `issued_at` to tolerate peers whose clocks run slow.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the CA signed it; rotation is timed from here, not from the
    /// backdated `not_before`, so that short lifetimes still get their
    /// half-life.
    pub issued_at: SystemTime,
}

impl WorkloadCert {
    /// The half-life point of the certificate's useful life, when the cache
    /// replaces it. Renewing at half-life leaves the other half to ride out
    /// a CA outage.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.issued_at).unwrap_or_default();
        self.issued_at + life / 2
    }

    /// The workload's own certificate (`None` only for a hand-built value
    /// with an empty chain; `Ca::issue` never makes one).
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            issued_at: self.issued_at,
        }
    }
}

impl fmt::Debug for WorkloadCert {
    // Spelled out so that the private key can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}
