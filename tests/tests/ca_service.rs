//! `sluice ca serve` and the agents' CSR client, as real processes over
//! real sockets (issue 12).
//!
//! The CA reviews tokens and looks pods up in the fake API server
//! (`sluice_tests::fake_api`). The fake answers a TokenReview with a user
//! and groups only; a real API server also puts the pod-bound token's
//! `authentication.kubernetes.io/{pod-name,pod-uid,node-name}` in
//! `status.user.extra`. [`Extras`] is a small HTTP proxy in front of the
//! fake that adds them per token, so the CA sees what it would see on a
//! cluster.
//!
//! - `refusals_each_with_their_status`: no root needed; the CA on
//!   127.0.0.1, a gRPC client in this process.
//! - `agents_get_leaves_from_the_ca_and_mtls_works_across_nodes` and
//!   `ca_down_longer_than_a_rotation_interval`: two simulated nodes, the CA
//!   in the lan netns, real agents with `ca.address`.
//! - `manifests_keep_the_key_off_the_nodes`: deploy/ as written.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{
    agent_bin, evidence,
    fake_api::{objects, FakeApiServer},
    mesh::{http_get, metric_sum, write_atomic, Mesh},
    netns::{exec_in_ok, listen_in},
    require_root,
    traffic::send_verified,
    ChildGuard, Node, Place, Pod, Topology,
};
use tonic::Code;

const TD: &str = "cluster.local";
const AGENT_NS: &str = "sluice-system";
const AGENT_SA: &str = "sluice";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The CA's address on the lan bridge, in every topology of this suite.
const CA_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 10, 250);

// ---------------------------------------------------------------------------
// The fake API server with per-token TokenReview answers and their extras.

/// The fake API server, the proxy in front of it, and who each token is.
struct Api {
    fake: Arc<FakeApiServer>,
    tokens: Arc<Mutex<HashMap<String, (String, Value)>>>,
    proxy: Extras,
}

impl Api {
    /// The proxy listens on `listener` (e.g. bound inside the lan netns).
    fn start(listener: std::net::TcpListener) -> Result<Api> {
        let fake = Arc::new(FakeApiServer::start()?);
        let tokens: Arc<Mutex<HashMap<String, (String, Value)>>> = Arc::default();
        let answers = tokens.clone();
        fake.on_token_review(move |token, _audiences| {
            let (user, _) = answers.lock().unwrap().get(token)?.clone();
            let ns = user.split(':').nth(2).unwrap_or_default().to_string();
            Some((
                user,
                vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ],
            ))
        });
        let proxy = Extras::start(listener, fake.addr(), tokens.clone())?;
        Ok(Api { fake, tokens, proxy })
    }

    /// `token` authenticates as `ns/sa`, with these extras in the review.
    fn token(&self, token: &str, ns: &str, sa: &str, extra: &[(&str, &str)]) {
        let extra: serde_json::Map<String, Value> = extra.iter().map(|(k, v)| (k.to_string(), json!([v]))).collect();
        self.tokens
            .lock()
            .unwrap()
            .insert(token.into(), (format!("system:serviceaccount:{ns}:{sa}"), Value::Object(extra)));
    }

    fn pod(&self, ns: &str, name: &str, uid: &str, node: &str, sa: &str) -> Result<()> {
        let ip: IpAddr = "10.99.0.1".parse()?;
        self.fake.apply(objects::pod(ns, name, uid, node, sa, &[ip], &[]))?;
        Ok(())
    }

    /// A kubeconfig pointing at the proxy.
    fn kubeconfig(&self, path: &Path) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: {}\n",
            self.proxy.addr,
            sluice_tests::fake_api::TOKEN
        );
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
    }
}

/// HTTP/1 proxy to the fake API server that adds `status.user.extra` to
/// TokenReview answers (see the module comment).
struct Extras {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Extras {
    fn start(
        listener: std::net::TcpListener,
        upstream: SocketAddr,
        tokens: Arc<Mutex<HashMap<String, (String, Value)>>>,
    ) -> Result<Extras> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let tokens = tokens.clone();
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    let tokens = tokens.clone();
                                    async move { Ok::<_, std::convert::Infallible>(forward(req, upstream, &tokens).await) }
                                });
                                let io = hyper_util::rt::TokioIo::new(stream);
                                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                            });
                        }
                    }
                }
            });
        });
        Ok(Extras { addr, stop: Some(tx), thread: Some(thread) })
    }
}

impl Drop for Extras {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

async fn forward(
    req: hyper::Request<hyper::body::Incoming>,
    upstream: SocketAddr,
    tokens: &Mutex<HashMap<String, (String, Value)>>,
) -> hyper::Response<Body> {
    use http_body_util::BodyExt;
    let fail = |why: String| {
        let mut r = hyper::Response::new(Body::from(why));
        *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
        r
    };
    let review = req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews";
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return fail("reading the request".into()) };
    let token = review
        .then(|| serde_json::from_slice::<Value>(&body).ok())
        .flatten()
        .and_then(|v| v.pointer("/spec/token").and_then(Value::as_str).map(str::to_string));
    let answer = async {
        let stream = tokio::net::TcpStream::connect(upstream).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let resp = sender.send_request(hyper::Request::from_parts(parts, Body::from(body))).await?;
        let (parts, body) = resp.into_parts();
        anyhow::Ok((parts, body.collect().await?.to_bytes()))
    };
    let (mut parts, mut bytes) = match tokio::time::timeout(Duration::from_secs(5), answer).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return fail(format!("{e:#}")),
        Err(_) => return fail("upstream timed out".into()),
    };
    if let Some(token) = token {
        let extra = tokens.lock().unwrap().get(&token).map(|(_, e)| e.clone());
        if let (Some(extra), Ok(mut v)) = (extra, serde_json::from_slice::<Value>(&bytes)) {
            if v.pointer("/status/authenticated") == Some(&json!(true)) {
                v["status"]["user"]["extra"] = extra;
                bytes = serde_json::to_vec(&v).unwrap_or_default().into();
                parts.headers.remove(hyper::header::CONTENT_LENGTH);
            }
        }
    }
    hyper::Response::from_parts(parts, Body::from(bytes))
}

