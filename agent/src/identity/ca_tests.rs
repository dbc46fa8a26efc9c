//! CA loading and issuance against real files: the built-in root, and plug-in
//! CAs made with openssl (see testdata/README.md).

use std::{
    os::unix::fs::PermissionsExt,
    time::{Duration, SystemTime},
};

use rustls::{
    client::verify_server_cert_signed_by_trust_anchor,
    pki_types::{pem::PemObject, CertificateDer, UnixTime},
    server::ParsedCertificate,
};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{testutil::*, *};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn id() -> SpiffeId {
    "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
}

fn verify(ca: &Ca, cert: &WorkloadCert) -> Result<(), rustls::Error> {
    let leaf = ParsedCertificate::try_from(&cert.chain[0])?;
    verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &ca.roots(),
        &cert.chain[1..],
        UnixTime::now(),
        rustls::crypto::ring::default_provider().signature_verification_algorithms.all,
    )
}

fn load_err(root: &str, key: &str, chain: Option<&str>) -> CaError {
    let dir = tempfile::tempdir().unwrap();
    write_ca_dir(dir.path(), root, key, chain);
    Ca::load(dir.path()).unwrap_err()
}

fn load_ok(root: &str, key: &str, chain: Option<&str>) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    write_ca_dir(dir.path(), root, key, chain);
    Ca::load(dir.path()).unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn assert_names(err: &CaError, file: &str) {
    assert!(err.to_string().contains(file), "error should name {file}: {err}");
}

#[test]
fn init_then_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    Ca::init(dir.path()).unwrap();
    let key_mode = std::fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let ca = Ca::load(dir.path()).unwrap();
    let on_disk = std::fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
    let root = CertificateDer::from_pem_slice(&on_disk).unwrap();
    assert_eq!(CertificateDer::from_pem_slice(ca.root_pem().as_bytes()).unwrap(), root);

    let before = SystemTime::now();
    let cert = ca.issue(&id(), Duration::from_secs(3600)).unwrap();
    verify(&ca, &cert).unwrap();
    assert_eq!(cert.chain.len(), 1, "the root is not sent");
    assert_eq!(SpiffeId::from_cert_der(&cert.chain[0]).unwrap(), id());
    assert!(cert.not_before <= before - CLOCK_SKEW + Duration::from_secs(1));
    assert!(cert.not_before >= before - CLOCK_SKEW - Duration::from_secs(2));
    let life = cert.not_after.duration_since(before).unwrap();
    assert!(life > Duration::from_secs(3597) && life <= Duration::from_secs(3600), "{life:?}");
    let half = cert.refresh_at().duration_since(before).unwrap();
    assert!(half > Duration::from_secs(1797) && half <= Duration::from_secs(1800), "{half:?}");
}

#[test]
fn issued_leaf_has_the_hbone_shape() {
    let (_dir, ca) = new_ca();
    let cert = ca.issue(&id(), Duration::from_secs(3600)).unwrap();
    let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!leaf.is_ca());
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "an empty subject requires a critical SAN");
    assert_eq!(
        san.value.general_names,
        vec![x509_parser::extensions::GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")],
        "exactly the SPIFFE ID, as one URI"
    );
    assert_eq!(leaf.subject().iter().count(), 0);
    // Same shape of time as the struct reports.
    assert_eq!(
        SystemTime::UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp() as u64),
        cert.not_after
    );
    // The key is a usable PKCS#8 key for rustls.
    rustls::crypto::ring::sign::any_supported_type(&cert.key).unwrap();
}

