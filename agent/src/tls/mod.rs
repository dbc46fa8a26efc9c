//! rustls configurations for HBONE, following ztunnel's wire rules: TLS 1.3
//! only, ALPN `h2`, no SNI. Peers are identified by SPIFFE IDs, not host
//! names: the client checks the server's certificate names exactly the
//! destination identity it expects, and the server checks that the client
//! belongs to its trust domain (authorization proper happens later, in
//! `policy`, with [`peer_identity`]).

mod resolve;
mod verify;

#[cfg(test)]
mod tests;

use std::{net::IpAddr, sync::Arc};

use rustls::{
    client::Resumption,
    crypto::CryptoProvider,
    pki_types::ServerName,
    server::{NoServerSessionStorage, WebPkiClientVerifier},
    CommonState, RootCertStore,
};

use crate::identity::{validate_trust_domain, CaError, CertCache, SpiffeId};

pub use verify::PeerRejected;

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate for {id}: {source}")]
    Identity {
        id: String,
        #[source]
        source: CaError,
    },
    #[error("invalid trust domain: {0}")]
    TrustDomain(String),
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// Server side of HBONE for the workload `id`: presents `id`'s current
/// certificate and requires a client certificate from `trust_domain` that
/// chains to `roots`.
pub fn server_config(
    cache: Arc<CertCache>,
    id: SpiffeId,
    roots: Arc<RootCertStore>,
    trust_domain: String,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    validate_trust_domain(&trust_domain).map_err(TlsError::TrustDomain)?;
    warm(&cache, &id)?;
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verify::TrustDomainVerifier::new(webpki, trust_domain)))
        .with_cert_resolver(Arc::new(resolve::ServerResolver::new(cache, id, provider)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips certificate verification, so it would carry
    // an identity past rotation or revocation of trust; always do the full
    // handshake, as ztunnel does.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE for the workload `id`, connecting to a peer that
/// must present exactly `expected`.
pub fn client_config(
    cache: Arc<CertCache>,
    id: SpiffeId,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    warm(&cache, &id)?;
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::new(roots, expected, &provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolve::ClientResolver::new(cache, id, provider)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name to pass to `connect`. rustls needs one, but HBONE
/// identifies the server by SPIFFE ID; an IP name is never sent as SNI, and
/// the verifier ignores it.
pub fn connect_server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// The SPIFFE ID of the peer's leaf certificate, once the handshake is done.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    SpiffeId::from_cert_der(leaf).ok()
}

/// The ring provider, named explicitly so that no process-wide default
/// (which another dependency might install) decides our cipher suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Issues the certificate now, so that a CA problem surfaces as an error
/// here rather than as anonymous handshake failures later.
fn warm(cache: &CertCache, id: &SpiffeId) -> Result<(), TlsError> {
    cache.get(id).map(drop).map_err(|source| TlsError::Identity { id: id.to_string(), source })
}
