//! Fixtures shared by the identity and tls tests.

use std::{os::unix::fs::OpenOptionsExt, path::Path, sync::Arc, time::SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::{validity, Ca, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};

pub(crate) const RSA2048_KEY: &str = include_str!("testdata/rsa2048-key.pem");
pub(crate) const RSA2048_KEY_PKCS8: &str = include_str!("testdata/rsa2048-key-pkcs8.pem");
pub(crate) const RSA2048_ROOT: &str = include_str!("testdata/rsa2048-root.pem");
pub(crate) const RSA1024_KEY: &str = include_str!("testdata/rsa1024-key.pem");
pub(crate) const RSA1024_ROOT: &str = include_str!("testdata/rsa1024-root.pem");
pub(crate) const RSA_INTERMEDIATE_KEY: &str = include_str!("testdata/rsa-intermediate-key.pem");
pub(crate) const RSA_INTERMEDIATE_CERT: &str = include_str!("testdata/rsa-intermediate-cert.pem");
pub(crate) const EC_SEC1_KEY: &str = include_str!("testdata/ec-sec1-key.pem");
pub(crate) const EC_SEC1_ROOT: &str = include_str!("testdata/ec-sec1-root.pem");

/// A fresh built-in CA, loaded; keep the directory alive while using it.
pub(crate) fn new_ca() -> (tempfile::TempDir, Arc<Ca>) {
    let dir = tempfile::tempdir().unwrap();
    Ca::init(dir.path()).unwrap();
    let ca = Ca::load(dir.path()).unwrap();
    (dir, Arc::new(ca))
}

/// Writes a CA directory from PEM strings; `chain` is cert-chain.pem.
pub(crate) fn write_ca_dir(dir: &Path, root: &str, key: &str, chain: Option<&str>) {
    std::fs::write(dir.join(ROOT_CERT_FILE), root).unwrap();
    // Private, as Ca::load requires of a key.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join(CA_KEY_FILE))
        .unwrap();
    std::io::Write::write_all(&mut file, key.as_bytes()).unwrap();
    if let Some(chain) = chain {
        std::fs::write(dir.join(CERT_CHAIN_FILE), chain).unwrap();
    }
}

/// A CA certificate made with rcgen, valid over the given window.
pub(crate) fn rcgen_ca(
    name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
    signer: Option<(&rcgen::Certificate, &KeyPair)>,
) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity::set_validity(&mut params, validity::truncate_to_secs(not_before), validity::truncate_to_secs(not_after));
    let cert = match signer {
        None => params.self_signed(&key).unwrap(),
        Some((issuer, issuer_key)) => params.signed_by(&key, issuer, issuer_key).unwrap(),
    };
    (cert, key)
}
