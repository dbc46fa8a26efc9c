//! The CA service's rules against an in-memory cluster: who may have which
//! identity, and the status each refusal carries.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::UserInfo;

use super::*;
use crate::identity::testutil;

/// token -> review; pods: (ns, name) -> info.
#[derive(Default)]
struct FakeCluster {
    reviews: BTreeMap<String, TokenReviewStatus>,
    pods: BTreeMap<(String, String), PodInfo>,
}

impl Cluster for FakeCluster {
    async fn review(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus> {
        let mut status = self.reviews.get(token).cloned().unwrap_or(TokenReviewStatus {
            authenticated: Some(false),
            error: Some("invalid bearer token".into()),
            ..Default::default()
        });
        if status.authenticated == Some(true) && status.audiences.is_none() {
            status.audiences = Some(audiences.to_vec());
        }
        Ok(status)
    }
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>> {
        Ok(self.pods.get(&(namespace.to_string(), name.to_string())).cloned())
    }
    async fn pods_on_node(&self, namespace: &str, sa: &str, node: &str) -> Result<Vec<String>> {
        Ok(self
            .pods
            .iter()
            .filter(|((ns, _), p)| ns == namespace && p.service_account == sa && p.node.as_deref() == Some(node))
            .map(|((_, name), _)| name.clone())
            .collect())
    }
}

fn sa_review(ns: &str, sa: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(true),
        user: Some(UserInfo {
            username: Some(format!("system:serviceaccount:{ns}:{sa}")),
            groups: Some(vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")]),
            extra: Some(extra.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect()),
            uid: None,
        }),
        ..Default::default()
    }
}

fn pod(uid: &str, node: &str, sa: &str) -> PodInfo {
    PodInfo { uid: uid.into(), node: Some(node.into()), service_account: sa.into() }
}

fn service() -> (tempfile::TempDir, CaService<FakeCluster>) {
    let (dir, ca) = testutil::new_ca();
    let mut cluster = FakeCluster::default();
    cluster.reviews.insert("sleep".into(), sa_review("default", "sleep", &[]));
    cluster.reviews.insert("agent1".into(), sa_review("sluice-system", "sluice", &[(NODE_NAME, "node1")]));
    cluster
        .reviews
        .insert("agent-pod".into(), sa_review("sluice-system", "sluice", &[(POD_NAME, "sluice-x"), (POD_UID, "u-x")]));
    cluster.reviews.insert(
        "agent-stale".into(),
        sa_review("sluice-system", "sluice", &[(POD_NAME, "sluice-x"), (POD_UID, "u-old")]),
    );
    cluster.reviews.insert("agent-unbound".into(), sa_review("sluice-system", "sluice", &[]));
    cluster.reviews.insert("user".into(), {
        let mut r = sa_review("x", "y", &[]);
        r.user.as_mut().unwrap().username = Some("alice".into());
        r
    });
    cluster.pods.insert(("sluice-system".into(), "sluice-x".into()), pod("u-x", "node2", "sluice"));
    cluster.pods.insert(("default".into(), "web-1".into()), pod("u-1", "node1", "web"));
    cluster.pods.insert(("default".into(), "db-1".into()), pod("u-2", "node2", "db"));
    let opts = ServeOptions {
        dir: dir.path().into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        kubeconfig: None,
        trust_domain: "cluster.local".into(),
        agent_service_account: DEFAULT_AGENT_SERVICE_ACCOUNT.into(),
        audiences: vec![DEFAULT_AUDIENCE.into()],
        max_ttl: Duration::from_secs(3600),
        default_ttl: Duration::from_secs(600),
        sans: vec![],
    };
    let svc = CaService::new(ca, cluster, &opts).unwrap();
    (dir, svc)
}

fn request(id: &str, ttl: i64, impersonate: bool) -> IstioCertificateRequest {
    let id: SpiffeId = id.parse().unwrap();
    let (_key, csr) = csr::request(&id).unwrap();
    let metadata = impersonate.then(|| prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
        )]
        .into(),
    });
    IstioCertificateRequest { csr, validity_duration: ttl, metadata }
}

fn run<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";
const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

#[test]
fn own_identity_is_signed_with_the_chain_and_root() {
    let (_dir, svc) = service();
    let (resp, serial) = run(svc.handle(Some("sleep"), &request(SLEEP, 300, false))).unwrap();
    assert_eq!(resp.cert_chain.len(), 2, "leaf and root");
    let leaf = CertificateDer::from_pem_slice(resp.cert_chain[0].as_bytes()).unwrap();
    assert_eq!(SpiffeId::from_cert_der(&leaf).unwrap().to_string(), SLEEP);
    assert_eq!(serial.len(), 32);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let life = parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
    assert_eq!(life, 300 + CLOCK_SKEW_SECS, "asked 300 s, backdated by the skew");
}

const CLOCK_SKEW_SECS: i64 = super::super::CLOCK_SKEW.as_secs() as i64;

