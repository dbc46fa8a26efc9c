//! `sluice ca serve`: Istio's `IstioCertificateService` over gRPC and TLS,
//! the only process that holds the CA key.
//!
//! Each request is authenticated with a Kubernetes TokenReview of its
//! bearer token (audience `istio-ca`, as istiod), then authorized:
//!
//! - a caller may have its own identity (`spiffe://<td>/ns/<ns>/sa/<sa>`);
//! - the node agent's service account (`--agent-service-account`) may also
//!   have the identity of a service account that has a pod on the agent's
//!   own node. The node comes from the token: Kubernetes puts
//!   `authentication.kubernetes.io/node-name` in the review of a pod-bound
//!   token (1.30+); without it, the caller's pod is looked up by the
//!   review's `pod-name` and `pod-uid`, as istiod does.
//!
//! Impersonation must be declared, as for istiod: a node agent asking for an
//! identity not its own sets `ImpersonatedIdentity` in the request metadata
//! (naming the CSR's identity), and only the agents' service account may.
//!
//! Everything else is refused with a status that says why. The CSR must
//! carry exactly one SAN, a SPIFFE ID in this trust domain; the lifetime
//! asked for may not exceed `--max-ttl`. Every issuance is logged with the
//! identity, the caller, the serial and the expiry.

use std::{
    fmt,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::api::{Api, ListParams, PostParams};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use super::{
    client::IMPERSONATED_IDENTITY,
    csr, files,
    proto::{
        istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
        IstioCertificateRequest, IstioCertificateResponse,
    },
    validity::display as utc,
    Ca, SpiffeId,
};

/// Istio's token audience for its CA.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
pub const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "sluice-system/sluice";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// Names the service's TLS certificate always carries, besides `--san`.
pub const DEFAULT_SANS: &[&str] = &[
    "sluice-ca",
    "sluice-ca.sluice-system",
    "sluice-ca.sluice-system.svc",
    "sluice-ca.sluice-system.svc.cluster.local",
    "localhost",
    "127.0.0.1",
    "::1",
];
/// Every Kubernetes API call of one request gets this long.
const API_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_REQUEST: usize = 64 * 1024;
const MAX_HANDSHAKES: usize = 256;
/// The service's own TLS certificate; renewed at half-life.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub kubeconfig: Option<PathBuf>,
    pub trust_domain: String,
    /// `<namespace>/<name>` of the node agents' service account.
    pub agent_service_account: String,
    pub audiences: Vec<String>,
    pub max_ttl: Duration,
    pub default_ttl: Duration,
    /// Extra DNS names or IPs for the service's TLS certificate.
    pub sans: Vec<String>,
}

/// Who called, as the TokenReview says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node: Option<String>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        if let Some(pod) = &self.pod_name {
            write!(f, " (pod {pod}")?;
            if let Some(node) = &self.node {
                write!(f, " on {node}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// A pod as the CA needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub node: Option<String>,
    pub service_account: String,
}

/// What the CA asks the Kubernetes API; a trait so the rules can be tested
/// without a server.
pub trait Cluster: Send + Sync + 'static {
    fn review(&self, token: &str, audiences: &[String]) -> impl Future<Output = Result<TokenReviewStatus>> + Send;
    fn pod(&self, namespace: &str, name: &str) -> impl Future<Output = Result<Option<PodInfo>>> + Send;
    /// Names of the live pods (not Succeeded or Failed) with service
    /// account `sa` in `namespace` on `node`.
    fn pods_on_node(&self, namespace: &str, sa: &str, node: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
}

/// The real API server, through kube-rs.
pub struct KubeCluster(pub kube::Client);

impl Cluster for KubeCluster {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(audiences.to_vec()) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.0.clone());
        let done = api.create(&PostParams::default(), &review).await.context("creating a TokenReview")?;
        Ok(done.status.unwrap_or_default())
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), namespace);
        let pod = api.get_opt(name).await.with_context(|| format!("getting pod {namespace}/{name}"))?;
        Ok(pod.map(|p| {
            let spec = p.spec.unwrap_or_default();
            PodInfo {
                uid: p.metadata.uid.unwrap_or_default(),
                node: spec.node_name,
                service_account: spec.service_account_name.unwrap_or_else(|| "default".into()),
            }
        }))
    }

    async fn pods_on_node(&self, namespace: &str, sa: &str, node: &str) -> Result<Vec<String>> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), namespace);
        // Names are checked before they get here (SPIFFE segments, DNS
        // names), so they cannot break out of the selector.
        let lp = ListParams::default().fields(&format!("spec.nodeName={node},spec.serviceAccountName={sa}")).limit(50);
        let pods = api.list(&lp).await.with_context(|| format!("listing pods of {namespace}/{sa} on {node}"))?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
                    && p.spec.as_ref().is_some_and(|s| s.node_name.as_deref() == Some(node))
                    && p.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default") == sa
            })
            .filter_map(|p| p.metadata.name)
            .collect())
    }
}