// ---------------------------------------------------------------------------
// `sluice ca serve` as a process.

fn ca_args(dir: &Path, listen: &str, kubeconfig: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["ca", "serve", "--dir"].iter().map(|s| s.to_string()).collect();
    args.push(dir.display().to_string());
    args.extend(["--listen".into(), listen.into(), "--kubeconfig".into(), kubeconfig.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A `sluice ca serve` in this process's netns (for the no-root test).
struct LocalCa {
    child: Option<Child>,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl LocalCa {
    fn start(args: &[String]) -> Result<LocalCa> {
        use std::io::{BufRead, Read};
        let mut child = Command::new(agent_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning sluice ca serve")?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (mut err, sink) = (child.stderr.take().context("stderr")?, stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().context("stdout")?;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut ca = LocalCa { child: Some(child), addr: "0.0.0.0:0".parse()?, stderr };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("LISTENING ") => ca.addr = line["LISTENING ".len()..].parse()?,
                Ok(line) if line == "READY" => return Ok(ca),
                Ok(_) => {}
                Err(_) => bail!("sluice ca serve did not print READY:\n{}", ca.stderr_text()),
            }
        }
    }

    fn stderr_text(&self) -> String {
        plain(&String::from_utf8_lossy(&self.stderr.lock().unwrap()))
    }
}

/// Log text without terminal colour codes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for LocalCa {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The lan netns and a cgroup of its own, for the CA in a topology.
struct LanPlace {
    netns: String,
    cgroup: PathBuf,
}

impl Place for LanPlace {
    fn netns_name(&self) -> &str {
        &self.netns
    }
    fn cgroup_path(&self) -> PathBuf {
        self.cgroup.clone()
    }
}

impl Drop for LanPlace {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------
// gRPC client side (the refusal test).

use sluice::identity::proto::{
    istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
};

fn csr_for(sans: Vec<rcgen::SanType>) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.try_into().unwrap())
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

async fn ask(
    client: &mut IstioCertificateServiceClient<tonic::transport::Channel>,
    token: Option<&str>,
    csr: String,
    ttl: i64,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: ttl, metadata });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.set_timeout(Duration::from_secs(10));
    client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// The SPIFFE ID in the first certificate of an answer.
fn leaf_id(chain: &[String]) -> String {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_slice(chain[0].as_bytes()).expect("a PEM leaf");
    sluice::identity::SpiffeId::from_cert_der(&der).expect("a SPIFFE leaf").to_string()
}

/// (what, token, CSR, TTL, ImpersonatedIdentity, expected code, in the message).
type Case<'a> = (&'a str, Option<&'a str>, String, i64, Option<String>, Code, &'a str);

#[test]
fn refusals_each_with_their_status() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca_dir = dir.path().join("ca");
    let out = Command::new(agent_bin()).args(["ca", "init", "--dir"]).arg(&ca_dir).output()?;
    ensure!(out.status.success(), "ca init: {}", String::from_utf8_lossy(&out.stderr));
    let api = Api::start(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    api.token("sleep", "default", "sleep", &[(POD_NAME, "sleep-1"), (POD_UID, "u-s1"), (NODE_NAME, "node1")]);
    api.token("agent-node1", AGENT_NS, AGENT_SA, &[(POD_NAME, "sluice-a"), (POD_UID, "u-a"), (NODE_NAME, "node1")]);
    // No node-name (as before Kubernetes 1.30): the CA looks the pod up.
    api.token("agent-pod2", AGENT_NS, AGENT_SA, &[(POD_NAME, "sluice-b"), (POD_UID, "u-b")]);
    api.token("agent-unbound", AGENT_NS, AGENT_SA, &[]);
    api.pod("default", "sleep-1", "u-s1", "node1", "sleep")?;
    api.pod("default", "web-1", "u-w1", "node1", "web")?;
    api.pod("default", "db-1", "u-d1", "node2", "db")?;
    api.pod(AGENT_NS, "sluice-a", "u-a", "node1", AGENT_SA)?;
    api.pod(AGENT_NS, "sluice-b", "u-b", "node2", AGENT_SA)?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let ca =
        LocalCa::start(&ca_args(&ca_dir, "127.0.0.1:0", &kubeconfig, &["--max-ttl", "1h", "--default-ttl", "10m"]))?;

    let root = std::fs::read(ca_dir.join("root-cert.pem"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut failures = Vec::new();
    rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&root))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", ca.addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .context("connecting to the CA")?;
        let mut c = IstioCertificateServiceClient::new(channel);
        let own = || csr_for(vec![uri(&spiffe("default", "sleep"))]);
        let web = || csr_for(vec![uri(&spiffe("default", "web"))]);
        let db = || csr_for(vec![uri(&spiffe("default", "db"))]);

        // Grants first, so that the refusals below are not blanket ones.
        let chain = ask(&mut c, Some("sleep"), own(), 600, None).await.context("own identity")?;
        ensure!(leaf_id(&chain) == spiffe("default", "sleep") && chain.len() >= 2, "own identity: {chain:?}");
        let chain = ask(&mut c, Some("agent-node1"), web(), 0, Some(&spiffe("default", "web"))).await?;
        ensure!(leaf_id(&chain) == spiffe("default", "web"));
        let chain = ask(&mut c, Some("agent-pod2"), db(), 0, Some(&spiffe("default", "db"))).await?;
        ensure!(leaf_id(&chain) == spiffe("default", "db"));
        evidence("CA granted: own identity (default/sleep); node1's agent -> web on node1 (node-name extra); node2's agent -> db on node2 (pod looked up by pod-name/pod-uid)");

        let cases: Vec<Case> = vec![
            ("bad token", Some("forged-token"), own(), 0, None, Code::Unauthenticated, "not accepted"),
            ("no token", None, own(), 0, None, Code::Unauthenticated, "no bearer token"),
            ("another service account's identity", Some("sleep"), web(), 0, None, Code::PermissionDenied, "only have its own identity"),
            ("impersonation by a non-agent", Some("sleep"), web(), 0, Some(spiffe("default", "web")), Code::PermissionDenied, "only the node agent"),
            // web runs on node1, so only the missing metadata refuses this:
            // the agent must say it impersonates, as istiod requires.
            ("node agent, pod on its node, without ImpersonatedIdentity", Some("agent-node1"), web(), 0, None, Code::PermissionDenied, "without ImpersonatedIdentity"),
            ("node agent, pod not on its node", Some("agent-node1"), db(), 0, Some(spiffe("default", "db")), Code::PermissionDenied, "runs on node1"),
            ("node agent (pod lookup), pod not on its node", Some("agent-pod2"), web(), 0, Some(spiffe("default", "web")), Code::PermissionDenied, "runs on node2"),
            ("node agent with an unbound token", Some("agent-unbound"), web(), 0, Some(spiffe("default", "web")), Code::PermissionDenied, "not bound to a pod"),
            ("two SANs", Some("sleep"), csr_for(vec![uri(&spiffe("default", "sleep")), uri(&spiffe("default", "web"))]), 0, None, Code::InvalidArgument, "2 subjectAltNames"),
            ("SPIFFE + DNS SAN", Some("sleep"), csr_for(vec![uri(&spiffe("default", "sleep")), rcgen::SanType::DnsName("sleep.default.svc".try_into().unwrap())]), 0, None, Code::InvalidArgument, "2 subjectAltNames"),
            ("non-SPIFFE URI SAN", Some("sleep"), csr_for(vec![uri("https://sleep.default.svc/")]), 0, None, Code::InvalidArgument, "not a SPIFFE ID"),
            ("DNS SAN only", Some("sleep"), csr_for(vec![rcgen::SanType::DnsName("sleep.default.svc".try_into().unwrap())]), 0, None, Code::InvalidArgument, "DNS name"),
            ("TTL over the maximum", Some("sleep"), own(), 7200, None, Code::InvalidArgument, "maximum of 3600s"),
            ("another trust domain", Some("sleep"), csr_for(vec![uri("spiffe://evil.td/ns/default/sa/sleep")]), 0, None, Code::InvalidArgument, "trust domain"),
        ];
        for (what, token, csr, ttl, imp, code, needle) in cases {
            match ask(&mut c, token, csr, ttl, imp.as_deref()).await {
                Ok(chain) => failures.push(format!("{what}: granted ({})", leaf_id(&chain))),
                Err(s) if s.code() == code && s.message().contains(needle) => {
                    evidence(&format!("CA refused {what}: {:?}: {}", s.code(), s.message()));
                }
                Err(s) => failures.push(format!("{what}: want {code:?} containing {needle:?}, got {:?}: {}", s.code(), s.message())),
            }
        }
        anyhow::Ok(())
    })?;
    ensure!(failures.is_empty(), "wrong answers:\n{}\nCA log:\n{}", failures.join("\n"), ca.stderr_text());

    let reviews = api.fake.token_reviews();
    ensure!(!reviews.is_empty() && reviews.iter().all(|r| r.audiences == ["istio-ca"]), "TokenReviews: {reviews:?}");
    let log = ca.stderr_text();
    let issued: Vec<&str> = log.lines().filter(|l| l.contains("issued certificate")).collect();
    ensure!(issued.len() == 3, "want 3 issuance log lines, got:\n{log}");
    for line in &issued {
        for field in ["identity=spiffe://", "caller=", "serial=", "not_after="] {
            ensure!(line.contains(field), "issuance line lacks {field}: {line}");
        }
    }
    // The grants above, in order: own identity, then two impersonations.
    for (line, impersonated) in issued.iter().zip([false, true, true]) {
        ensure!(line.contains(&format!("impersonated={impersonated}")), "want impersonated={impersonated}: {line}");
    }
    evidence(&format!("issuance log: {}", issued[1].trim()));
    Ok(())
}

