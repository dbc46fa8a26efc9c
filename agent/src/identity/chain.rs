//! Checks on the certificates a CA signs with: which root anchors the
//! signing path, whether each is in date, and whether the signer may sign.
//! Done piecewise so that each failure names its file and certificate.

use std::{path::Path, time::SystemTime};

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::CertificateDer;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{
    validity::{self, display},
    CaError,
};

pub(crate) fn parse<'a>(der: &'a CertificateDer<'_>, path: &Path) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| CaError::invalid(path, format!("unparsable certificate: {e}")))
}

pub(crate) fn parse_all<'a>(certs: &'a [CertificateDer<'_>], path: &Path) -> Result<Vec<X509Certificate<'a>>, CaError> {
    certs.iter().map(|c| parse(c, path)).collect()
}

/// The root that the top of the signing path (`top`) is, or hangs from.
pub(crate) fn find_anchor<'r, 'a>(
    roots: &[CertificateDer<'_>],
    parsed_roots: &'r [X509Certificate<'a>],
    top: &CertificateDer<'_>,
    parsed_top: &X509Certificate<'_>,
    root_path: &Path,
    signer_path: &Path,
) -> Result<&'r X509Certificate<'a>, CaError> {
    if let Some(i) = roots.iter().position(|r| r == top) {
        return Ok(&parsed_roots[i]);
    }
    parsed_roots.iter().find(|r| r.subject().as_raw() == parsed_top.issuer().as_raw()).ok_or_else(|| {
        CaError::invalid(
            signer_path,
            format!(
                "certificate \"{}\" was issued by \"{}\", which is not in {}",
                parsed_top.subject(),
                parsed_top.issuer(),
                root_path.display()
            ),
        )
    })
}

/// Refuses certificates outside their validity window, returning not-after.
pub(crate) fn check_validity(cert: &X509Certificate<'_>, path: &Path, now: SystemTime) -> Result<SystemTime, CaError> {
    let not_before = validity::from_asn1(cert.validity().not_before);
    let not_after = validity::from_asn1(cert.validity().not_after);
    if now >= not_after {
        return Err(CaError::Expired {
            path: path.to_owned(),
            subject: cert.subject().to_string(),
            not_after: display(not_after),
        });
    }
    if now < not_before {
        return Err(CaError::NotYetValid {
            path: path.to_owned(),
            subject: cert.subject().to_string(),
            not_before: display(not_before),
        });
    }
    Ok(not_after)
}

/// The signing certificate must be a CA allowed to sign certificates, or
/// peers will reject every leaf it signs.
pub(crate) fn check_can_sign(cert: &X509Certificate<'_>, path: &Path) -> Result<(), CaError> {
    if !cert.is_ca() {
        return Err(CaError::invalid(
            path,
            format!("certificate \"{}\" is not a CA (basicConstraints CA:TRUE is missing)", cert.subject()),
        ));
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(CaError::invalid(
            path,
            format!("certificate \"{}\" may not sign certificates (keyUsage lacks keyCertSign)", cert.subject()),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(CaError::invalid(path, format!("unparsable keyUsage: {e}"))),
    }
}

/// Builds what rcgen needs to sign as `signer`.
pub(crate) fn issuer_for(
    signer: &CertificateDer<'_>,
    parsed: &X509Certificate<'_>,
    key: &KeyPair,
    path: &Path,
) -> Result<rcgen::Certificate, CaError> {
    // rcgen keeps one value per RDN (and panics on an empty one); refuse
    // those names here with a reason rather than sign with a wrong issuer.
    if parsed.subject().iter().any(|rdn| rdn.iter().count() != 1) {
        return Err(CaError::invalid(
            path,
            format!("subject \"{}\" has a multi-valued or empty RDN, which is not supported", parsed.subject()),
        ));
    }
    let params = CertificateParams::from_ca_cert_der(signer)
        .map_err(|e| CaError::invalid(path, format!("cannot use as a signing certificate: {e}")))?;
    // The re-signed copy is discarded; rcgen only reads its name and key id.
    params.self_signed(key).map_err(|e| CaError::invalid(path, format!("cannot use as a signing certificate: {e}")))
}
