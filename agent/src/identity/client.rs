//! The agent's side of Istio's certificate API: for each workload, a fresh
//! ECDSA P-256 key made here, a CSR sent to the CA service (Sluice's `ca
//! serve`, or istiod) with the agent's service-account token, and the
//! answer checked before anything uses it: exactly the identity asked for,
//! chaining to the configured root, certifying our key.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use rustls::{
    client::verify_server_cert_signed_by_trust_anchor,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::ParsedCertificate,
    RootCertStore,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{
    csr, files,
    proto::{istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest},
    validity, CaError, SpiffeId, WorkloadCert,
};

/// The metadata key Istio reads a node agent's impersonation request from.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Istio's CA port, used when `ca.address` names none.
pub const DEFAULT_CA_PORT: u16 = 15012;
/// How long one CSR may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger answers are not certificate chains.
const MAX_RESPONSE: usize = 256 * 1024;
const MAX_CHAIN: usize = 8;
const MAX_TOKEN: u64 = 64 * 1024;

/// Where the CA is and how to talk to it (the `ca:` section with `address`).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `https://host[:port]`.
    pub address: String,
    /// Trust for the CA's TLS certificate and for the certificates it issues.
    pub root_cert: PathBuf,
    /// The service-account token sent as `authorization: Bearer`; read
    /// again for every request, since projected tokens are rotated.
    pub token_file: PathBuf,
    pub ttl: Duration,
}

pub struct CaClient {
    address: String,
    client: IstioCertificateServiceClient<Channel>,
    roots: Vec<CertificateDer<'static>>,
    root_store: Arc<RootCertStore>,
    token_file: PathBuf,
    ttl: Duration,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient").field("address", &self.address).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// `https://host[:port][/]` → (URI with the port filled in, host for TLS).
pub fn parse_address(address: &str) -> Result<(String, String), String> {
    let uri: http::Uri = address.parse().map_err(|e| format!("{address:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{address:?} must start with https:// (the CA is only spoken to over TLS)"));
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("{address:?} has no host"))?;
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
        return Err(format!("{address:?} must not have a path or query; give https://host:port"));
    }
    if address.contains('@') {
        return Err(format!("{address:?} must not carry user information"));
    }
    let port = uri.port_u16().unwrap_or(DEFAULT_CA_PORT);
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((format!("https://{host}:{port}"), bare))
}