/// The caller a TokenReview names, if it authenticated a service account
/// for one of `audiences`. The error is the reason, for the caller.
pub fn caller_from_review(status: &TokenReviewStatus, audiences: &[String]) -> Result<Caller, String> {
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(format!("the token was not accepted: {}", bounded(error)));
    }
    if status.authenticated != Some(true) {
        return Err("the token was not accepted by the Kubernetes API".into());
    }
    // An empty list means "valid for the API server", not for this CA.
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(format!("the token is not for audience {}", audiences.join(" or ")));
    }
    let user = status.user.as_ref().ok_or("the TokenReview names no user")?;
    let name = user.username.as_deref().unwrap_or_default();
    let (namespace, service_account) = match name.split(':').collect::<Vec<_>>().as_slice() {
        ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => (ns.to_string(), sa.to_string()),
        _ => return Err(format!("the token belongs to {:?}, not a service account", bounded(name))),
    };
    let groups = user.groups.as_deref().unwrap_or_default();
    if !groups.iter().any(|g| g == "system:serviceaccounts") {
        return Err("the token's user is not in the group system:serviceaccounts".into());
    }
    let extra = |key: &str| {
        user.extra.as_ref().and_then(|e| e.get(key)).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned()
    };
    Ok(Caller {
        namespace,
        service_account,
        pod_name: extra(POD_NAME),
        pod_uid: extra(POD_UID),
        node: extra(NODE_NAME),
    })
}

fn bounded(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

/// Why a certificate was granted, for the issuance log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grounds {
    Own,
    /// The node agent on `node`, where `pod` runs with the identity's
    /// service account.
    Node {
        node: String,
        pod: String,
    },
}

impl fmt::Display for Grounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grounds::Own => write!(f, "own identity"),
            Grounds::Node { node, pod } => write!(f, "node agent on {node} impersonating, where pod {pod} runs"),
        }
    }
}

fn api_error(what: &str, e: impl fmt::Display) -> Status {
    Status::unavailable(format!("{what}: the Kubernetes API failed: {}", bounded(&e.to_string())))
}

