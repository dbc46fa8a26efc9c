//! Certificate verifiers for SPIFFE peers. Path validation is webpki's (via
//! rustls); these add the identity checks that host-name TLS does not have.

use std::{fmt, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    server::ParsedCertificate,
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme,
};

use crate::identity::{CertIdError, SpiffeId};

/// Why a peer with a validly signed certificate was still refused. It
/// travels inside `rustls::Error::InvalidCertificate(CertificateError::Other)`
/// so that callers can log the reason or downcast to it.
#[derive(thiserror::Error)]
pub enum PeerRejected {
    #[error("peer certificate carries no usable SPIFFE ID: {0}")]
    NoIdentity(#[from] CertIdError),
    #[error("client {found} is not in trust domain {expected:?}")]
    WrongTrustDomain { found: String, expected: String },
    #[error("server presented {found} but {expected} was expected")]
    WrongIdentity { found: String, expected: String },
}

// rustls prints `CertificateError::Other` with `{:?}`, so Debug is where the
// readable reason has to be for handshake errors to explain themselves.
impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PeerRejected {
    /// The identity verdict inside a handshake error, when that is what
    /// failed it (for logs and metrics that want the reason, not the text).
    pub fn find(err: &rustls::Error) -> Option<&PeerRejected> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<PeerRejected>()
            }
            _ => None,
        }
    }
}

impl From<PeerRejected> for rustls::Error {
    fn from(e: PeerRejected) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// Client side: the chain must reach a root and the leaf must name exactly
/// the expected destination identity. The server name is ignored because
/// HBONE sends none and certificates carry no host names.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(roots: Arc<RootCertStore>, expected: SpiffeId, provider: &CryptoProvider) -> Self {
        Self { roots, expected, algs: provider.signature_verification_algorithms }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        let found = SpiffeId::from_cert_der(end_entity).map_err(PeerRejected::from)?;
        if found != self.expected {
            return Err(
                PeerRejected::WrongIdentity { found: found.to_string(), expected: self.expected.to_string() }.into()
            );
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: webpki's client verifier (chain to the roots, clientAuth
/// usage, certificate mandatory), then the trust domain. Which identities
/// may connect is policy's business, not the handshake's.
#[derive(Debug)]
pub(crate) struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainVerifier {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: String) -> Self {
        Self { inner, trust_domain }
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let found = SpiffeId::from_cert_der(end_entity).map_err(PeerRejected::from)?;
        if found.trust_domain != self.trust_domain {
            return Err(PeerRejected::WrongTrustDomain {
                found: found.to_string(),
                expected: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
