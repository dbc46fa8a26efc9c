//! The certificate authority that signs workload certificates.
//!
//! The directory layout follows Istio plug-in CAs, so a `cacerts` secret made
//! for istiod can be mounted unchanged:
//!
//! - `root-cert.pem`: the root (or several, during a root rotation); trusted.
//! - `ca-key.pem`: the signing key.
//! - `cert-chain.pem` (optional): the signing certificate first, then any
//!   intermediates up to the root. Without it, the root signs directly.

use std::{
    fmt, fs,
    os::unix::fs::DirBuilderExt,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    client::verify_server_cert_signed_by_trust_anchor,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::ParsedCertificate,
    RootCertStore,
};
use x509_parser::{certificate::X509Certificate, oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME, prelude::FromDer};

use super::{
    chain::{check_can_sign, check_validity, find_anchor, issuer_for, parse, parse_all},
    files, keys,
    validity::{self, display},
    CaError, SpiffeId, WorkloadCert,
};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// How far leaf certificates are backdated, for peers whose clocks run slow.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
const SAN_OID: &[u64] = &[2, 5, 29, 17];

/// A certificate the CA signed, before any private key is attached.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf, then the intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: [u8; 16],
    pub issued_at: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl SignedLeaf {
    /// The serial as the hex string `openssl x509 -serial` prints.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02X}")).collect()
    }
}

/// 128 random bits from the system CSPRNG (through rustls' ring provider),
/// top bit clear so the DER INTEGER stays positive and 16 bytes long.
fn random_serial() -> Result<[u8; 16], String> {
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| "the system random number generator failed".to_string())?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    Ok(serial)
}

pub struct Ca {
    roots: Vec<CertificateDer<'static>>,
    root_store: RootCertStore,
    /// The signing certificate and those above it, excluding the root; this
    /// is the tail of every workload chain.
    intermediates: Vec<CertificateDer<'static>>,
    /// The signing certificate as rcgen needs it: it carries the issuer name
    /// and key identifier written into each leaf.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// A throwaway key that signs only the certificates [`uri_san`] reads
    /// rcgen's SAN encoding back from; never the CA key.
    san_carrier: KeyPair,
    /// The earliest expiry on the path to the root; no leaf outlives it.
    not_after: SystemTime,
}

