//! Loading a CA signing key of whatever shape an operator mounts, and
//! proving it belongs to the signing certificate.
//!
//! ring (rcgen's backend here) reads only PKCS#8, but Istio plug-in CAs are
//! often `BEGIN RSA PRIVATE KEY` (PKCS#1) or `BEGIN EC PRIVATE KEY` (SEC1), so
//! those are wrapped in PKCS#8 first. The algorithm comes from the
//! certificate, since key and certificate must agree anyway.

use std::path::Path;

use rustls::pki_types::PrivateKeyDer;
use x509_parser::{
    oid_registry::{Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION},
    public_key::PublicKey,
    x509::SubjectPublicKeyInfo,
};

use super::{
    der::{self, TAG_INTEGER, TAG_NULL, TAG_OCTET_STRING, TAG_OID, TAG_SEQUENCE},
    error::MIN_RSA_BITS,
    CaError,
};

// DER-encoded OBJECT IDENTIFIER contents.
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyAlg {
    Rsa,
    P256,
    P384,
}

impl KeyAlg {
    fn name(self) -> &'static str {
        match self {
            KeyAlg::Rsa => "RSA",
            KeyAlg::P256 => "ECDSA P-256",
            KeyAlg::P384 => "ECDSA P-384",
        }
    }

    fn sign_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlg::Rsa => &rcgen::PKCS_RSA_SHA256,
            KeyAlg::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlg::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    /// PKCS#8 AlgorithmIdentifier for this key type.
    fn algorithm_identifier(self) -> Vec<u8> {
        let params = match self {
            KeyAlg::Rsa => der::tlv(TAG_NULL, &[]),
            KeyAlg::P256 => der::tlv(TAG_OID, OID_P256),
            KeyAlg::P384 => der::tlv(TAG_OID, OID_P384),
        };
        let oid = der::tlv(TAG_OID, if self == KeyAlg::Rsa { OID_RSA } else { OID_EC });
        der::tlv(TAG_SEQUENCE, &[oid, params].concat())
    }
}

/// Loads `key` (read from `key_path`) as the signing key for the certificate
/// whose public key is `spki` (read from `cert_path`).
pub(crate) fn load_signing_key(
    key: &PrivateKeyDer<'_>,
    key_path: &Path,
    spki: &SubjectPublicKeyInfo<'_>,
    cert_path: &Path,
) -> Result<rcgen::KeyPair, CaError> {
    let alg = cert_key_alg(spki, cert_path)?;
    let mismatch =
        |detail: String| CaError::KeyMismatch { key: key_path.to_owned(), cert: cert_path.to_owned(), detail };
    let (key_alg, pkcs8) = match key {
        PrivateKeyDer::Pkcs8(k) => (pkcs8_alg(k.secret_pkcs8_der(), key_path)?, k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Pkcs1(k) => (KeyAlg::Rsa, wrap_pkcs8(KeyAlg::Rsa, k.secret_pkcs1_der())),
        // SEC1 does not always name its curve; the certificate does.
        PrivateKeyDer::Sec1(k) if alg != KeyAlg::Rsa => (alg, wrap_pkcs8(alg, k.secret_sec1_der())),
        PrivateKeyDer::Sec1(_) => return Err(mismatch("the key is EC but the certificate's key is RSA".into())),
        _ => return Err(CaError::invalid(key_path, "unsupported private key format")),
    };
    if key_alg != alg {
        return Err(mismatch(format!("the key is {} but the certificate's key is {}", key_alg.name(), alg.name())));
    }
    if alg == KeyAlg::Rsa {
        let bits = rsa_private_bits(&pkcs8).ok_or_else(|| CaError::invalid(key_path, "malformed RSA private key"))?;
        if bits < MIN_RSA_BITS {
            return Err(CaError::KeyTooSmall { path: key_path.to_owned(), bits });
        }
    }
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8);
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, alg.sign_alg())
        .map_err(|e| CaError::invalid(key_path, format!("cannot load the {} key: {e}", alg.name())))?;
    // Both sides are DER (an RSAPublicKey, or an uncompressed EC point), so
    // byte equality is key equality.
    if pair.public_key_raw() != spki.subject_public_key.data.as_ref() {
        return Err(mismatch("their public keys differ".into()));
    }
    Ok(pair)
}

/// The certificate's key type, refusing ones we cannot sign with and RSA
/// keys that are too small.
fn cert_key_alg(spki: &SubjectPublicKeyInfo<'_>, cert_path: &Path) -> Result<KeyAlg, CaError> {
    let alg: &Oid = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => der::integer_bits(rsa.modulus),
            _ => return Err(CaError::invalid(cert_path, "malformed RSA public key")),
        };
        if bits < MIN_RSA_BITS {
            return Err(CaError::KeyTooSmall { path: cert_path.to_owned(), bits });
        }
        return Ok(KeyAlg::Rsa);
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyAlg::P256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyAlg::P384),
            other => {
                Err(CaError::invalid(cert_path, format!("unsupported EC curve {other:?}; use P-256, P-384 or RSA")))
            }
        };
    }
    Err(CaError::invalid(cert_path, format!("unsupported public key algorithm {alg}; use ECDSA P-256, P-384 or RSA")))
}

/// Reads the algorithm out of a PKCS#8 PrivateKeyInfo.
fn pkcs8_alg(pkcs8: &[u8], key_path: &Path) -> Result<KeyAlg, CaError> {
    let malformed = || CaError::invalid(key_path, "malformed PKCS#8 private key");
    let (info, _) = der::expect(pkcs8, TAG_SEQUENCE).ok_or_else(malformed)?;
    let (_version, rest) = der::expect(info, TAG_INTEGER).ok_or_else(malformed)?;
    let (alg_id, _) = der::expect(rest, TAG_SEQUENCE).ok_or_else(malformed)?;
    let (oid, params) = der::expect(alg_id, TAG_OID).ok_or_else(malformed)?;
    let curve = der::expect(params, TAG_OID).map(|(c, _)| c);
    match (oid, curve) {
        (OID_RSA, _) => Ok(KeyAlg::Rsa),
        (OID_EC, Some(OID_P256)) => Ok(KeyAlg::P256),
        (OID_EC, Some(OID_P384)) => Ok(KeyAlg::P384),
        _ => Err(CaError::invalid(key_path, "unsupported private key algorithm; use ECDSA P-256, P-384 or RSA")),
    }
}

/// PrivateKeyInfo { version 0, algorithm, OCTET STRING { key } }.
fn wrap_pkcs8(alg: KeyAlg, inner: &[u8]) -> Vec<u8> {
    let body = [der::tlv(TAG_INTEGER, &[0]), alg.algorithm_identifier(), der::tlv(TAG_OCTET_STRING, inner)].concat();
    der::tlv(TAG_SEQUENCE, &body)
}

/// Modulus size of an RSA key in PKCS#8, checked here because ring's own
/// refusal of small keys does not say why.
fn rsa_private_bits(pkcs8: &[u8]) -> Option<usize> {
    let (info, _) = der::expect(pkcs8, TAG_SEQUENCE)?;
    let (_version, rest) = der::expect(info, TAG_INTEGER)?;
    let (_alg, rest) = der::expect(rest, TAG_SEQUENCE)?;
    let (pkcs1, _) = der::expect(rest, TAG_OCTET_STRING)?;
    let (rsa, _) = der::expect(pkcs1, TAG_SEQUENCE)?;
    let (_version, rest) = der::expect(rsa, TAG_INTEGER)?;
    let (modulus, _) = der::expect(rest, TAG_INTEGER)?;
    Some(der::integer_bits(modulus))
}