/// `sluice ca init` writes the key 0600, and `sluice ca serve` will not
/// start on a key that group or others can read: the error names the file
/// and its mode (issue 9, files and sockets).
#[test]
fn ca_serve_refuses_a_key_others_can_read() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let ca_dir = dir.path().join("ca");
    let out = Command::new(agent_bin()).args(["ca", "init", "--dir"]).arg(&ca_dir).output()?;
    ensure!(out.status.success(), "ca init: {}", String::from_utf8_lossy(&out.stderr));
    let key = ca_dir.join("ca-key.pem");
    let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "ca init wrote {} with mode {mode:04o}", key.display());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    // The CA is loaded before anything else, so no kubeconfig is needed to
    // see the refusal (and without the refusal, this one's absence fails
    // the start with another message).
    let args = ca_args(&ca_dir, "127.0.0.1:0", &dir.path().join("no-kubeconfig"), &[]);
    let out = Command::new(agent_bin()).args(&args).output()?;
    let stderr = plain(&String::from_utf8_lossy(&out.stderr));
    let want = format!("{} has mode 0644: readable by group/others; chmod 600", key.display());
    ensure!(
        !out.status.success() && stderr.contains(&want),
        "want a refusal with {want:?}, got {}: {stderr}",
        out.status
    );
    evidence(&format!("sluice ca serve with a 0644 key: {}", stderr.trim()));
    Ok(())
}

// ---------------------------------------------------------------------------
// Agents on two nodes.

struct Fixture {
    mesh: Mesh,
    n1: Node,
    n2: Node,
    a1: Pod,
    b1: Pod,
    /// More destinations on node2: each first connection to one is a new
    /// HBONE connection, so a new TLS handshake (b1's is pooled).
    b2: Pod,
    b3: Pod,
    api: Api,
    kubeconfig: PathBuf,
    configs: HashMap<String, PathBuf>,
    place: LanPlace,
    // Dropped last: agents and servers die with it.
    _topo: Topology,
}