async fn with_timeout<T>(what: &str, f: impl Future<Output = Result<T>>) -> Result<T, Status> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(api_error(what, format!("{e:#}"))),
        Err(_) => Err(Status::unavailable(format!("{what}: the Kubernetes API did not answer within {API_TIMEOUT:?}"))),
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// May `caller` have `wanted`? `impersonating`: the request carries
/// `ImpersonatedIdentity` (already checked to name `wanted`).
///
/// As istiod: only the node agents' service account may impersonate, and
/// only by saying so. istiod signs the caller's own identity whatever the
/// CSR asks for unless `ImpersonatedIdentity` is set; this CA refuses such
/// a request instead of answering with a certificate nobody asked for.
pub async fn authorize<C: Cluster>(
    cluster: &C,
    caller: &Caller,
    wanted: &SpiffeId,
    agent: (&str, &str),
    impersonating: bool,
) -> Result<Grounds, Status> {
    let is_agent = (caller.namespace.as_str(), caller.service_account.as_str()) == agent;
    if impersonating && !is_agent {
        return Err(Status::permission_denied(format!(
            "{caller} sets {IMPERSONATED_IDENTITY}, but only the node agent's service account {}/{} may \
             impersonate; a workload may only have its own identity spiffe://{}/ns/{}/sa/{}",
            agent.0, agent.1, wanted.trust_domain, caller.namespace, caller.service_account
        )));
    }
    if wanted.namespace == caller.namespace && wanted.service_account == caller.service_account {
        return Ok(Grounds::Own);
    }
    if !is_agent {
        return Err(Status::permission_denied(format!(
            "{caller} may only have its own identity spiffe://{}/ns/{}/sa/{}, not {wanted}; only the node agent's \
             service account {}/{} may ask for others",
            wanted.trust_domain, caller.namespace, caller.service_account, agent.0, agent.1
        )));
    }
    if !impersonating {
        return Err(Status::permission_denied(format!(
            "{caller} asks for {wanted}, which is not its own identity, without {IMPERSONATED_IDENTITY} in the \
             request metadata; a node agent must name the identity it impersonates (as istiod requires)"
        )));
    }
    let node = match (&caller.node, &caller.pod_name, &caller.pod_uid) {
        (Some(node), _, _) => node.clone(),
        (None, Some(name), Some(uid)) => {
            let pod = with_timeout("looking up the caller's pod", cluster.pod(&caller.namespace, name)).await?;
            let pod = pod.ok_or_else(|| {
                Status::permission_denied(format!("the caller's pod {}/{name} does not exist", caller.namespace))
            })?;
            if &pod.uid != uid {
                return Err(Status::permission_denied(format!(
                    "the caller's pod {}/{name} has UID {}, not the token's {uid}: the token is for a pod that is gone",
                    caller.namespace, pod.uid
                )));
            }
            if pod.service_account != caller.service_account {
                return Err(Status::permission_denied(format!(
                    "the caller's pod {}/{name} runs as {}, not {}",
                    caller.namespace, pod.service_account, caller.service_account
                )));
            }
            pod.node.ok_or_else(|| {
                Status::permission_denied(format!("the caller's pod {}/{name} is not on a node", caller.namespace))
            })?
        }
        _ => {
            return Err(Status::permission_denied(format!(
                "{caller} asks for {wanted}, but its token is not bound to a pod (the TokenReview has no {NODE_NAME} \
                 and no {POD_NAME}/{POD_UID}), so its node is unknown; mount a projected service account token"
            )))
        }
    };
    if !is_dns_name(&node) {
        return Err(Status::permission_denied(format!(
            "the caller's node name {:?} is not a node name",
            bounded(&node)
        )));
    }
    let pods = with_timeout(
        "listing the pods on the caller's node",
        cluster.pods_on_node(&wanted.namespace, &wanted.service_account, &node),
    )
    .await?;
    match pods.into_iter().min() {
        Some(pod) => Ok(Grounds::Node { node, pod: format!("{}/{pod}", wanted.namespace) }),
        None => Err(Status::permission_denied(format!(
            "no pod with service account {}/{} runs on {node}, the node of {caller}; a node agent gets only the \
             identities of pods on its own node",
            wanted.namespace, wanted.service_account
        ))),
    }
}

/// The gRPC service.
pub struct CaService<C> {
    ca: Arc<Ca>,
    cluster: C,
    trust_domain: String,
    agent: (String, String),
    audiences: Vec<String>,
    max_ttl: Duration,
    default_ttl: Duration,
    root_pems: Vec<String>,
}