#[test]
fn a_node_agent_gets_the_pods_on_its_node_only() {
    let (_dir, svc) = service();
    assert!(run(svc.handle(Some("agent1"), &request(WEB, 0, true))).is_ok(), "web runs on node1");
    let e = run(svc.handle(Some("agent1"), &request(DB, 0, true))).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node1") && e.message().contains("default/db"), "{}", e.message());
    // Without node-name: the caller's pod (on node2) is looked up.
    assert!(run(svc.handle(Some("agent-pod"), &request(DB, 0, true))).is_ok());
    assert_eq!(run(svc.handle(Some("agent-pod"), &request(WEB, 0, true))).unwrap_err().code(), Code::PermissionDenied);
    let stale = run(svc.handle(Some("agent-stale"), &request(DB, 0, true))).unwrap_err();
    assert!(stale.message().contains("UID"), "{}", stale.message());
    let unbound = run(svc.handle(Some("agent-unbound"), &request(DB, 0, true))).unwrap_err();
    assert!(unbound.message().contains("not bound to a pod"), "{}", unbound.message());
}

#[test]
fn refusals_carry_their_status() {
    let (_dir, svc) = service();
    let code = |token: Option<&str>, req: IstioCertificateRequest| run(svc.handle(token, &req)).unwrap_err();
    assert_eq!(code(None, request(SLEEP, 0, false)).code(), Code::Unauthenticated);
    assert_eq!(code(Some("forged"), request(SLEEP, 0, false)).code(), Code::Unauthenticated);
    let user = code(Some("user"), request(SLEEP, 0, false));
    assert_eq!(user.code(), Code::Unauthenticated);
    assert!(user.message().contains("not a service account"));
    let other = code(Some("sleep"), request(WEB, 0, false));
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("only have its own identity"), "{}", other.message());
    // Impersonation is for the agent's service account only.
    assert_eq!(code(Some("sleep"), request(WEB, 0, true)).code(), Code::PermissionDenied);
    let ttl = code(Some("sleep"), request(SLEEP, 7200, false));
    assert_eq!(ttl.code(), Code::InvalidArgument);
    assert!(ttl.message().contains("maximum of 3600s"), "{}", ttl.message());
    let td = code(Some("sleep"), request("spiffe://other.td/ns/default/sa/sleep", 0, false));
    assert_eq!(td.code(), Code::InvalidArgument);
    let mut mismatch = request(SLEEP, 0, false);
    mismatch.metadata = request(WEB, 0, true).metadata;
    assert_eq!(code(Some("sleep"), mismatch).code(), Code::InvalidArgument);
    let mut garbage = request(SLEEP, 0, false);
    garbage.csr = "not a csr".into();
    assert_eq!(code(Some("sleep"), garbage).code(), Code::InvalidArgument);
}

/// A node agent asking for a pod's identity must say it impersonates (as
/// istiod requires), and nobody else may say so.
#[test]
fn impersonation_must_be_declared_and_is_for_the_agent_only() {
    let (_dir, svc) = service();
    // web runs on node1: granted with the metadata...
    assert!(run(svc.handle(Some("agent1"), &request(WEB, 0, true))).is_ok());
    // ...refused without it, and with it empty (istiod: empty means none).
    let bare = run(svc.handle(Some("agent1"), &request(WEB, 0, false))).unwrap_err();
    assert_eq!(bare.code(), Code::PermissionDenied, "{bare:?}");
    assert!(
        bare.message().contains("not its own identity") && bare.message().contains(IMPERSONATED_IDENTITY),
        "{}",
        bare.message()
    );
    let mut empty = request(WEB, 0, true);
    empty.metadata.as_mut().unwrap().fields.insert(
        IMPERSONATED_IDENTITY.into(),
        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(String::new())) },
    );
    assert_eq!(run(svc.handle(Some("agent1"), &empty)).unwrap_err().code(), Code::PermissionDenied);
    // The agent's own identity needs none.
    let own = "spiffe://cluster.local/ns/sluice-system/sa/sluice";
    assert!(run(svc.handle(Some("agent1"), &request(own, 0, false))).is_ok());
    // A workload may not impersonate, not even itself (istiod refuses it too).
    let workload = run(svc.handle(Some("sleep"), &request(SLEEP, 0, true))).unwrap_err();
    assert_eq!(workload.code(), Code::PermissionDenied);
    assert!(workload.message().contains("may impersonate"), "{}", workload.message());
    assert_eq!(
        Grounds::Node { node: "n".into(), pod: "p".into() }.to_string(),
        "node agent on n impersonating, where pod p runs"
    );
}

#[test]
fn reviews_need_the_audience() {
    let mut status = sa_review("default", "sleep", &[]);
    status.audiences = Some(vec![]);
    let err = caller_from_review(&status, &["istio-ca".into()]).unwrap_err();
    assert!(err.contains("audience istio-ca"), "{err}");
    status.audiences = Some(vec!["istio-ca".into()]);
    let caller = caller_from_review(&status, &["istio-ca".into()]).unwrap();
    assert_eq!(caller.to_string(), "default/sleep");
}

use rustls::pki_types::pem::PemObject as _;