impl Fixture {
    fn new(name: &str, cert_ttl: &str) -> Result<Fixture> {
        let topo = Topology::new(name)?;
        let n1 = topo.add_node("node1")?;
        let n2 = topo.add_node("node2")?;
        let (a1, b1, b2, b3) = (n1.add_pod("a1")?, n2.add_pod("b1")?, n2.add_pod("b2")?, n2.add_pod("b3")?);
        let mut mesh = Mesh::new(&topo, TD)?;
        mesh.cert_ttl = cert_ttl.into();
        mesh.add(&a1, "default", "sleep", true);
        mesh.add(&b1, "default", "httpbin", true);
        mesh.add(&b2, "default", "web", true);
        mesh.add(&b3, "default", "db", true);
        mesh.write_config()?;

        let lan = topo.lan_netns();
        exec_in_ok(&lan, &["ip", "addr", "add", &format!("{CA_IP}/24"), "dev", topo.bridge()])?;
        let api = Api::start(listen_in(&lan, "127.0.0.1:0".parse()?)?)?;
        for (pod, sa) in [(&a1, "sleep"), (&b1, "httpbin"), (&b2, "web"), (&b3, "db")] {
            api.pod("default", pod.name(), pod.uid(), pod.node_name(), sa)?;
        }
        // node1's agent token carries node-name; node2's only its pod, which
        // the CA then looks up (both shapes a real API server produces).
        api.pod(AGENT_NS, "sluice-node1", "uid-agent-1", "node1", AGENT_SA)?;
        api.pod(AGENT_NS, "sluice-node2", "uid-agent-2", "node2", AGENT_SA)?;
        api.token(
            "token-node1",
            AGENT_NS,
            AGENT_SA,
            &[(POD_NAME, "sluice-node1"), (POD_UID, "uid-agent-1"), (NODE_NAME, "node1")],
        );
        api.token("token-node2", AGENT_NS, AGENT_SA, &[(POD_NAME, "sluice-node2"), (POD_UID, "uid-agent-2")]);
        let kubeconfig = mesh.dir.path().join("ca-kubeconfig");
        api.kubeconfig(&kubeconfig)?;

        // One config per node: same mesh, the node's own token file.
        let rendered = mesh.render();
        let local_ca = format!("ca:\n  dir: {}\n", mesh.ca_dir().display());
        ensure!(rendered.contains(&local_ca), "the mesh config's ca section moved:\n{rendered}");
        let mut configs = HashMap::new();
        for node in ["node1", "node2"] {
            let token = mesh.dir.path().join(format!("token-{node}"));
            std::fs::write(&token, format!("token-{node}\n"))?;
            let remote = format!(
                "ca:\n  address: https://{CA_IP}:15012\n  rootCert: {}\n  tokenFile: {}\n",
                mesh.ca_dir().join("root-cert.pem").display(),
                token.display()
            );
            let path = mesh.dir.path().join(format!("config-{node}.yaml"));
            write_atomic(&path, &rendered.replace(&local_ca, &remote))?;
            configs.insert(node.to_string(), path);
        }
        let cgroup = topo.cgroup_path().join("sluice-ca");
        std::fs::create_dir_all(&cgroup)?;
        let place = LanPlace { netns: lan, cgroup };
        Ok(Fixture { mesh, n1, n2, a1, b1, b2, b3, api, kubeconfig, configs, place, _topo: topo })
    }

    fn start_ca(&self) -> Result<ChildGuard> {
        let args =
            ca_args(&self.mesh.ca_dir(), &format!("{CA_IP}:15012"), &self.kubeconfig, &["--san", &CA_IP.to_string()]);
        let mut cmd = Command::new(agent_bin());
        cmd.args(&args).env("RUST_LOG", "info");
        let mut child = sluice_tests::spawn_in(&self.place, cmd)?;
        if let Err(e) = child.wait_for_line("READY", Duration::from_secs(20)) {
            bail!("the CA did not start: {e:#}\n{}", child.stderr_text());
        }
        Ok(child)
    }

    fn start_agent(&self, node: &Node) -> Result<sluice_tests::Agent> {
        self.mesh.start_agent_with(node, "iptables", &self.configs[node.name()])
    }
}

fn config_dump(node: &Node) -> Result<Value> {
    Ok(serde_json::from_str(&http_get(node, 15000, "/config_dump")?)?)
}

/// Unix seconds of the pod's certificate expiry, from /config_dump.
fn cert_not_after(node: &Node, pod: &Pod) -> Result<u64> {
    let dump = config_dump(node)?;
    let uid = format!("default/{}", pod.name());
    let entry = dump["pods"].as_array().into_iter().flatten().find(|p| p["uid"] == uid.as_str());
    let text =
        entry.and_then(|p| p["cert_not_after"].as_str()).with_context(|| format!("no cert for {uid}: {dump}"))?;
    Ok(text.split(' ').next().unwrap_or_default().parse()?)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `bytes` from a1 to an echo server in `to`, checked byte for byte.
fn traffic(f: &Fixture, to: &Pod, bytes: u64) -> Result<()> {
    let (_srv, addr) = sluice_tests::traffic::echo_server(to, &format!("{}:8080", to.ipv4()), &[])?;
    let report = send_verified(&f.a1, &addr, bytes, Duration::from_secs(60))?;
    ensure!(report.bytes_verified >= bytes, "only {} of {bytes} bytes came back", report.bytes_verified);
    Ok(())
}

/// Whether `pod` is enrolled on `node` and holds a leaf.
fn enrolled(node: &Node, pod: &Pod) -> Result<bool> {
    let dump = config_dump(node)?;
    let uid = format!("default/{}", pod.name());
    Ok(dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["uid"] == uid.as_str() && p["cert_not_after"].is_string()))
}

/// mTLS connections the destination agent on `node` has closed.
fn mtls_connections(node: &Node) -> Result<u64> {
    Ok(metric_sum(
        &http_get(node, 15020, "/metrics")?,
        "istio_tcp_connections_closed_total",
        &["reporter=\"destination\"", "connection_security_policy=\"mutual_tls\""],
    ))
}