impl<C: Cluster> CaService<C> {
    pub fn new(ca: Arc<Ca>, cluster: C, opts: &ServeOptions) -> Result<Self> {
        let (ns, name) = opts
            .agent_service_account
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .with_context(|| {
                format!("--agent-service-account {:?}: expected <namespace>/<name>", opts.agent_service_account)
            })?;
        super::validate_trust_domain(&opts.trust_domain).map_err(anyhow::Error::msg).context("--trust-domain")?;
        if opts.audiences.is_empty() {
            bail!("--audience: at least one is needed");
        }
        if opts.default_ttl > opts.max_ttl {
            bail!("--default-ttl {:?} exceeds --max-ttl {:?}", opts.default_ttl, opts.max_ttl);
        }
        let root_pems = ca.root_certs().iter().map(|c| files::to_pem("CERTIFICATE", c)).collect();
        Ok(CaService {
            ca,
            cluster,
            trust_domain: opts.trust_domain.clone(),
            agent: (ns.to_string(), name.to_string()),
            audiences: opts.audiences.clone(),
            max_ttl: opts.max_ttl,
            default_ttl: opts.default_ttl,
            root_pems,
        })
    }

    /// One request, start to end; every refusal is a status with a reason.
    pub async fn handle(
        &self,
        token: Option<&str>,
        req: &IstioCertificateRequest,
    ) -> Result<(IstioCertificateResponse, String), Status> {
        let token = token.ok_or_else(|| {
            Status::unauthenticated("no bearer token: send `authorization: Bearer <service account token>`")
        })?;
        let status = with_timeout("reviewing the token", self.cluster.review(token, &self.audiences)).await?;
        let caller = caller_from_review(&status, &self.audiences).map_err(Status::unauthenticated)?;

        let checked = csr::check(&req.csr).map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let wanted = checked.id.clone();
        if wanted.trust_domain != self.trust_domain {
            return Err(Status::invalid_argument(format!(
                "the CSR asks for {wanted}, but this CA signs only trust domain {}",
                self.trust_domain
            )));
        }
        // An empty string is no impersonation, as for istiod.
        let mut impersonating = false;
        if let Some(value) = req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) {
            let impersonated = match &value.kind {
                Some(prost_types::value::Kind::StringValue(s)) => s.as_str(),
                _ => {
                    return Err(Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY} must be a string")))
                }
            };
            if !impersonated.is_empty() && impersonated != wanted.to_string() {
                return Err(Status::invalid_argument(format!(
                    "metadata {IMPERSONATED_IDENTITY} is {:?}, but the CSR asks for {wanted}; they must agree",
                    bounded(impersonated)
                )));
            }
            impersonating = !impersonated.is_empty();
        }
        let ttl = match req.validity_duration {
            d if d <= 0 => self.default_ttl,
            d => Duration::from_secs(d as u64),
        };
        if ttl > self.max_ttl {
            return Err(Status::invalid_argument(format!(
                "requested lifetime {}s exceeds this CA's maximum of {}s",
                ttl.as_secs(),
                self.max_ttl.as_secs()
            )));
        }

        let grounds = authorize(&self.cluster, &caller, &wanted, (&self.agent.0, &self.agent.1), impersonating).await?;

        let signed = self
            .ca
            .sign(&wanted, ttl, &checked.params.public_key)
            .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
        let leaf_spki = x509_parser::parse_x509_certificate(&signed.chain[0])
            .map(|(_, c)| c.public_key().raw.to_vec())
            .map_err(|e| Status::internal(format!("the signed certificate does not parse: {e}")))?;
        if leaf_spki != checked.spki {
            return Err(Status::invalid_argument(
                "the CSR's key cannot be certified as given (its algorithm and signature algorithm disagree)",
            ));
        }
        let serial = signed.serial_hex();
        info!(
            identity = %wanted,
            caller = %caller,
            grounds = %grounds,
            impersonated = impersonating,
            serial = %serial,
            not_after = %utc(signed.not_after),
            ttl_secs = ttl.as_secs(),
            "issued certificate"
        );
        let mut cert_chain: Vec<String> = signed.chain.iter().map(|c| files::to_pem("CERTIFICATE", c)).collect();
        cert_chain.extend(self.root_pems.iter().cloned());
        Ok((IstioCertificateResponse { cert_chain }, serial))
    }
}

