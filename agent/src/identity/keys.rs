//! Loading a CA signing key of whatever shape an operator mounts, and
//! proving it belongs to the signing certificate.
//!
//! ring (rcgen's backend here) makes an rcgen key only from PKCS#8, but
//! Istio plug-in CAs are often `BEGIN RSA PRIVATE KEY` (PKCS#1) or `BEGIN EC
//! PRIVATE KEY` (SEC1). Those are loaded by rustls' ring provider, which
//! reads all three, and rcgen signs through it as a remote key. The key's
//! structure is read with der-parser (x509-parser's); no ASN.1 is written by
//! hand. The algorithm comes from the certificate, since key and
//! certificate must agree anyway.

use std::{path::Path, sync::Arc};

use rustls::{
    pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer},
    sign::SigningKey,
    SignatureScheme,
};
use x509_parser::{
    der_parser::{ber::BerObject, parse_der},
    num_bigint::BigUint,
    oid_registry::{Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION},
    prelude::FromDer,
    public_key::PublicKey,
    x509::SubjectPublicKeyInfo,
};

use super::{error::MIN_RSA_BITS, CaError};

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

    /// The TLS signature scheme that signs as [`KeyAlg::sign_alg`] does.
    fn scheme(self) -> SignatureScheme {
        match self {
            KeyAlg::Rsa => SignatureScheme::RSA_PKCS1_SHA256,
            KeyAlg::P256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            KeyAlg::P384 => SignatureScheme::ECDSA_NISTP384_SHA384,
        }
    }

    /// From an AlgorithmIdentifier's OID and, for EC, its curve.
    fn from_oids(alg: &Oid<'_>, curve: Option<&Oid<'_>>) -> Option<KeyAlg> {
        if *alg == OID_PKCS1_RSAENCRYPTION {
            return Some(KeyAlg::Rsa);
        }
        if *alg != OID_KEY_TYPE_EC_PUBLIC_KEY {
            return None;
        }
        match curve {
            Some(c) if *c == OID_EC_P256 => Some(KeyAlg::P256),
            Some(c) if *c == OID_NIST_EC_P384 => Some(KeyAlg::P384),
            _ => None,
        }
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
    let key_alg = match key {
        PrivateKeyDer::Pkcs8(k) => pkcs8_alg(k.secret_pkcs8_der(), key_path)?,
        PrivateKeyDer::Pkcs1(_) => KeyAlg::Rsa,
        // SEC1 does not always name its curve; the certificate does (and a
        // key on another curve fails the public key comparison below).
        PrivateKeyDer::Sec1(_) if alg != KeyAlg::Rsa => alg,
        PrivateKeyDer::Sec1(_) => return Err(mismatch("the key is EC but the certificate's key is RSA".into())),
        _ => return Err(CaError::invalid(key_path, "unsupported private key format")),
    };
    if key_alg != alg {
        return Err(mismatch(format!("the key is {} but the certificate's key is {}", key_alg.name(), alg.name())));
    }
    if alg == KeyAlg::Rsa {
        let bits = rsa_private_bits(key).ok_or_else(|| CaError::invalid(key_path, "malformed RSA private key"))?;
        if bits < MIN_RSA_BITS {
            return Err(CaError::KeyTooSmall { path: key_path.to_owned(), bits });
        }
    }
    let cannot = |e: String| CaError::invalid(key_path, format!("cannot load the {} key: {e}", alg.name()));
    let pair = match key {
        PrivateKeyDer::Pkcs8(k) => {
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(k, alg.sign_alg()).map_err(|e| cannot(e.to_string()))?
        }
        other => rcgen::KeyPair::from_remote(Box::new(RustlsKey::new(other, alg).map_err(cannot)?))
            .map_err(|e| cannot(e.to_string()))?,
    };
    // Both sides are DER (an RSAPublicKey, or an uncompressed EC point), so
    // byte equality is key equality.
    if pair.public_key_raw() != spki.subject_public_key.data.as_ref() {
        return Err(mismatch("their public keys differ".into()));
    }
    Ok(pair)
}