fn ca_failures(node: &Node) -> Result<u64> {
    Ok(metric_sum(&http_get(node, 15020, "/metrics")?, "sluice_ca_requests_total", &["result=\"error\""]))
}

/// Every readable mapping of `pid`'s memory, searched for `needle`.
fn memory_contains(pid: u32, needle: &[u8]) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (a, b) = (u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?);
        if b - a > 1 << 30 {
            continue;
        }
        buf.resize((b - a) as usize, 0);
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The CA key as it can turn up with a process: the key file's identity
/// (device, inode), and its bytes: the PEM file as written, its PKCS#8 DER,
/// and the 32-byte private scalar (ECPrivateKey's OCTET STRING inside the
/// PKCS#8 that `ca init` writes).
struct KeyMaterial {
    file: PathBuf,
    dev_ino: (u64, u64),
    needles: Vec<(&'static str, Vec<u8>)>,
}

impl KeyMaterial {
    fn of(ca_dir: &Path) -> Result<KeyMaterial> {
        use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::canonicalize(ca_dir.join("ca-key.pem"))?;
        let meta = std::fs::metadata(&file)?;
        let pem = std::fs::read(&file)?;
        let der = PrivateKeyDer::from_pem_slice(&pem)?.secret_der().to_vec();
        let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
        let at = der.windows(marker.len()).position(|w| w == marker).context("no EC private scalar in ca-key.pem")?;
        let scalar = der[at + marker.len()..at + marker.len() + 32].to_vec();
        Ok(KeyMaterial {
            file,
            dev_ino: (meta.dev(), meta.ino()),
            needles: vec![("the PEM key file", pem), ("the PKCS#8 key", der), ("the private scalar", scalar)],
        })
    }

    fn scalar(&self) -> &[u8] {
        &self.needles[2].1
    }

    fn pkcs8(&self) -> &[u8] {
        &self.needles[1].1
    }

    /// What of the key the file at `path` is or holds, if anything. Only
    /// regular files are read (never a FIFO or a device), and at most 4 MiB.
    fn found_in(&self, path: &Path) -> Option<String> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        if (meta.dev(), meta.ino()) == self.dev_ino {
            return Some(format!("is the key file {} itself (same inode)", self.file.display()));
        }
        if !meta.is_file() || meta.len() > 4 << 20 {
            return None;
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path).ok()?.take(4 << 20).read_to_end(&mut bytes).ok()?;
        let (what, _) = self.needles.iter().find(|(_, n)| bytes.windows(n.len()).any(|w| w == n.as_slice()))?;
        Some(format!("holds {what}"))
    }
}

/// Where a process has the CA key: each list empty is the expected answer
/// for an agent of the CA service.
#[derive(Debug, Default)]
struct Exposure {
    /// Descriptors, the working directory, and file mappings.
    open_files: Vec<String>,
    /// Files under the mounts of its own (see [`key_exposure`]).
    mounts: Vec<String>,
    /// Its memory, every readable mapping.
    memory: Vec<String>,
}

/// `(mount point, root, device)` of each mount in a mountinfo.
fn mounts_of(mountinfo: &str) -> Vec<(String, String, String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some((f.get(4)?.to_string(), f.get(3)?.to_string(), f.get(2)?.to_string(), f.get(dash + 1)?.to_string()))
        })
        .collect()
}

/// Regular files under `dir`, not crossing into other filesystems, at most
/// `depth` levels and 10,000 entries down.
fn files_under(dir: &Path, depth: usize, budget: &mut usize, out: &mut Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::metadata(dir) else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.dev() != top.dev() {
            continue;
        }
        if meta.is_dir() && depth > 0 {
            files_under(&path, depth - 1, budget, out);
        } else if meta.is_file() {
            out.push(path);
        }
    }
}

/// Where the agent `pid` has the CA key, looked for by its material, not
/// by file names:
///
/// - open files: every descriptor's target, the working directory (an
///   entry that is the key file) and every file mapping (the key file's
///   inode), as lsof lists them; the targets are read, so a copy of the key
///   under any name counts;
/// - mounts: every mount the agent has that this test process has not.
///   The simulated nodes share this host's mounts with the test, and with
///   the CA service, which must hold the key: what a DaemonSet would add
///   (a secret or hostPath volume) is a mount of the agent's own, in its
///   own mount namespace. Its files are searched like the open ones. Mount
///   lines naming the CA directory or `cacerts` count too;
/// - memory: the PKCS#8 key and the private scalar in any readable mapping.
fn key_exposure(pid: u32, key: &KeyMaterial, ca_dir: &Path) -> Result<Exposure> {
    let mut found = Exposure::default();
    let proc = PathBuf::from(format!("/proc/{pid}"));
    for entry in std::fs::read_dir(proc.join("fd"))? {
        let link = entry?.path();
        let target = std::fs::read_link(&link).unwrap_or_default();
        if let Some(what) = key.found_in(&link) {
            found.open_files.push(format!("fd {} -> {} {what}", link.display(), target.display()));
        }
    }
    let mut cwd_files = Vec::new();
    files_under(&proc.join("cwd"), 0, &mut 10_000, &mut cwd_files);
    for file in cwd_files {
        if let Some(what) = key.found_in(&file) {
            found.open_files.push(format!("working directory: {} {what}", file.display()));
        }
    }
    for line in std::fs::read_to_string(proc.join("maps"))?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[4].parse::<u64>().ok() == Some(key.dev_ino.1) && Path::new(f[5]) == key.file {
            found.open_files.push(format!("mapped: {line}"));
        }
    }

    let ours = mounts_of(&std::fs::read_to_string("/proc/self/mountinfo")?);
    let ca = std::fs::canonicalize(ca_dir)?.display().to_string();
    for line in std::fs::read_to_string(proc.join("mountinfo"))?.lines() {
        if line.contains(&ca) || line.contains("cacerts") {
            found.mounts.push(format!("mount naming the CA: {line}"));
        }
    }
    for (point, root, dev, fstype) in mounts_of(&std::fs::read_to_string(proc.join("mountinfo"))?) {
        if ours.iter().any(|(p, r, d, _)| (p, r, d) == (&point, &root, &dev)) || fstype == "proc" {
            continue;
        }
        let mut files = Vec::new();
        files_under(&proc.join("root").join(point.trim_start_matches('/')), 8, &mut 10_000, &mut files);
        for file in files {
            if let Some(what) = key.found_in(&file) {
                found.mounts.push(format!("{fstype} mount {point} (root {root}): {} {what}", file.display()));
            }
        }
    }

    for (what, needle) in [("the PKCS#8 key", key.pkcs8()), ("the private scalar", key.scalar())] {
        if memory_contains(pid, needle)? {
            found.memory.push(format!("{what} is in memory"));
        }
    }
    Ok(found)
}