/// `ca.dir` and `sluice ca serve --dir` both load through here: a key that
/// group or others may read stops the start, naming the file and the mode.
#[test]
fn load_refuses_a_key_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    Ca::init(dir.path()).unwrap();
    let key = dir.path().join(CA_KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(matches!(err, CaError::KeyExposed { mode: 0o644, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{} has mode 0644: readable by group/others; chmod 600 {}", key.display(), key.display())
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    assert!(Ca::load(dir.path()).unwrap_err().to_string().contains("mode 0604: readable by others"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    Ca::load(dir.path()).unwrap();
}

#[test]
fn init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    Ca::init(dir.path()).unwrap();
    let root_before = std::fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap();
    let err = Ca::init(dir.path()).unwrap_err();
    assert!(matches!(err, CaError::Exists { .. }), "{err}");
    assert_names(&err, ROOT_CERT_FILE);
    assert_eq!(std::fs::read(dir.path().join(ROOT_CERT_FILE)).unwrap(), root_before);

    let only_key = tempfile::tempdir().unwrap();
    std::fs::write(only_key.path().join(CA_KEY_FILE), "x").unwrap();
    let err = Ca::init(only_key.path()).unwrap_err();
    assert_names(&err, CA_KEY_FILE);
    assert!(!only_key.path().join(ROOT_CERT_FILE).exists());
}

#[test]
fn init_creates_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b");
    Ca::init(&nested).unwrap();
    Ca::load(&nested).unwrap();
    let mode = std::fs::metadata(&nested).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn load_names_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(matches!(err, CaError::Missing { .. }), "{err}");
    assert_names(&err, ROOT_CERT_FILE);
    std::fs::write(dir.path().join(ROOT_CERT_FILE), RSA2048_ROOT).unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(matches!(err, CaError::Missing { .. }), "{err}");
    assert_names(&err, CA_KEY_FILE);
}

#[test]
fn load_names_unparsable_files() {
    let err = load_err("not a certificate\n", RSA2048_KEY, None);
    assert!(matches!(err, CaError::Invalid { .. }), "{err}");
    assert_names(&err, ROOT_CERT_FILE);

    let err = load_err(RSA2048_ROOT, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", None);
    assert_names(&err, CA_KEY_FILE);

    let garbled = RSA2048_ROOT.replace('A', "*");
    let err = load_err(&garbled, RSA2048_KEY, None);
    assert_names(&err, ROOT_CERT_FILE);

    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
    let err = load_err(RSA2048_ROOT, encrypted, None);
    assert!(err.to_string().contains("encrypted"), "{err}");
}

#[test]
fn rsa_2048_pkcs1_ca_issues_verifiable_leaves() {
    for key in [RSA2048_KEY, RSA2048_KEY_PKCS8] {
        let ca = load_ok(RSA2048_ROOT, key, None);
        let cert = ca.issue(&id(), Duration::from_secs(600)).unwrap();
        verify(&ca, &cert).unwrap();
    }
}

#[test]
fn ec_sec1_ca_issues_verifiable_leaves() {
    let ca = load_ok(EC_SEC1_ROOT, EC_SEC1_KEY, None);
    verify(&ca, &ca.issue(&id(), Duration::from_secs(600)).unwrap()).unwrap();
}

#[test]
fn rsa_1024_is_refused() {
    let err = load_err(RSA1024_ROOT, RSA1024_KEY, None);
    assert!(matches!(err, CaError::KeyTooSmall { bits: 1024, .. }), "{err}");
    assert!(err.to_string().contains("2048"), "{err}");
    assert_names(&err, ROOT_CERT_FILE);
}

#[test]
fn small_rsa_key_is_named_even_when_the_cert_differs() {
    let err = load_err(RSA2048_ROOT, RSA1024_KEY, None);
    assert!(matches!(err, CaError::KeyTooSmall { bits: 1024, .. }), "{err}");
    assert_names(&err, CA_KEY_FILE);
}

#[test]
fn expired_ca_is_refused() {
    let now = SystemTime::now();
    let (cert, key) = rcgen_ca("expired root", now - 2 * DAY, now - DAY, None);
    let err = load_err(&cert.pem(), &key.serialize_pem(), None);
    assert!(matches!(err, CaError::Expired { .. }), "{err}");
    assert_names(&err, ROOT_CERT_FILE);
    assert!(err.to_string().contains("expired at"), "{err}");
    assert!(err.to_string().contains("expired root"), "{err}");
}

#[test]
fn expired_intermediate_is_refused() {
    let now = SystemTime::now();
    let (root, root_key) = rcgen_ca("root", now - 2 * DAY, now + DAY, None);
    let (int, int_key) = rcgen_ca("old intermediate", now - 2 * DAY, now - DAY, Some((&root, &root_key)));
    let err = load_err(&root.pem(), &int_key.serialize_pem(), Some(&int.pem()));
    assert!(matches!(err, CaError::Expired { .. }), "{err}");
    assert_names(&err, CERT_CHAIN_FILE);
}

#[test]
fn not_yet_valid_ca_is_refused() {
    let now = SystemTime::now();
    let (cert, key) = rcgen_ca("future root", now + DAY, now + 2 * DAY, None);
    let err = load_err(&cert.pem(), &key.serialize_pem(), None);
    assert!(matches!(err, CaError::NotYetValid { .. }), "{err}");
}

#[test]
fn mismatched_key_is_refused() {
    let other_ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let cases = [
        (RSA2048_ROOT, EC_SEC1_KEY),
        (RSA2048_ROOT, RSA_INTERMEDIATE_KEY),
        (EC_SEC1_ROOT, other_ec.as_str()),
        (EC_SEC1_ROOT, RSA2048_KEY),
    ];
    for (root, key) in cases {
        let err = load_err(root, key, None);
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert_names(&err, CA_KEY_FILE);
        assert_names(&err, ROOT_CERT_FILE);
    }
}

#[test]
fn intermediate_chain_is_sent_with_leaves() {
    let chain = format!("{RSA_INTERMEDIATE_CERT}{RSA2048_ROOT}");
    for chain in [chain.as_str(), RSA_INTERMEDIATE_CERT] {
        let ca = load_ok(RSA2048_ROOT, RSA_INTERMEDIATE_KEY, Some(chain));
        let cert = ca.issue(&id(), Duration::from_secs(600)).unwrap();
        let intermediate = CertificateDer::from_pem_slice(RSA_INTERMEDIATE_CERT.as_bytes()).unwrap();
        assert_eq!(cert.chain.len(), 2);
        assert_eq!(cert.chain[1], intermediate);
        verify(&ca, &cert).unwrap();
    }
}

#[test]
fn chain_that_misses_the_root_is_refused() {
    let err = load_err(EC_SEC1_ROOT, RSA_INTERMEDIATE_KEY, Some(RSA_INTERMEDIATE_CERT));
    assert!(err.to_string().contains("which is not in"), "{err}");
    assert_names(&err, CERT_CHAIN_FILE);
}

#[test]
fn key_must_match_the_chain_not_the_root() {
    let err = load_err(RSA2048_ROOT, RSA2048_KEY, Some(RSA_INTERMEDIATE_CERT));
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    assert_names(&err, CERT_CHAIN_FILE);
}

#[test]
fn non_ca_certificate_cannot_sign() {
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["example.com".into()]).unwrap().self_signed(&key).unwrap();
    let err = load_err(&leaf.pem(), &key.serialize_pem(), None);
    assert!(err.to_string().contains("not a CA"), "{err}");
}

#[test]
fn leaves_never_outlive_the_ca() {
    let now = SystemTime::now();
    let (cert, key) = rcgen_ca("short root", now - DAY, now + Duration::from_secs(3600), None);
    let ca = load_ok(&cert.pem(), &key.serialize_pem(), None);
    let leaf = ca.issue(&id(), 30 * DAY).unwrap();
    assert_eq!(leaf.not_after, ca.not_after());
    verify(&ca, &leaf).unwrap();
}

#[test]
fn zero_lifetime_is_an_error() {
    let (_dir, ca) = new_ca();
    let err = ca.issue(&id(), Duration::ZERO).unwrap_err();
    assert!(matches!(err, CaError::Issue { .. }), "{err}");
}

#[test]
fn ca_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Ca>();
    check::<CertCache>();
}