/// A PKCS#1 or SEC1 key, loaded by rustls, that rcgen signs with.
struct RustlsKey {
    key: Arc<dyn SigningKey>,
    alg: KeyAlg,
    /// The raw public key, as [`rcgen::KeyPair::public_key_raw`] gives it.
    public: Vec<u8>,
}

impl RustlsKey {
    fn new(key: &PrivateKeyDer<'_>, alg: KeyAlg) -> Result<RustlsKey, String> {
        let key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| e.to_string())?;
        let spki: SubjectPublicKeyInfoDer<'_> = key.public_key().ok_or("rustls gives no public key for it")?;
        let (_, parsed) = SubjectPublicKeyInfo::from_der(&spki).map_err(|e| format!("its public key: {e}"))?;
        let found = KeyAlg::from_oids(
            &parsed.algorithm.algorithm,
            parsed.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).as_ref(),
        );
        if found != Some(alg) {
            return Err(format!("it is {}, not {}", found.map_or("of another type", KeyAlg::name), alg.name()));
        }
        let public = parsed.subject_public_key.data.to_vec();
        Ok(RustlsKey { key, alg, public })
    }
}

impl rcgen::RemoteKeyPair for RustlsKey {
    fn public_key(&self) -> &[u8] {
        &self.public
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let signer = self.key.choose_scheme(&[self.alg.scheme()]).ok_or(rcgen::Error::RemoteKeyError)?;
        signer.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg.sign_alg()
    }
}

/// The certificate's key type, refusing ones we cannot sign with and RSA
/// keys that are too small.
fn cert_key_alg(spki: &SubjectPublicKeyInfo<'_>, cert_path: &Path) -> Result<KeyAlg, CaError> {
    let alg: &Oid = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => BigUint::from_bytes_be(rsa.modulus).bits() as usize,
            _ => return Err(CaError::invalid(cert_path, "malformed RSA public key")),
        };
        if bits < MIN_RSA_BITS {
            return Err(CaError::KeyTooSmall { path: cert_path.to_owned(), bits });
        }
        return Ok(KeyAlg::Rsa);
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return KeyAlg::from_oids(alg, curve.as_ref()).ok_or_else(|| {
            CaError::invalid(cert_path, format!("unsupported EC curve {curve:?}; use P-256, P-384 or RSA"))
        });
    }
    Err(CaError::invalid(cert_path, format!("unsupported public key algorithm {alg}; use ECDSA P-256, P-384 or RSA")))
}

/// The elements of the DER SEQUENCE `der`.
fn sequence(der: &[u8]) -> Option<Vec<BerObject<'_>>> {
    let (_, obj) = parse_der(der).ok()?;
    obj.as_sequence().ok().cloned()
}

/// The algorithm of a PKCS#8 PrivateKeyInfo
/// `{ version, AlgorithmIdentifier { oid, parameters }, OCTET STRING }`.
fn pkcs8_alg(pkcs8: &[u8], key_path: &Path) -> Result<KeyAlg, CaError> {
    let malformed = || CaError::invalid(key_path, "malformed PKCS#8 private key");
    let info = sequence(pkcs8).ok_or_else(malformed)?;
    let alg_id = info.get(1).and_then(|a| a.as_sequence().ok()).ok_or_else(malformed)?;
    let oid = alg_id.first().and_then(|o| o.as_oid().ok()).ok_or_else(malformed)?;
    let curve = alg_id.get(1).and_then(|c| c.as_oid().ok());
    KeyAlg::from_oids(oid, curve)
        .ok_or_else(|| CaError::invalid(key_path, "unsupported private key algorithm; use ECDSA P-256, P-384 or RSA"))
}

/// Modulus size of an RSA private key (PKCS#1, or PKCS#1 inside PKCS#8),
/// checked here because ring's own refusal of small keys does not say why.
fn rsa_private_bits(key: &PrivateKeyDer<'_>) -> Option<usize> {
    let pkcs1 = match key {
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der().to_vec(),
        PrivateKeyDer::Pkcs8(k) => sequence(k.secret_pkcs8_der())?.get(2)?.as_slice().ok()?.to_vec(),
        _ => return None,
    };
    // RSAPrivateKey { version, modulus, publicExponent, ... }
    let modulus = sequence(&pkcs1)?.get(1)?.as_biguint().ok()?;
    Some(modulus.bits() as usize)
}
