//! PKCS#10 certificate signing requests, both ways: the agent makes one for
//! each workload (its key never leaves the agent), and the CA service reads
//! and checks the ones it is sent. rcgen writes and parses them (with
//! x509-parser underneath, which also checks the request's signature).

use rcgen::{CertificateParams, CertificateSigningRequestParams, DistinguishedName, KeyPair, SanType};
use x509_parser::{certification_request::X509CertificationRequest, prelude::FromDer};

use super::SpiffeId;

/// Largest PEM CSR the CA reads. An ECDSA or RSA-4096 request with one SAN
/// is 0.5-2 KiB; anything far larger is not a workload's request.
pub const MAX_CSR_PEM: usize = 16 * 1024;

/// A fresh ECDSA P-256 key and a PEM CSR for `id`: the SPIFFE ID as the only
/// SAN (a URI), empty subject, as ztunnel and istio-agent send them.
pub fn request(id: &SpiffeId) -> Result<(KeyPair, String), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| format!("generating a key: {e}"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id.to_string().try_into().map_err(|e| format!("{id} cannot be a URI SAN: {e}"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(|e| format!("writing the CSR: {e}"))?;
    let pem = csr.pem().map_err(|e| format!("writing the CSR as PEM: {e}"))?;
    Ok((key, pem))
}

/// A CSR the CA may sign: its signature verified, exactly one SAN, which is
/// a SPIFFE ID.
pub struct CheckedCsr {
    pub id: SpiffeId,
    /// The public key, for signing.
    pub params: CertificateSigningRequestParams,
    /// The request's subjectPublicKeyInfo, DER, to compare with the issued
    /// certificate's (so the certificate certifies exactly the key the
    /// requester proved it holds).
    pub spki: Vec<u8>,
}

/// Reads and checks a PEM CSR. The error says what is wrong, for the
/// caller; it never echoes more than a bounded piece of the input.
pub fn check(pem: &str) -> Result<CheckedCsr, String> {
    if pem.len() > MAX_CSR_PEM {
        return Err(format!("the CSR is {} bytes; at most {MAX_CSR_PEM} are accepted", pem.len()));
    }
    let blocks = pem.matches("-----BEGIN ").count();
    if blocks != 1 || !pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(format!(
            "expected exactly one PEM \"CERTIFICATE REQUEST\" block, found {blocks} PEM block(s) of that or other kinds"
        ));
    }
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("the CSR is not valid PEM: {e}"))?;
    let (_, parsed) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| format!("the CSR is not valid PKCS#10: {e}"))?;
    let spki = parsed.certification_request_info.subject_pki.raw.to_vec();
    let params = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::RingUnspecified => "the CSR's signature does not verify with its own public key".to_string(),
        rcgen::Error::UnsupportedExtension => {
            "the CSR requests an extension other than subjectAltName, keyUsage or extendedKeyUsage".to_string()
        }
        other => format!("the CSR cannot be used: {other}"),
    })?;
    let sans = &params.params.subject_alt_names;
    let id = match sans.as_slice() {
        [] => return Err("the CSR has no subjectAltName; it must carry exactly one SPIFFE ID as a URI".into()),
        [SanType::URI(uri)] => {
            uri.as_str().parse::<SpiffeId>().map_err(|e| format!("the CSR's URI SAN is not a SPIFFE ID: {e}"))?
        }
        [other] => return Err(format!("the CSR's only subjectAltName is {}, not a SPIFFE ID URI", describe(other))),
        many => {
            let names: Vec<String> = many.iter().take(4).map(describe).collect();
            return Err(format!(
                "the CSR has {} subjectAltNames ({}{}); a workload certificate carries exactly one SPIFFE ID",
                many.len(),
                names.join(", "),
                if many.len() > 4 { ", ..." } else { "" }
            ));
        }
    };
    Ok(CheckedCsr { id, params, spki })
}

impl std::fmt::Debug for CheckedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedCsr").field("id", &self.id.to_string()).finish_non_exhaustive()
    }
}

fn describe(san: &SanType) -> String {
    let bounded = |s: &str| {
        let mut s: String = s.chars().take(80).collect();
        if s.len() >= 80 {
            s.push_str("...");
        }
        s
    };
    match san {
        SanType::URI(u) => format!("URI {:?}", bounded(u.as_str())),
        SanType::DnsName(d) => format!("DNS name {:?}", bounded(d.as_str())),
        SanType::Rfc822Name(m) => format!("email {:?}", bounded(m.as_str())),
        SanType::IpAddress(ip) => format!("IP address {ip}"),
        _ => "an other-name".into(),
    }
}

use rustls::pki_types::pem::PemObject as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SpiffeId {
        "spiffe://cluster.local/ns/default/sa/web".parse().unwrap()
    }

    fn csr_with(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn own_requests_pass_the_check() {
        let (_key, pem) = request(&id()).unwrap();
        let checked = check(&pem).unwrap();
        assert_eq!(checked.id, id());
        assert!(!checked.spki.is_empty());
    }

    #[test]
    fn refuses_two_sans_non_spiffe_and_none() {
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let two = csr_with(vec![uri("spiffe://cluster.local/ns/a/sa/b"), uri("spiffe://cluster.local/ns/c/sa/d")]);
        assert!(check(&two).unwrap_err().contains("2 subjectAltNames"), "{}", check(&two).unwrap_err());
        let dns = csr_with(vec![SanType::DnsName("web.default.svc".try_into().unwrap())]);
        assert!(check(&dns).unwrap_err().contains("DNS name"));
        let https = csr_with(vec![uri("https://example.com/ns/a/sa/b")]);
        assert!(check(&https).unwrap_err().contains("not a SPIFFE ID"));
        let none = csr_with(vec![]);
        assert!(check(&none).unwrap_err().contains("no subjectAltName"));
    }

    #[test]
    fn refuses_garbage_oversize_and_tampering() {
        assert!(check("hello").is_err());
        assert!(check(&"A".repeat(MAX_CSR_PEM + 1)).unwrap_err().contains("at most"));
        let (_key, pem) = request(&id()).unwrap();
        assert!(check(&format!("{pem}{pem}")).unwrap_err().contains("exactly one"));
        // Flip one bit inside the signed body: the signature must fail.
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x01;
        let tampered = crate::identity::files::to_pem("CERTIFICATE REQUEST", &bytes);
        assert!(check(&tampered).is_err());
    }
}