impl Ca {
    /// Creates a new self-signed ECDSA P-256 root in `dir`. Refuses to touch
    /// a directory that already has a root or key, because replacing a CA
    /// silently breaks trust with every workload holding the old root.
    pub fn init(dir: &Path) -> Result<(), CaError> {
        // Private by default: the directory holds the key. An existing
        // directory keeps whatever mode its owner chose.
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| CaError::io(dir, e))?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for path in [&cert_path, &key_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let generate = |e: rcgen::Error| CaError::invalid(dir, format!("generating the root: {e}"));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "sluice");
        params.distinguished_name.push(DnType::CommonName, "sluice root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = validity::truncate_to_secs(SystemTime::now());
        validity::set_validity(&mut params, now - CLOCK_SKEW, now + ROOT_LIFETIME);
        let cert = params.self_signed(&key).map_err(generate)?;

        // Key first: a root without its key is useless, and a crash between
        // the two writes then leaves only a private file behind.
        files::write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        if let Err(e) = files::write_new(&cert_path, cert.pem().as_bytes(), 0o644) {
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(())
    }

    /// Loads and checks the CA in `dir`: files present and parsable, the
    /// path to the root unexpired, the key matching the signing certificate,
    /// and a test certificate verifying up to the root.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let root_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let roots = files::read_certs(&root_path)?;
        let key = files::read_key(&key_path)?;
        let chain = match files::read_certs(&chain_path) {
            Ok(chain) => Some(chain),
            Err(CaError::Missing { .. }) => None,
            Err(e) => return Err(e),
        };

        // Owned, because the parsed signer is still needed for the self-test
        // after `roots` has moved into the Ca.
        let (signer, signer_path, intermediates) = match &chain {
            None => (roots[0].clone(), root_path.as_path(), Vec::new()),
            Some(chain) => {
                let below_root: Vec<_> = chain.iter().take_while(|c| !roots.contains(c)).cloned().collect();
                (chain[0].clone(), chain_path.as_path(), below_root)
            }
        };
        let parsed_roots = parse_all(&roots, &root_path)?;
        let parsed_path = parse_all(&intermediates, &chain_path)?;
        let parsed_signer = parse(&signer, signer_path)?;
        let (top, parsed_top) = match (intermediates.last(), parsed_path.last()) {
            (Some(der), Some(parsed)) => (der, parsed),
            _ => (&signer, &parsed_signer),
        };
        let anchor = find_anchor(&roots, &parsed_roots, top, parsed_top, &root_path, signer_path)?;

        let now = SystemTime::now();
        let mut not_after = check_validity(anchor, &root_path, now)?;
        for cert in &parsed_path {
            not_after = not_after.min(check_validity(cert, &chain_path, now)?);
        }
        check_can_sign(&parsed_signer, signer_path)?;
        let key = keys::load_signing_key(&key, &key_path, parsed_signer.public_key(), signer_path)?;
        let issuer = issuer_for(&signer, &parsed_signer, &key, signer_path)?;

        let mut root_store = RootCertStore::empty();
        for root in &roots {
            root_store
                .add(root.clone())
                .map_err(|e| CaError::invalid(&root_path, format!("a root cannot be used as a trust anchor: {e}")))?;
        }
        let san_carrier = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::invalid(&key_path, format!("key generation: {e}")))?;
        let ca = Ca { roots, root_store, intermediates, issuer, key, san_carrier, not_after };
        ca.self_test(&parsed_signer, signer_path, &key_path, &root_path)?;
        Ok(ca)
    }

    /// Issues a certificate for `id`, valid for `ttl` but never past the CA.
    /// The key is made here: this is the local-signing path (`ca.dir`).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let fail = |reason: String| CaError::Issue { id: id.to_string(), reason };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(format!("key generation: {e}")))?;
        let signed = self.sign(id, ttl, &key)?;
        Ok(WorkloadCert {
            id: id.clone(),
            chain: signed.chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_before: signed.not_before,
            not_after: signed.not_after,
            issued_at: signed.issued_at,
        })
    }

    /// Signs `public_key` (a CSR's) into a workload certificate for `id`,
    /// valid for `ttl` but never past the CA. The identity goes only in a
    /// critical URI SAN, as Istio issues them; the serial is random.
    pub fn sign(&self, id: &SpiffeId, ttl: Duration, public_key: &impl PublicKeyData) -> Result<SignedLeaf, CaError> {
        let fail = |reason: String| CaError::Issue { id: id.to_string(), reason };
        let (issued_at, not_before, not_after) = self.window(ttl).map_err(fail)?;
        let mut params = CertificateParams::default();
        // Empty subject, identity only in the SAN, as Istio issues them.
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.custom_extensions = vec![uri_san(id, &self.san_carrier).map_err(fail)?];
        let serial = random_serial().map_err(fail)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        validity::set_validity(&mut params, not_before, not_after);
        let cert = params.signed_by(public_key, &self.issuer, &self.key).map_err(|e| fail(format!("signing: {e}")))?;
        Ok(self.leaf(cert.der().clone(), serial, issued_at, not_before, not_after))
    }

    /// A TLS server certificate for the CA service itself: `names` as DNS
    /// or IP SANs (the first DNS name also as CN), serverAuth only.
    pub fn issue_server(&self, names: &[String], ttl: Duration) -> Result<(SignedLeaf, KeyPair), CaError> {
        let what = names.first().cloned().unwrap_or_default();
        let fail = |reason: String| CaError::Issue { id: what.clone(), reason };
        let (issued_at, not_before, not_after) = self.window(ttl).map_err(fail)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(format!("key generation: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "sluice");
        if let Some(dns) = names.iter().find(|n| n.parse::<std::net::IpAddr>().is_err()) {
            params.distinguished_name.push(DnType::CommonName, dns.as_str());
        }
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.as_str().try_into().map_err(|e| fail(format!("{name:?} is not a DNS name: {e}")))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial().map_err(fail)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        validity::set_validity(&mut params, not_before, not_after);
        let cert = params.signed_by(&key, &self.issuer, &self.key).map_err(|e| fail(format!("signing: {e}")))?;
        Ok((self.leaf(cert.der().clone(), serial, issued_at, not_before, not_after), key))
    }

    /// Now, and the validity window of a leaf asked to live `ttl`: backdated
    /// by [`CLOCK_SKEW`], cut at the CA's own expiry, whole seconds.
    fn window(&self, ttl: Duration) -> Result<(SystemTime, SystemTime, SystemTime), String> {
        let issued_at = SystemTime::now();
        if issued_at >= self.not_after {
            return Err(format!("the CA certificate expired at {}", display(self.not_after)));
        }
        let wanted = issued_at.checked_add(ttl).unwrap_or(self.not_after);
        let not_after = validity::truncate_to_secs(wanted.min(self.not_after));
        if not_after <= issued_at {
            return Err(format!("a lifetime of {ttl:?} is too short; certificates count whole seconds"));
        }
        let not_before = validity::truncate_to_secs(issued_at.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
        Ok((issued_at, not_before, not_after))
    }

    fn leaf(
        &self,
        der: CertificateDer<'static>,
        serial: [u8; 16],
        issued_at: SystemTime,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> SignedLeaf {
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(der);
        chain.extend(self.intermediates.iter().cloned());
        SignedLeaf { chain, serial, issued_at, not_before, not_after }
    }

    /// Trust anchors for verifying peers: every root in `root-cert.pem`.
    pub fn roots(&self) -> RootCertStore {
        self.root_store.clone()
    }

    /// The roots of `root-cert.pem`, in file order.
    pub fn root_certs(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// `root-cert.pem` as PEM, for distribution to peers and for `inspect`.
    pub fn root_pem(&self) -> String {
        self.roots.iter().map(|c| files::to_pem("CERTIFICATE", c)).collect()
    }

    /// The signing certificate and intermediates below the root.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// No certificate this CA issues is valid past this time.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issues a throwaway certificate and verifies it up to the roots, the
    /// way peers will. This catches what the piecewise checks cannot: a
    /// broken link in `cert-chain.pem`, or a subject rcgen cannot reproduce
    /// byte for byte in the issuer field.
    fn self_test(
        &self,
        signer: &X509Certificate<'_>,
        signer_path: &Path,
        key_path: &Path,
        root_path: &Path,
    ) -> Result<(), CaError> {
        let probe = SpiffeId::new("selftest.sluice.invalid", "sluice", "selftest")
            .map_err(|e| CaError::invalid(signer_path, e.to_string()))?;
        let leaf = self
            .issue(&probe, Duration::from_secs(300))
            .map_err(|e| CaError::invalid(key_path, format!("cannot sign a test certificate: {e}")))?;
        let (_, parsed_leaf) = X509Certificate::from_der(&leaf.chain[0])
            .map_err(|e| CaError::invalid(signer_path, format!("test certificate is unparsable: {e}")))?;
        if parsed_leaf.issuer().as_raw() != signer.subject().as_raw() {
            return Err(CaError::invalid(
                signer_path,
                format!(
                    "the subject \"{}\" cannot be reproduced exactly in issued certificates \
                     (repeated or unusual attributes); reissue the CA certificate with a plainer subject",
                    signer.subject()
                ),
            ));
        }
        let provider = rustls::crypto::ring::default_provider();
        let end_entity = ParsedCertificate::try_from(&leaf.chain[0])
            .map_err(|e| CaError::invalid(signer_path, format!("test certificate is unparsable: {e}")))?;
        verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &self.root_store,
            &leaf.chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            CaError::invalid(
                signer_path,
                format!("a test certificate signed with this CA does not verify up to {}: {e}", root_path.display()),
            )
        })
    }
}

impl fmt::Debug for Ca {
    // By hand, so that the signing key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("roots", &self.roots.len())
            .field("intermediates", &self.intermediates.len())
            .field("not_after", &display(self.not_after))
            .finish_non_exhaustive()
    }
}

/// subjectAltName with the SPIFFE URI, encoded by rcgen (`SanType::URI`)
/// and marked critical because the subject is empty (RFC 5280 4.2.1.6, and
/// Istio marks it so too). rcgen writes its SAN non-critical and has no
/// switch for it, so its encoding is read back from a throwaway certificate
/// signed by `carrier_key` (never the CA key) with x509-parser, and carried
/// as a critical extension: no ASN.1 is written here.
fn uri_san(id: &SpiffeId, carrier_key: &KeyPair) -> Result<CustomExtension, String> {
    let uri = Ia5String::try_from(id.to_string()).map_err(|e| format!("{id} is not an IA5 URI: {e}"))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let carrier = params.self_signed(carrier_key).map_err(|e| format!("encoding the subjectAltName: {e}"))?;
    let (_, parsed) = X509Certificate::from_der(carrier.der())
        .map_err(|e| format!("reading back the subjectAltName rcgen wrote: {e}"))?;
    let ext = parsed
        .extensions()
        .iter()
        .find(|e| e.oid == OID_X509_EXT_SUBJECT_ALT_NAME)
        .ok_or("rcgen wrote no subjectAltName")?;
    let mut san = CustomExtension::from_oid_content(SAN_OID, ext.value.to_vec());
    san.set_criticality(true);
    Ok(san)
}