impl CaClient {
    /// Reads the root and prepares the channel (connected on first use).
    /// Must be called inside a tokio runtime.
    pub fn new(settings: &ClientSettings) -> Result<CaClient, CaError> {
        let (address, host) =
            parse_address(&settings.address).map_err(|reason| CaError::invalid(&settings.root_cert, reason))?;
        let roots = files::read_certs(&settings.root_cert)?;
        let mut root_store = RootCertStore::empty();
        for root in &roots {
            root_store.add(root.clone()).map_err(|e| {
                CaError::invalid(&settings.root_cert, format!("a root cannot be used as a trust anchor: {e}"))
            })?;
        }
        let pem: String = roots.iter().map(|c| files::to_pem("CERTIFICATE", c)).collect();
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name(host);
        let endpoint = Endpoint::from_shared(address.clone())
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| CaError::invalid(&settings.root_cert, format!("CA address {address}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let client =
            IstioCertificateServiceClient::new(endpoint.connect_lazy()).max_decoding_message_size(MAX_RESPONSE);
        Ok(CaClient {
            address,
            client,
            roots,
            root_store: Arc::new(root_store),
            token_file: settings.token_file.clone(),
            ttl: settings.ttl,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The configured roots, which peers' certificates must chain to.
    pub fn roots(&self) -> RootCertStore {
        (*self.root_store).clone()
    }

    /// One CSR for `id`: a new key, the request, and the checks on the
    /// answer. Every failure says which step and why.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, CaError> {
        let fail = |reason: String| CaError::Issue { id: id.to_string(), reason };
        let token = read_token(&self.token_file).await.map_err(fail)?;
        let own = token_identity(&token, &id.trust_domain);
        let (key, csr_pem) = csr::request(id).map_err(fail)?;
        let metadata = impersonation(own.as_ref(), id);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| fail(format!("the token in {} is not a valid header value", self.token_file.display())))?;
        request.metadata_mut().insert("authorization", bearer);
        request.set_timeout(REQUEST_TIMEOUT);
        let mut client = self.client.clone();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), client.create_certificate(request))
            .await
            .map_err(|_| fail(format!("the CA at {} did not answer within {REQUEST_TIMEOUT:?}", self.address)))?
            .map_err(|status| {
                fail(format!("the request to the CA at {} failed: {}", self.address, describe_status(&status)))
            })?
            .into_inner();
        self.check_answer(id, &key, answer.cert_chain).map_err(|reason| {
            fail(format!("the CA at {} answered with an unusable certificate: {reason}", self.address))
        })
    }

    fn check_answer(&self, id: &SpiffeId, key: &rcgen::KeyPair, pems: Vec<String>) -> Result<WorkloadCert, String> {
        let mut certs = Vec::new();
        for pem in &pems {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                certs.push(cert.map_err(|e| format!("cert_chain holds invalid PEM: {e}"))?);
                if certs.len() > MAX_CHAIN {
                    return Err(format!("cert_chain holds more than {MAX_CHAIN} certificates"));
                }
            }
        }
        let Some(leaf) = certs.first().cloned() else {
            return Err("cert_chain is empty".into());
        };
        // The root comes last in Istio's answers; peers have it already.
        let intermediates: Vec<_> = certs[1..].iter().filter(|c| !self.roots.contains(c)).cloned().collect();
        let (_, parsed) = X509Certificate::from_der(&leaf).map_err(|e| format!("the leaf does not parse: {e}"))?;
        let got = SpiffeId::from_cert_der(&leaf).map_err(|e| format!("the leaf: {e}"))?;
        if &got != id {
            return Err(format!("the leaf is for {got}, not the {id} requested"));
        }
        let names = parsed
            .subject_alternative_name()
            .map_err(|e| format!("the leaf's subjectAltName: {e}"))?
            .map_or(0, |san| san.value.general_names.len());
        if names != 1 {
            return Err(format!("the leaf has {names} subjectAltNames; only {id} was requested"));
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err("the leaf certifies a different public key than the CSR's".into());
        }
        let end_entity = ParsedCertificate::try_from(&leaf).map_err(|e| format!("the leaf does not parse: {e}"))?;
        verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &self.root_store,
            &intermediates,
            UnixTime::now(),
            rustls::crypto::ring::default_provider().signature_verification_algorithms.all,
        )
        .map_err(|e| format!("it does not chain to the configured root: {e}"))?;
        let not_before = validity::from_asn1(parsed.validity().not_before);
        let not_after = validity::from_asn1(parsed.validity().not_after);
        let now = SystemTime::now();
        let issued_at = now.clamp(not_before, not_after);
        let mut chain = vec![leaf];
        chain.extend(intermediates);
        Ok(WorkloadCert {
            id: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_before,
            not_after,
            issued_at,
        })
    }
}

/// The request metadata for `id`: `ImpersonatedIdentity` naming it unless
/// it is the agent's own identity `own`. The CA (istiod, or `sluice ca
/// serve`) refuses a node agent's CSR for another identity without it.
pub fn impersonation(own: Option<&SpiffeId>, id: &SpiffeId) -> Option<prost_types::Struct> {
    (own != Some(id)).then(|| prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
        )]
        .into(),
    })
}

/// A status for logs: the code's name and the CA's message, bounded.
pub fn describe_status(status: &tonic::Status) -> String {
    let message: String = status.message().chars().take(300).collect();
    format!("{:?}: {message}", status.code())
}