/// Removes a cgroup once its processes are gone.
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The control for [`key_exposure`]: a `ca.dir` agent on `node` that has
/// the key the ways the checks look for. Its `ca.dir` is a mount of its own:
/// a tmpfs holding copies of the CA files, in a mount namespace of its own,
/// as a DaemonSet mounting the `cacerts` secret would have it (so the copy
/// is found by its bytes, not its inode or name); it signs with the key, so
/// it holds it in memory; and it starts with the key file open on an
/// inherited descriptor (the agent reads the file and closes it, so this
/// is planted, as a wrapper's `exec 3<ca-key.pem` would leave it).
fn start_key_holding_agent(f: &Fixture, node: &Node) -> Result<KeyHolder> {
    use std::{ffi::CString, os::unix::process::CommandExt};
    let mount_point = f.mesh.dir.path().join("keyholder-secret");
    std::fs::create_dir_all(&mount_point)?;
    let local_ca = format!("ca:\n  dir: {}\n", f.mesh.ca_dir().display());
    let rendered = f.mesh.render();
    ensure!(rendered.contains(&local_ca), "the mesh config's ca section moved:\n{rendered}");
    let config = f.mesh.dir.path().join("config-keyholder.yaml");
    write_atomic(&config, &rendered.replace(&local_ca, &format!("ca:\n  dir: {}\n", mount_point.display())))?;

    let target = CString::new(mount_point.display().to_string())?;
    let (tmpfs, options) = (CString::new("tmpfs")?, CString::new("mode=0700")?);
    // Written into the tmpfs by the child: paths and bytes made here.
    let mut copies = Vec::new();
    for name in ["root-cert.pem", "ca-key.pem"] {
        let path = CString::new(mount_point.join(name).display().to_string())?;
        copies.push((path, std::fs::read(f.mesh.ca_dir().join(name))?));
    }
    let key_file = CString::new(f.mesh.ca_dir().join("ca-key.pem").display().to_string())?;
    let root = CString::new("/")?;
    let pins = PinDirGuard(sluice_tests::PinDir::new(&format!("caserv-keyholder-{}", std::process::id())));
    let cgroup = CgroupDir(node.cgroup_path().join(format!("keyholder-{}", std::process::id())));
    std::fs::create_dir_all(&cgroup.0)?;
    let place = PlainPlace { netns: node.netns_name().to_owned(), cgroup: cgroup.0.clone() };
    let cni_socket = f.mesh.dir.path().join("keyholder-cni.sock");
    let mut cmd = Command::new(agent_bin());
    cmd.args(["run", "--config"]).arg(&config).args(["--node", node.name(), "--redirect", "iptables", "--pin-root"]);
    cmd.arg(&pins.0 .0).arg("--cni-socket").arg(&cni_socket).env("RUST_LOG", "info");
    // SAFETY: only raw syscalls on C strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            let private = (libc::MS_REC | libc::MS_PRIVATE) as libc::c_ulong;
            if libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), private, std::ptr::null()) != 0 {
                return fail();
            }
            if libc::mount(tmpfs.as_ptr(), target.as_ptr(), tmpfs.as_ptr(), 0, options.as_ptr().cast()) != 0 {
                return fail();
            }
            for (path, bytes) in &copies {
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600);
                if fd < 0 || libc::write(fd, bytes.as_ptr().cast(), bytes.len()) != bytes.len() as isize {
                    return fail();
                }
                libc::close(fd);
            }
            // No O_CLOEXEC: the agent inherits it.
            if libc::open(key_file.as_ptr(), libc::O_RDONLY) < 0 {
                return fail();
            }
            Ok(())
        });
    }
    let mut child = sluice_tests::spawn_in(&place, cmd)?;
    if let Err(e) = child.wait_for_line("READY", Duration::from_secs(20)) {
        bail!("the key-holding control agent did not start: {e:#}\n{}", child.stderr_text());
    }
    Ok(KeyHolder { child, _cgroup: cgroup, _pins: pins })
}

/// The control agent; fields drop in order: the process, then its cgroup
/// and pin directory.
struct KeyHolder {
    child: sluice_tests::ChildGuard,
    _cgroup: CgroupDir,
    _pins: PinDirGuard,
}

struct PinDirGuard(sluice_tests::PinDir);

/// A netns and a cgroup that someone else removes.
struct PlainPlace {
    netns: String,
    cgroup: PathBuf,
}

impl Place for PlainPlace {
    fn netns_name(&self) -> &str {
        &self.netns
    }
    fn cgroup_path(&self) -> PathBuf {
        self.cgroup.clone()
    }
}