#[tonic::async_trait]
impl<C: Cluster> IstioCertificateService for CaService<C> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        let token = bearer(request.metadata());
        match self.handle(token.as_deref(), request.get_ref()).await {
            Ok((response, _serial)) => Ok(Response::new(response)),
            Err(status) => {
                let level_warn = status.code() != Code::Unavailable;
                if level_warn {
                    warn!(peer = %peer, code = ?status.code(), reason = status.message(), "refused certificate request");
                } else {
                    tracing::error!(peer = %peer, reason = status.message(), "certificate request failed");
                }
                Err(status)
            }
        }
    }
}

fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

/// The service's TLS certificate, signed by the CA itself (the agents trust
/// the root), and renewed on the first handshake past its half-life.
struct ServingCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").field("names", &self.names).finish_non_exhaustive()
    }
}

impl ServingCert {
    fn new(ca: Arc<Ca>, names: Vec<String>) -> Result<ServingCert> {
        let current = RwLock::new(Self::issue(&ca, &names)?);
        Ok(ServingCert { ca, names, current })
    }

    fn issue(ca: &Ca, names: &[String]) -> Result<(Arc<CertifiedKey>, SystemTime)> {
        let (signed, key) = ca.issue_server(names, SERVING_TTL).context("issuing the service's TLS certificate")?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> = signed.chain.clone();
        let certified = CertifiedKey::from_der(chain, key_der, &crate::tls::provider())
            .context("loading the service's TLS certificate")?;
        let life = signed.not_after.duration_since(signed.issued_at).unwrap_or_default();
        Ok((Arc::new(certified), signed.issued_at + life / 2))
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let (key, refresh_at) = self.current.read().unwrap_or_else(PoisonError::into_inner).clone();
        if SystemTime::now() < refresh_at {
            return Some(key);
        }
        match Self::issue(&self.ca, &self.names) {
            Ok(fresh) => {
                let key = fresh.0.clone();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                Some(key)
            }
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "renewing the service's TLS certificate failed; keeping the current one"
                );
                Some(key)
            }
        }
    }
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no --kubeconfig, and no in-cluster service account credentials to reach the Kubernetes API")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Serves until SIGTERM or SIGINT. Prints `LISTENING <addr>` and `READY`.
pub async fn serve(opts: ServeOptions) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let ca = Arc::new(Ca::load(&opts.dir).with_context(|| format!("loading the CA from {}", opts.dir.display()))?);
    let client = kube_client(opts.kubeconfig.as_ref()).await?;
    let service = CaService::new(ca.clone(), KubeCluster(client), &opts)?;

    let mut names: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    for san in &opts.sans {
        if !names.contains(san) {
            names.push(san.clone());
        }
    }
    let serving = Arc::new(ServingCert::new(ca.clone(), names.clone())?);
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener =
        tokio::net::TcpListener::bind(opts.listen).await.with_context(|| format!("listening on {}", opts.listen))?;
    let local = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(accept_loop(listener, acceptor, tx));
    let incoming = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|io| (io, rx)) });

    info!(
        listen = %local,
        trust_domain = %opts.trust_domain,
        agent_service_account = %opts.agent_service_account,
        max_ttl = ?opts.max_ttl,
        tls_names = ?names,
        ca_not_after = %utc(ca.not_after()),
        "sluice CA serving istio.v1.auth.IstioCertificateService"
    );
    println!("LISTENING {local}");
    println!("READY");

    let svc = IstioCertificateServiceServer::new(service).max_decoding_message_size(MAX_REQUEST);
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
    };
    tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .concurrency_limit_per_connection(64)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")
}

type TlsIo = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<Result<TlsIo, std::io::Error>>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if tx.is_closed() {
            return;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            warn!(%peer, "too many TLS handshakes in progress; dropping the connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(tls)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests;