async fn read_token(path: &Path) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await.map_err(|e| format!("reading the token {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_TOKEN + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("reading the token {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_TOKEN {
        return Err(format!("the token {} is larger than {MAX_TOKEN} bytes", path.display()));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(token.to_string())
}

/// The agent's own identity, from its service-account token's `sub` claim
/// (`system:serviceaccount:<ns>:<sa>`). Read without verifying: it only
/// decides whether to ask for impersonation; the CA checks the token.
/// `None` for tokens that are not JWTs of that shape.
pub fn token_identity(token: &str, trust_domain: &str) -> Option<SpiffeId> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    match sub.split(':').collect::<Vec<_>>().as_slice() {
        ["system", "serviceaccount", ns, sa] => SpiffeId::new(trust_domain, *ns, *sa).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("https://sluice-ca.sluice-system.svc:15012").unwrap(),
            ("https://sluice-ca.sluice-system.svc:15012".into(), "sluice-ca.sluice-system.svc".into())
        );
        assert_eq!(parse_address("https://10.0.0.1").unwrap().0, "https://10.0.0.1:15012");
        assert_eq!(parse_address("https://[fd00::1]:99/").unwrap(), ("https://[fd00::1]:99".into(), "fd00::1".into()));
        assert!(parse_address("http://ca:15012").unwrap_err().contains("https://"));
        assert!(parse_address("https://ca:15012/x").unwrap_err().contains("path"));
        assert!(parse_address("ca:15012").is_err());
        assert!(parse_address("https://u:p@ca:1").is_err());
    }

    #[test]
    fn own_identity_from_the_token() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!("{}.{}.sig", b64("{}"), b64(r#"{"sub":"system:serviceaccount:sluice-system:sluice"}"#));
        assert_eq!(
            token_identity(&jwt, "cluster.local").unwrap().to_string(),
            "spiffe://cluster.local/ns/sluice-system/sa/sluice"
        );
        assert_eq!(token_identity("opaque-token", "cluster.local"), None);
        assert_eq!(token_identity(&format!("a.{}.c", b64(r#"{"sub":"alice"}"#)), "cluster.local"), None);
        assert_eq!(token_identity("a.!!!.c", "cluster.local"), None);
    }

    /// Every workload but the agent itself is asked for as an impersonation.
    #[test]
    fn impersonation_is_declared_for_workloads_not_our_own() {
        let own: SpiffeId = "spiffe://cluster.local/ns/sluice-system/sa/sluice".parse().unwrap();
        let web: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let named = |m: Option<prost_types::Struct>| match m.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY).cloned())
        {
            Some(prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s)) }) => Some(s),
            _ => None,
        };
        assert_eq!(named(impersonation(Some(&own), &web)).as_deref(), Some(web.to_string().as_str()));
        // An opaque token names no identity: every request is an impersonation.
        assert_eq!(named(impersonation(None, &web)).as_deref(), Some(web.to_string().as_str()));
        assert_eq!(impersonation(Some(&own), &own), None, "the agent's own identity is not impersonated");
        assert_eq!(IMPERSONATED_IDENTITY, "ImpersonatedIdentity", "istio's key, spelled as istiod reads it");
    }

    /// The answer is used only if it is exactly what was asked for.
    #[test]
    fn answers_are_checked() {
        use crate::identity::{testutil, Ca};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        let (dir, ca) = testutil::new_ca();
        let (_other_dir, rogue) = testutil::new_ca();
        let settings = ClientSettings {
            address: "https://127.0.0.1:1".into(),
            root_cert: dir.path().join(super::super::ROOT_CERT_FILE),
            token_file: dir.path().join("token"),
            ttl: Duration::from_secs(600),
        };
        let client = CaClient::new(&settings).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/default/sa/db".parse().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pems = |ca: &Ca, id: &SpiffeId, key: &rcgen::KeyPair| -> Vec<String> {
            let signed = ca.sign(id, Duration::from_secs(600), key).unwrap();
            let mut out: Vec<String> = signed.chain.iter().map(|c| files::to_pem("CERTIFICATE", c)).collect();
            out.push(ca.root_pem());
            out
        };
        let cert = client.check_answer(&id, &key, pems(&ca, &id, &key)).unwrap();
        assert_eq!(cert.id, id);
        assert_eq!(cert.chain.len(), 1, "the root is dropped");
        let wrong_id = client.check_answer(&id, &key, pems(&ca, &other, &key)).unwrap_err();
        assert!(wrong_id.contains("not the spiffe://cluster.local/ns/default/sa/web requested"), "{wrong_id}");
        let foreign = client.check_answer(&id, &key, pems(&rogue, &id, &key)).unwrap_err();
        assert!(foreign.contains("does not chain to the configured root"), "{foreign}");
        let another_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let swapped = client.check_answer(&id, &key, pems(&ca, &id, &another_key)).unwrap_err();
        assert!(swapped.contains("different public key"), "{swapped}");
        assert!(client.check_answer(&id, &key, vec![]).unwrap_err().contains("empty"));
        assert!(client.check_answer(&id, &key, vec!["garbage".into()]).is_err());
    }
}