#[test]
fn agents_get_leaves_from_the_ca_and_mtls_works_across_nodes() -> Result<()> {
    require_root!(Ok(()));
    let f = Fixture::new("caserv", "1h")?;
    let mut ca = f.start_ca()?;
    let (ag1, ag2) = (f.start_agent(&f.n1)?, f.start_agent(&f.n2)?);

    traffic(&f, &f.b1, 8 << 20)?;
    ensure!(mtls_connections(&f.n2)? >= 1, "node2 saw no mTLS connection");
    evidence("a1 (node1) -> b1 (node2): 8 MiB echoed byte-exact over HBONE with CA-service leaves");

    // Each agent's leaf came from the CA and names its pod's identity.
    for (node, id) in [(&f.n1, spiffe("default", "sleep")), (&f.n2, spiffe("default", "httpbin"))] {
        let dump = config_dump(node)?;
        ensure!(dump["ca"]["mode"] == "remote", "{}: {}", node.name(), dump["ca"]);
        let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
        ensure!(certs.contains(&json!(id)), "{}: certificates {:?}", node.name(), certs);
        ensure!(dump["ca"]["requests"]["ok"].as_u64() >= Some(1), "{}", dump["ca"]);
    }
    let log = plain(&ca.stderr_text());
    for (id, caller) in [
        (spiffe("default", "sleep"), "caller=sluice-system/sluice (pod sluice-node1 on node1)"),
        (spiffe("default", "httpbin"), "caller=sluice-system/sluice (pod sluice-node2)"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("issued certificate") && l.contains(&format!("identity={id}")))
            .with_context(|| format!("no issuance of {id} in the CA log:\n{log}"))?;
        ensure!(line.contains(caller) && line.contains("serial=") && line.contains("not_after="), "{line}");
        // The agent asked for its pod's identity as an impersonation: the CA
        // refuses it otherwise, and says so in the log.
        ensure!(
            line.contains("impersonated=true") && line.contains("grounds=node agent on"),
            "the agent's CSR for {id} was not an impersonation: {line}"
        );
        evidence(&format!("CA log: {}", line.trim()));
    }
    let reviews = f.api.fake.token_reviews();
    ensure!(reviews.iter().any(|r| r.token == "token-node1") && reviews.iter().all(|r| r.audiences == ["istio-ca"]));
    let lookups =
        f.api.fake.requests().iter().filter(|r| r.path_and_query.contains("fieldSelector=spec.nodeName")).count();
    ensure!(lookups >= 2, "the CA did not list pods by node: {:?}", f.api.fake.requests());

    // No CA key with the agents: not open, not mounted, not in memory.
    let ca_dir = f.mesh.ca_dir();
    let key = KeyMaterial::of(&ca_dir)?;
    for agent in [&ag1, &ag2] {
        let exposure = key_exposure(agent.pid(), &key, &ca_dir)?;
        ensure!(
            exposure.open_files.is_empty() && exposure.mounts.is_empty() && exposure.memory.is_empty(),
            "agent {} has CA key material: {exposure:#?}",
            agent.pid()
        );
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid()))?;
        let config = std::fs::read_to_string(f.configs.values().next().unwrap())?;
        ensure!(!config.contains("dir:") && !String::from_utf8_lossy(&cmdline).contains("ca-key"));
    }
    // Each check can fail: the same checks on an agent that has the key
    // (ca.dir on a mount of its own, the file open, signing with it) find
    // it in every place.
    drop(ag1);
    let control = start_key_holding_agent(&f, &f.n1)?;
    let caught = key_exposure(control.child.pid(), &key, &ca_dir)?;
    for (check, findings) in
        [("open files", &caught.open_files), ("mounts", &caught.mounts), ("memory", &caught.memory)]
    {
        ensure!(!findings.is_empty(), "the {check} check does not see the key in the control agent: {caught:#?}");
    }
    ensure!(
        caught.mounts.iter().any(|m| m.contains("tmpfs mount") && m.contains("ca-key.pem holds the PEM key file")),
        "the mount check did not find the key's copy in the control's ca.dir tmpfs by its bytes: {caught:#?}"
    );
    ensure!(
        caught.open_files.iter().any(|m| m.contains("same inode")),
        "the open-files check did not find the key file on the control's descriptor: {caught:#?}"
    );
    evidence(&format!(
        "no CA key with the CA-service agents (descriptors, cwd, mappings, own mounts, memory); the same checks on a \
         ca.dir control agent find it: open files {:?}; mounts {:?}; memory {:?}",
        caught.open_files, caught.mounts, caught.memory
    ));
    drop(control);
    ca.kill();
    drop(ag2);
    Ok(())
}

#[test]
fn ca_down_longer_than_a_rotation_interval() -> Result<()> {
    require_root!(Ok(()));
    // 20 s leaves: renewed at half-life, every 10 s.
    let f = Fixture::new("cadown", "20s")?;
    let rotation = Duration::from_secs(10);
    let mut ca = f.start_ca()?;
    let (ag1, ag2) = (f.start_agent(&f.n1)?, f.start_agent(&f.n2)?);
    traffic(&f, &f.b1, 1 << 20)?;
    let before = (cert_not_after(&f.n1, &f.a1)?, cert_not_after(&f.n2, &f.b1)?);
    let expiry = before.0.min(before.1);
    let failures_before = ca_failures(&f.n1)? + ca_failures(&f.n2)?;

    ca.kill();
    let down_at = Instant::now();
    evidence(&format!("CA killed; certificates expire at unix {} and {}", before.0, before.1));
    // Past the half-life (the renewal point) and down longer than one
    // rotation interval.
    let refresh = expiry.saturating_sub(rotation.as_secs());
    while down_at.elapsed() < rotation + Duration::from_millis(500) || now_secs() < refresh + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(now_secs() + 2 < expiry, "the test overslept: the certificates expire while the CA is down");
    // A destination not used before: a new TLS handshake on the old leaves.
    let mtls_before = mtls_connections(&f.n2)?;
    traffic(&f, &f.b2, 1 << 20)?;
    ensure!(mtls_connections(&f.n2)? > mtls_before, "the connection to b2 was not mTLS");
    let failures_down = ca_failures(&f.n1)? + ca_failures(&f.n2)?;
    ensure!(failures_down > failures_before, "the failure metric did not move: {failures_before} -> {failures_down}");
    let dump = config_dump(&f.n1)?;
    ensure!(
        dump["ca"]["consecutiveFailures"].as_u64() > Some(0) && dump["ca"]["lastError"].is_string(),
        "{}",
        dump["ca"]
    );
    ensure!(
        (cert_not_after(&f.n1, &f.a1)?, cert_not_after(&f.n2, &f.b1)?) == before,
        "a certificate changed with the CA down"
    );
    evidence(&format!(
        "CA down {:.1}s (> {rotation:?} rotation): a new HBONE connection a1 -> b2 still works on the old leaves; sluice_ca_requests_total{{result=\"error\"}} {failures_before} -> {failures_down}; config_dump lastError: {}",
        down_at.elapsed().as_secs_f64(),
        dump["ca"]["lastError"]
    ));

    let _ca = f.start_ca()?;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(8);
    let rotated = loop {
        let now = (cert_not_after(&f.n1, &f.a1)?, cert_not_after(&f.n2, &f.b1)?);
        if now.0 > before.0 && now.1 > before.1 {
            break now;
        }
        ensure!(
            Instant::now() < deadline,
            "certificates did not rotate within 8 s of the CA coming back: {before:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    evidence(&format!(
        "CA back: both leaves rotated within {:.1}s ({before:?} -> {rotated:?})",
        back.elapsed().as_secs_f64()
    ));
    // Past the old leaves' expiry, traffic runs on the new ones.
    while now_secs() <= expiry + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Again a new handshake, which the old leaves could not pass any more.
    let mtls_before = mtls_connections(&f.n2)?;
    traffic(&f, &f.b3, 1 << 20)?;
    ensure!(mtls_connections(&f.n2)? > mtls_before, "the connection to b3 was not mTLS");
    let dump = config_dump(&f.n2)?;
    ensure!(dump["ca"]["consecutiveFailures"] == 0, "{}", dump["ca"]);
    drop((ag1, ag2));
    Ok(())
}

#[test]
fn agents_started_before_the_ca_catch_up() -> Result<()> {
    require_root!(Ok(()));
    let f = Fixture::new("calate", "1h")?;
    // No CA yet: the agents still come up (nothing to serve without a leaf,
    // but no pod may hold the rest hostage), and keep asking.
    let started = Instant::now();
    let (ag1, ag2) = (f.start_agent(&f.n1)?, f.start_agent(&f.n2)?);
    let ready_in = started.elapsed();
    ensure!(ready_in < Duration::from_secs(10), "agents took {ready_in:?} to become ready with the CA down");
    std::thread::sleep(Duration::from_secs(3));
    ensure!(ca_failures(&f.n1)? > 0, "node1's agent did not count the unreachable CA");
    let _ca = f.start_ca()?;
    let back = Instant::now();
    let deadline = back + Duration::from_secs(20);
    // Enrolled (capture in place, leaf issued) on both nodes, then traffic.
    while !(enrolled(&f.n1, &f.a1)? && enrolled(&f.n2, &f.b1)?) {
        ensure!(
            Instant::now() < deadline,
            "pods not enrolled 20 s after the CA came up:\n{}",
            http_get(&f.n1, 15000, "/config_dump")?
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let enrolled_in = back.elapsed();
    traffic(&f, &f.b1, 1 << 20)?;
    ensure!(mtls_connections(&f.n2)? >= 1, "the traffic did not arrive over mTLS");
    evidence(&format!(
        "agents ready in {:.2}s with the CA down; pods enrolled with leaves {:.1}s after the CA came up, then mTLS traffic",
        ready_in.as_secs_f64(),
        enrolled_in.as_secs_f64()
    ));
    drop((ag1, ag2));
    Ok(())
}

#[test]
fn manifests_keep_the_key_off_the_nodes() -> Result<()> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let daemonset = std::fs::read_to_string(deploy.join("daemonset.yaml"))?;
    let ds: Value = serde_yaml::from_str(&daemonset)?;
    let spec = &ds["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_array().context("volumes")?;
    for v in volumes {
        ensure!(v.get("secret").is_none(), "the DaemonSet mounts a secret: {v}");
    }
    let token = volumes
        .iter()
        .flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten())
        .find_map(|s| s.get("serviceAccountToken"))
        .context("no projected service account token in the DaemonSet")?;
    ensure!(token["audience"] == "istio-ca", "token audience: {token}");
    ensure!(
        !daemonset.contains("ca-key") && !daemonset.contains("/var/lib/sluice/ca"),
        "the DaemonSet still names the CA key"
    );
    // The agents' config asks the CA service, and what it names is mounted.
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(deploy.join("configmap.yaml"))?)?;
    let text = cm["data"]["config.yaml"].as_str().context("configmap.yaml: data.config.yaml")?;
    let config = sluice::state::Config::from_str_named(text, "deploy/configmap.yaml")?;
    let Some(sluice::state::CaSource::Remote { root_cert, token_file, .. }) = config.ca.source() else {
        bail!("deploy/configmap.yaml: the agents' ca section is not a CA service: {:?}", config.ca);
    };
    let agent = spec["containers"].as_array().into_iter().flatten().find(|c| c["name"] == "sluice").context("agent")?;
    for (file, kind) in [(&root_cert, "configMap"), (&token_file, "projected")] {
        let mount = agent["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["mountPath"].as_str().is_some_and(|p| file.starts_with(p)))
            .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
            .with_context(|| format!("{} is not mounted in the agent", file.display()))?;
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).context("mounted volume")?;
        ensure!(volume.get(kind).is_some(), "{} comes from {volume}, not a {kind} volume", file.display());
    }
    let mut ca_objects = String::new();
    for file in ["ca-deployment.yaml", "ca-rbac.yaml"] {
        ca_objects.push_str(&std::fs::read_to_string(deploy.join(file)).with_context(|| format!("deploy/{file}"))?);
    }
    for needle in ["kind: Deployment", "kind: Service", "tokenreviews", "secretName: cacerts", "--listen=0.0.0.0:15012"]
    {
        ensure!(ca_objects.contains(needle), "deploy/ca-*.yaml lacks {needle:?}");
    }
    Ok(())
}
