//! Hostile input on 15008 (issue 9, the suite). A pod outside the mesh, on
//! another node, throws at an enrolled pod's HBONE port what an attacker
//! would: wrong protocols, wrong requests, wrong certificates, too much, and
//! too little too slowly. Each case must get its own refusal (the TLS alert,
//! the HTTP status, the RST_STREAM, or the connection closed within the
//! server's stated deadline), the app behind the port must see no connection
//! from it, and after all of them the agent must still serve a good CONNECT,
//! with its descriptors back where they started. Both capture modes.
//!
//! ```text
//!   node1: x, not enrolled: the attacker             no agent
//!   node2: b1 (sa httpbin): app on 8080, holder on 9000, each printing its peers
//!          b2 (sa httpbin)                           the agent (iptables | ebpf)
//! ```
//!
//! The slow cases (no ClientHello, half a ClientHello, no HTTP/2 preface,
//! two slowloris peers) wait for the server's own deadlines, so they run in
//! the background while the quick ones go through.

use std::{
    fmt,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskCx, Poll},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use rcgen::{
    date_time_ymd, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    AlertDescription, ClientConfig, DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion,
};
use sluice::{
    identity::{Ca, SpiffeId},
    netns::Netns,
    proxy::inbound::TLS_ACCEPT_TIMEOUT,
    tunnel::settings::{HANDSHAKE_TIMEOUT, MAX_HEADER_LIST_SIZE, MAX_STREAMS_PER_CONN, PING_INTERVAL, PING_TIMEOUT},
};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    require_root,
    traffic::echo_server,
    ChildGuard, Node, Topology,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    runtime::Runtime,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

type Tls = TlsStream<TcpStream>;

/// A quick answer: a status, an alert, a reset. Nothing the server does
/// for a refusal takes longer than this.
const QUICK: Duration = Duration::from_secs(5);
/// How much later than its deadline the server may close a slow peer.
const SLACK: Duration = Duration::from_secs(4);
/// Every case, however it goes, ends within this.
const CASE_BOUND: Duration = Duration::from_secs(45);
/// Excess streams tried beyond the server's limit.
const EXCESS_STREAMS: usize = 20;

#[test]
fn hostile_input_on_15008_iptables() -> Result<()> {
    require_root!(Ok(()));
    run("iptables")
}

#[test]
fn hostile_input_on_15008_ebpf() -> Result<()> {
    require_root!(Ok(()));
    run("ebpf")
}

fn run(mode: &'static str) -> Result<()> {
    let topo = Topology::new(&format!("hostile-{}", &mode[..1]))?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let (x, b1, b2) = (n1.add_pod("x")?, n2.add_pod("b1")?, n2.add_pod("b2")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&b1, "default", "httpbin", true);
    mesh.add(&b2, "default", "httpbin", true);
    mesh.write_config()?;
    let agent = mesh.start_agent(&n2, mode)?;
    let (mut app, _) = echo_server(&b1, &format!("{}:8080", b1.ipv4()), &["--print-peer"])?;
    let (mut holder, _) = echo_server(&b1, &format!("{}:9000", b1.ipv4()), &["--print-peer"])?;

    let ca = Ca::load(&mesh.ca_dir())?;
    let me = SpiffeId::new("cluster.local", "default", "client")?;
    let good = ca.issue(&me, Duration::from_secs(3600))?;
    let env = Arc::new(Env {
        netns: Netns::open(&x.netns_path())?,
        hbone: SocketAddr::new(b1.ipv4().into(), 15008),
        b1: b1.ipv4(),
        b2: b2.ipv4(),
        x: x.ipv4(),
        provider: Arc::new(rustls::crypto::ring::default_provider()),
        good: ClientCert { chain: good.chain.clone(), key: good.key.clone_key() },
    });
    let signer = MeshSigner::load(&mesh.ca_dir())?;
    let rogue_dir = mesh.dir.path().join("rogue-ca");
    Ca::init(&rogue_dir)?;
    let rogue = Ca::load(&rogue_dir)?.issue(&me, Duration::from_secs(3600))?;
    let other_td = ca.issue(&SpiffeId::new("other.local", "default", "client")?, Duration::from_secs(3600))?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let fds_before = fd_count(agent.pid())?;
    let self_calls_before = self_calls(&n2)?;
    let mut tally = Tally { mode, rt: &rt, app: &mut app, results: Vec::new() };

    // The slow ones first, in the background: they wait for deadlines.
    let slow: Vec<(&str, String, tokio::task::JoinHandle<Result<String>>)> = vec![
        (
            "no ClientHello: TCP open, nothing sent",
            format!("closed by the server within the TLS deadline {TLS_ACCEPT_TIMEOUT:?} (+{SLACK:?}), 0 bytes sent to us"),
            rt.spawn(silent_tcp(env.clone(), &[])),
        ),
        (
            "half a ClientHello, never finished",
            format!("closed by the server within the TLS deadline {TLS_ACCEPT_TIMEOUT:?} (+{SLACK:?}), 0 bytes sent to us"),
            // A handshake record header announcing 512 bytes, then 11 of them.
            rt.spawn(silent_tcp(env.clone(), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdef")),
        ),
        (
            "TLS done, HTTP/2 preface never sent",
            format!("the server's SETTINGS, then closed within the HTTP/2 handshake deadline {HANDSHAKE_TIMEOUT:?} (+{SLACK:?})"),
            rt.spawn(no_preface(env.clone())),
        ),
        (
            "slowloris: a CONNECT's HEADERS without END_HEADERS, never continued",
            format!(
                "PINGed after {PING_INTERVAL:?}, closed within {:?} (+{SLACK:?}) since the PING cannot be answered",
                PING_INTERVAL + PING_TIMEOUT
            ),
            rt.spawn(slowloris(env.clone(), true)),
        ),
        (
            "slowloris: HTTP/2 preface and SETTINGS, then no request and no PING answer",
            format!("PINGed after {PING_INTERVAL:?}, closed within {:?} (+{SLACK:?})", PING_INTERVAL + PING_TIMEOUT),
            rt.spawn(slowloris(env.clone(), false)),
        ),
    ];

    // Not TLS, or TLS the server does not speak.
    let e = &*env;
    tally.case("plain HTTP/1.1 on 15008", "a fatal TLS alert decode_error, then closed; no HTTP reply", plain_http(e));
    tally.case(
        "garbage (a PROXY protocol line) before the ClientHello",
        "TLS alert decode_error to our ClientHello",
        garbage_then_hello(e),
    );
    tally.case(
        "TLS 1.2 only",
        "TLS alert protocol_version",
        expect_alert(
            e,
            e.config(Some(&e.good), &[&rustls::version::TLS12], &[b"h2"]),
            AlertDescription::ProtocolVersion,
        ),
    );
    tally.case(
        "ALPN http/1.1 only (no h2)",
        "TLS alert no_application_protocol",
        expect_alert(
            e,
            e.config(Some(&e.good), &[&rustls::version::TLS13], &[b"http/1.1"]),
            AlertDescription::NoApplicationProtocol,
        ),
    );
    tally.case(
        "HTTP/1.1 request inside TLS with ALPN h2",
        "the server's HTTP/2 SETTINGS, then closed; no HTTP/1.1 reply",
        http1_inside_tls(e),
    );

    // Client certificates.
    tally.case(
        "no client certificate",
        "TLS alert certificate_required",
        expect_alert(e, e.config(None, &[&rustls::version::TLS13], &[b"h2"]), AlertDescription::CertificateRequired),
    );
    tally.case(
        "self-signed certificate with the right SPIFFE ID",
        "TLS alert unknown_ca",
        expect_alert(e, e.mtls(&self_signed(&me.to_string())?), AlertDescription::UnknownCA),
    );
    tally.case(
        "certificate from a rogue CA whose root bears the mesh root's name, right SPIFFE ID",
        "TLS alert decrypt_error (the issuer name matches the mesh root, its signature does not)",
        expect_alert(e, e.mtls(&ClientCert::of(&rogue)), AlertDescription::DecryptError),
    );
    tally.case(
        "expired certificate from the mesh CA",
        "TLS alert certificate_expired",
        expect_alert(
            e,
            e.mtls(&signer.leaf(&[uri(&me.to_string())?], |p| {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2021, 1, 1);
            })?),
            AlertDescription::CertificateExpired,
        ),
    );
    tally.case(
        "not-yet-valid certificate from the mesh CA",
        "TLS alert certificate_expired",
        expect_alert(
            e,
            e.mtls(&signer.leaf(&[uri(&me.to_string())?], |p| {
                p.not_before = date_time_ymd(2090, 1, 1);
                p.not_after = date_time_ymd(2091, 1, 1);
            })?),
            AlertDescription::CertificateExpired,
        ),
    );
    tally.case(
        "mesh CA certificate for another trust domain (other.local)",
        "TLS alert certificate_unknown",
        expect_alert(e, e.mtls(&ClientCert::of(&other_td)), AlertDescription::CertificateUnknown),
    );
    tally.case(
        "mesh CA certificate whose only SAN is a DNS name",
        "TLS alert certificate_unknown",
        expect_alert(
            e,
            e.mtls(&signer.leaf(&[SanType::DnsName("httpbin.default.svc.cluster.local".try_into()?)], |_| {})?),
            AlertDescription::CertificateUnknown,
        ),
    );
    tally.case(
        "mesh CA certificate whose URI SAN is not spiffe://",
        "TLS alert certificate_unknown",
        expect_alert(
            e,
            e.mtls(&signer.leaf(&[uri("https://cluster.local/ns/default/sa/client")?], |_| {})?),
            AlertDescription::CertificateUnknown,
        ),
    );
    tally.case(
        "mesh CA certificate with two SPIFFE URI SANs",
        "TLS alert certificate_unknown",
        expect_alert(
            e,
            e.mtls(
                &signer
                    .leaf(&[uri(&me.to_string())?, uri("spiffe://cluster.local/ns/istio-system/sa/istiod")?], |_| {})?,
            ),
            AlertDescription::CertificateUnknown,
        ),
    );
    tally.case(
        "mesh CA certificate for server use only (EKU serverAuth)",
        "TLS alert unsupported_certificate",
        expect_alert(
            e,
            e.mtls(&signer.leaf(&[uri(&me.to_string())?], |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            })?),
            AlertDescription::UnsupportedCertificate,
        ),
    );

    // Requests: a valid mesh certificate, then the wrong thing.
    let app_at = format!("{}:8080", e.b1);
    tally.case("HTTP/2 GET", "HTTP 400", expect_status(e, request(Method::GET, &format!("http://{app_at}/")), 400));
    tally.case("HTTP/2 POST", "HTTP 400", expect_status(e, request(Method::POST, &format!("http://{app_at}/")), 400));
    tally.case("CONNECT with no :authority", "HTTP 400", expect_raw(e, &[], RawAnswer::Status(400)));
    tally.case(
        "CONNECT to a host name (httpbin.default:8080)",
        "HTTP 400",
        expect_raw(e, &[(1, b"httpbin.default:8080")], RawAnswer::Status(400)),
    );
    let no_port = e.b1.to_string();
    tally.case(
        "CONNECT :authority without a port",
        "HTTP 400",
        expect_raw(e, &[(1, no_port.as_bytes())], RawAnswer::Status(400)),
    );
    let big_port = format!("{}:99999", e.b1);
    tally.case(
        "CONNECT :authority with port 99999",
        "HTTP 400",
        expect_raw(e, &[(1, big_port.as_bytes())], RawAnswer::Status(400)),
    );
    let userinfo = format!("admin@{app_at}");
    tally.case(
        "CONNECT :authority with userinfo",
        "HTTP 400",
        expect_raw(e, &[(1, userinfo.as_bytes())], RawAnswer::Status(400)),
    );
    let control = format!("{}\x00:8080", e.b1);
    tally.case(
        "CONNECT :authority with a NUL byte",
        "RST_STREAM PROTOCOL_ERROR (h2 refuses the header block)",
        expect_raw(e, &[(1, control.as_bytes())], RawAnswer::Reset(h2::Reason::PROTOCOL_ERROR)),
    );
    tally.case(
        "CONNECT for another pod's IP (b2, same node, enrolled)",
        "HTTP 400",
        expect_status(e, connect(&format!("{}:8080", e.b2)), 400),
    );
    tally.case(
        "CONNECT for an address outside the pod (the attacker's own)",
        "HTTP 400",
        expect_status(e, connect(&format!("{}:8080", e.x)), 400),
    );
    for port in [15001u16, 15006, 15008] {
        tally.case(
            &format!("CONNECT to the agent's own port {port}"),
            "HTTP 400 (counted as self_call)",
            expect_status(e, connect(&format!("{}:{port}", e.b1)), 400),
        );
    }
    tally.case(
        "one header of 100 KiB",
        &format!("HTTP 431 (header list limit {MAX_HEADER_LIST_SIZE} bytes)"),
        expect_status(e, padded(connect(&app_at), 1, 100 * 1024), 431),
    );
    tally.case(
        "3,000 headers (about 170 KiB decoded)",
        &format!("HTTP 431 (header list limit {MAX_HEADER_LIST_SIZE} bytes)"),
        expect_status(e, padded(connect(&app_at), 3000, 16), 431),
    );
    let holders = {
        let mut holders = Vec::new();
        tally.case(
            "more concurrent streams than allowed",
            &format!(
                "{MAX_STREAMS_PER_CONN} streams open, the next {EXCESS_STREAMS} each RST_STREAM REFUSED_STREAM, none reaching the app"
            ),
            too_many_streams(e, &mut holders),
        );
        holders
    };
    let holder_peers = drain_peers(&mut holder, Duration::from_millis(500))?;
    tally.check(
        "more concurrent streams than allowed",
        holder_peers.len() == holders.len(),
        &format!(
            "the holder app on 9000 saw {} connections for the {} streams held open",
            holder_peers.len(),
            holders.len()
        ),
    );
    drop(holders);

    // The slow ones, each with its own bound.
    for (name, expect, handle) in slow {
        let r = rt.block_on(async {
            tokio::time::timeout(CASE_BOUND, handle)
                .await
                .with_context(|| format!("the case did not end within {CASE_BOUND:?}"))?
                .context("the case's task panicked")?
        });
        tally.record(name, &expect, r);
    }
    let late = drain_peers(tally.app, Duration::from_millis(500))?;
    tally.check(
        "no app connection from any case (incl. the background ones)",
        late.is_empty(),
        &format!("app on 8080 saw {late:?}"),
    );
    let results = std::mem::take(&mut tally.results);
    drop(tally);

    // Still healthy: a good CONNECT, counters, descriptors, readiness.
    let echoed = rt.block_on(good_connect(&env))?;
    ensure!(echoed == b"still serving", "the agent must still echo through a good CONNECT, got {echoed:?}");
    let peers = drain_peers(&mut app, Duration::from_millis(500))?;
    ensure!(peers.len() == 1, "the good CONNECT must be the app's only connection, saw {peers:?}");
    let self_call_delta = self_calls(&n2)? - self_calls_before;
    ensure!(self_call_delta == 3, "each own-port CONNECT counted once as self_call, counted {self_call_delta}");
    let fds_after = settle_fds(agent.pid(), fds_before)?;
    let ready = http_get(&n2, 15021, "/healthz/ready")?;
    let state = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid()))?;
    let state = state.rsplit(')').next().and_then(|s| s.split_whitespace().next()).unwrap_or("?").to_owned();
    ensure!(state != "Z" && state != "X", "the agent process is {state}, not alive");
    evidence(&format!(
        "hostile 15008 [{mode}] after all cases: good CONNECT 200 + echo, app saw 1 connection, self_call +{self_call_delta}, \
         agent descriptors {fds_before} -> {fds_after}, process state {state}, ready: {}",
        ready.trim()
    ));

    let held = results.iter().filter(|(_, r)| r.is_ok()).count();
    evidence(&format!("hostile 15008 [{mode}]: {} cases, {held} held", results.len()));
    let failed: Vec<String> =
        results.iter().filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e:#}"))).collect();
    ensure!(
        failed.is_empty(),
        "{mode}: {} of {} cases not held:\n  {}",
        failed.len(),
        results.len(),
        failed.join("\n  ")
    );
    drop(agent);
    Ok(())
}

/// Runs cases one at a time, checks the app after each, keeps the verdicts.
struct Tally<'a> {
    mode: &'static str,
    rt: &'a Runtime,
    app: &'a mut ChildGuard,
    results: Vec<(String, Result<String>)>,
}

impl Tally<'_> {
    /// Runs `fut` (bounded), then checks the app saw no connection.
    fn case(&mut self, name: &str, expect: &str, fut: impl Future<Output = Result<String>>) -> bool {
        let r = self.rt.block_on(async {
            tokio::time::timeout(CASE_BOUND, fut).await.with_context(|| format!("no outcome within {CASE_BOUND:?}"))?
        });
        // Drained whatever the outcome, so nothing is blamed on the next case.
        let r = match (r, drain_peers(self.app, Duration::from_millis(200))) {
            (r, Ok(peers)) if peers.is_empty() => r,
            (Ok(seen), Ok(peers)) => {
                Err(anyhow::anyhow!("{seen}, but the app on 8080 accepted {} connection(s): {peers:?}", peers.len()))
            }
            (Err(e), Ok(peers)) => Err(e.context(format!("and the app on 8080 accepted {peers:?}"))),
            (_, Err(e)) => Err(e),
        };
        self.record(name, expect, r)
    }

    fn record(&mut self, name: &str, expect: &str, r: Result<String>) -> bool {
        let ok = r.is_ok();
        let verdict = match &r {
            Ok(seen) => format!("got {seen}; app 0 connections: held"),
            Err(e) => format!("NOT HELD: {e:#}"),
        };
        evidence(&format!("hostile 15008 [{}] {name}: expected {expect}; {verdict}", self.mode));
        self.results.push((name.to_owned(), r));
        ok
    }

    /// A further condition on a case already recorded.
    fn check(&mut self, name: &str, ok: bool, what: &str) {
        if ok {
            evidence(&format!("hostile 15008 [{}] {name}: {what}", self.mode));
            return;
        }
        match self.results.iter_mut().find(|(n, _)| n == name) {
            Some((_, r)) if r.is_ok() => *r = Err(anyhow::anyhow!("{what}")),
            Some(_) => {}
            None => self.results.push((name.to_owned(), Err(anyhow::anyhow!("{what}")))),
        }
        evidence(&format!("hostile 15008 [{}] {name}: NOT HELD: {what}", self.mode));
    }
}

/// The attacker's side: its netns, the target, its one good certificate.
struct Env {
    netns: Netns,
    hbone: SocketAddr,
    b1: Ipv4Addr,
    b2: Ipv4Addr,
    x: Ipv4Addr,
    provider: Arc<CryptoProvider>,
    good: ClientCert,
}

struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientCert {
    fn of(cert: &sluice::identity::WorkloadCert) -> ClientCert {
        ClientCert { chain: cert.chain.clone(), key: cert.key.clone_key() }
    }
}

impl Env {
    fn config(
        &self,
        cert: Option<&ClientCert>,
        versions: &[&'static SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(self.provider.clone())));
        let mut config = match cert {
            Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// What an HBONE client offers: TLS 1.3, h2, the given certificate.
    fn mtls(&self, cert: &ClientCert) -> Result<Arc<ClientConfig>> {
        self.config(Some(cert), &[&rustls::version::TLS13], &[b"h2"])
    }

    /// TCP to b1:15008 from the attacker pod (no mark: it is not an agent).
    async fn tcp(&self) -> Result<TcpStream> {
        let socket = self.netns.socket_marked(self.hbone, None, false, 0)?;
        tokio::time::timeout(QUICK, socket.connect(self.hbone))
            .await
            .with_context(|| format!("TCP connect to {}: no answer within {QUICK:?}", self.hbone))?
            .with_context(|| format!("TCP connect to {}", self.hbone))
    }

    /// The handshake's own result, so a refusal's alert can be read from it.
    async fn tls_over(&self, tcp: TcpStream, config: Arc<ClientConfig>) -> Result<io::Result<Tls>> {
        let connect = TlsConnector::from(config).connect(ServerName::IpAddress(self.hbone.ip().into()), tcp);
        tokio::time::timeout(QUICK, connect).await.with_context(|| format!("TLS handshake: no end within {QUICK:?}"))
    }

    async fn tls(&self, config: Result<Arc<ClientConfig>>) -> Result<io::Result<Tls>> {
        let config = config?;
        let tcp = self.tcp().await?;
        self.tls_over(tcp, config).await
    }

    /// mTLS with the mesh certificate, which the server accepts.
    async fn good_tls(&self) -> Result<Tls> {
        self.tls(self.mtls(&self.good)).await?.context("TLS with a valid mesh certificate")
    }
}

/// Accepts any server: these tests check the server's decisions.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Signs hostile leaves with the mesh's own CA key, so that the one thing
/// wrong with each is the thing under test.
struct MeshSigner {
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl MeshSigner {
    fn load(ca_dir: &Path) -> Result<MeshSigner> {
        let key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem"))?)?;
        // Same subject and key as the real root, so webpki chains to it.
        let issuer = CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(ca_dir.join("root-cert.pem"))?)?
            .self_signed(&key)?;
        Ok(MeshSigner { issuer, key })
    }

    /// A leaf shaped like the CA's own (empty subject, digitalSignature,
    /// serverAuth + clientAuth), with `sans`, then edited by `edit`.
    fn leaf(&self, sans: &[SanType], edit: impl FnOnce(&mut CertificateParams)) -> Result<ClientCert> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(sans);
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(ClientCert {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

fn leaf_params(sans: &[SanType]) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = sans.to_vec();
    params
}

fn uri(s: &str) -> Result<SanType> {
    Ok(SanType::URI(s.try_into()?))
}

/// A certificate that signs itself, naming a valid mesh identity.
fn self_signed(spiffe: &str) -> Result<ClientCert> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(&[uri(spiffe)?]).self_signed(&key)?;
    Ok(ClientCert {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

// ---------------------------------------------------------------- TLS cases

fn alert_in(e: &io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Handshake, then read. With TLS 1.3 the server judges the client's
/// certificate after the client's Finished, so that refusal is the alert on
/// the first read; a refusal of the version or ALPN ends the handshake
/// itself. A client the server accepts gets HTTP/2 SETTINGS instead.
async fn expect_alert(env: &Env, config: Result<Arc<ClientConfig>>, want: AlertDescription) -> Result<String> {
    let outcome = match env.tls(config).await? {
        Err(e) => Err(e),
        Ok(mut tls) => {
            let mut buf = [0u8; 256];
            tokio::time::timeout(QUICK, tls.read(&mut buf))
                .await
                .with_context(|| format!("expected alert {want:?}: nothing at all from the server within {QUICK:?}"))?
        }
    };
    match outcome {
        Err(e) if alert_in(&e) == Some(want) => Ok(format!("TLS alert {want:?}")),
        Err(e) => bail!("expected TLS alert {want:?}, got: {e}"),
        Ok(0) => bail!("expected TLS alert {want:?}, the server closed without one"),
        Ok(n) => bail!("expected TLS alert {want:?}, but the server accepted the client and sent {n} bytes of HTTP/2"),
    }
}

/// Everything `r` yields until the peer closes (EOF or reset), which must
/// happen within `bound`; returns the bytes and when it closed.
async fn read_to_close<R: AsyncRead + Unpin>(r: &mut R, bound: Duration, what: &str) -> Result<(Vec<u8>, Duration)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let left = bound.checked_sub(start.elapsed()).unwrap_or_default();
        match tokio::time::timeout(left, r.read(&mut buf)).await {
            Err(_) => bail!("expected {what}: still open after {bound:?} ({} bytes received)", got.len()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((got, start.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn tls_alert_record(b: &[u8]) -> Option<AlertDescription> {
    (b.len() >= 7 && b[0] == 21 && b[5] == 2).then(|| AlertDescription::from(b[6]))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn plain_http(env: &Env) -> Result<String> {
    let mut tcp = env.tcp().await?;
    tcp.write_all(format!("GET / HTTP/1.1\r\nHost: {}:8080\r\n\r\n", env.b1).as_bytes()).await?;
    let (got, took) = read_to_close(&mut tcp, QUICK, "a TLS alert and close").await?;
    ensure!(!contains(&got, b"HTTP/"), "an HTTP reply to plain HTTP: {:?}", String::from_utf8_lossy(&got));
    match tls_alert_record(&got) {
        Some(AlertDescription::DecodeError) => Ok(format!("fatal alert decode_error, closed after {took:?}")),
        other => bail!("expected a fatal TLS alert decode_error, got {other:?} in {got:02x?}"),
    }
}

async fn garbage_then_hello(env: &Env) -> Result<String> {
    let mut tcp = env.tcp().await?;
    tcp.write_all(format!("PROXY TCP4 {} {} 40000 15008\r\n", env.x, env.b1).as_bytes()).await?;
    match env.tls_over(tcp, env.mtls(&env.good)?).await? {
        Err(e) if alert_in(&e) == Some(AlertDescription::DecodeError) => Ok("TLS alert decode_error".into()),
        Err(e) => bail!("expected TLS alert decode_error, got: {e}"),
        Ok(_) => bail!("expected TLS alert decode_error, the handshake succeeded"),
    }
}

async fn http1_inside_tls(env: &Env) -> Result<String> {
    let mut tls = env.good_tls().await?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {}:8080\r\n\r\n", env.b1).as_bytes()).await?;
    let (got, took) = read_to_close(&mut tls, QUICK, "close after a wrong preface").await?;
    ensure!(!contains(&got, b"HTTP/1"), "an HTTP/1 reply: {:?}", String::from_utf8_lossy(&got));
    let kinds = frame_kinds(&got);
    ensure!(kinds.first() == Some(&4), "expected the server's SETTINGS frame first, got frames {kinds:?}");
    ensure!(!kinds.contains(&1), "expected no HEADERS (no request was read), got frames {kinds:?}");
    Ok(format!("frames {kinds:?} (4 = SETTINGS), then closed after {took:?}"))
}

/// Frame types in a run of HTTP/2 frames (incomplete tail ignored).
fn frame_kinds(mut b: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    while b.len() >= 9 {
        let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
        kinds.push(b[3]);
        b = &b[(9 + len).min(b.len())..];
    }
    kinds
}

/// TCP open, `first` written, then silence: the server must close it.
async fn silent_tcp(env: Arc<Env>, first: &'static [u8]) -> Result<String> {
    let mut tcp = env.tcp().await?;
    tcp.write_all(first).await?;
    let bound = TLS_ACCEPT_TIMEOUT + SLACK;
    let (got, took) = read_to_close(&mut tcp, bound, "the server to give up on the handshake").await?;
    ensure!(got.is_empty(), "expected 0 bytes before the close, got {got:02x?}");
    ensure!(
        took + Duration::from_secs(1) >= TLS_ACCEPT_TIMEOUT,
        "closed after {took:?}, before the TLS deadline: not the deadline that closed it"
    );
    Ok(format!("closed after {took:?}, 0 bytes"))
}

async fn no_preface(env: Arc<Env>) -> Result<String> {
    let mut tls = env.good_tls().await?;
    let bound = HANDSHAKE_TIMEOUT + SLACK;
    let (got, took) = read_to_close(&mut tls, bound, "close when the HTTP/2 preface does not come").await?;
    let kinds = frame_kinds(&got);
    ensure!(kinds == [4], "expected only the server's SETTINGS, got frames {kinds:?}");
    Ok(format!("SETTINGS, then closed after {took:?}"))
}

// ------------------------------------------------------------ HTTP/2 cases

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix, `flags` in the bits above it.
fn hpack_int(out: &mut Vec<u8>, n: u8, flags: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block: `:method CONNECT`, then literal fields "without
/// indexing" whose names are static-table indices (1 = `:authority`), no
/// Huffman: exactly the bytes given, however malformed.
fn connect_block(fields: &[(usize, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (index, value) in [(2usize, &b"CONNECT"[..])].iter().chain(fields) {
        hpack_int(&mut b, 4, 0x00, *index);
        hpack_int(&mut b, 7, 0x00, value.len());
        b.extend_from_slice(value);
    }
    b
}

#[derive(Debug, PartialEq)]
enum RawAnswer {
    /// A HEADERS answer; the status when it is in HPACK's static table.
    Status(u16),
    Reset(h2::Reason),
    GoAway(h2::Reason),
    Other(String),
}

impl fmt::Display for RawAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawAnswer::Status(0) => write!(f, "HEADERS with a status outside HPACK's static table"),
            RawAnswer::Status(s) => write!(f, "HTTP {s}"),
            RawAnswer::Reset(r) => write!(f, "RST_STREAM {r:?}"),
            RawAnswer::GoAway(r) => write!(f, "GOAWAY {r:?}"),
            RawAnswer::Other(what) => write!(f, "{what}"),
        }
    }
}

/// One CONNECT written byte by byte (so it can be what no client library
/// would send), and the server's first answer on stream 1.
async fn expect_raw(env: &Env, fields: &[(usize, &[u8])], want: RawAnswer) -> Result<String> {
    let mut tls = env.good_tls().await?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(1, 0x4, 1, &connect_block(fields)));
    tls.write_all(&out).await?;
    let start = Instant::now();
    let got = loop {
        let left = QUICK.checked_sub(start.elapsed()).unwrap_or_default();
        let Some((kind, flags, stream, payload)) = tokio::time::timeout(left, read_frame(&mut tls))
            .await
            .with_context(|| format!("expected {want:?}: no answer within {QUICK:?}"))??
        else {
            break RawAnswer::Other("closed without an answer".into());
        };
        match (kind, stream) {
            (4, 0) if flags & 1 == 0 => tls.write_all(&frame(4, 1, 0, &[])).await?,
            (1, 1) => break RawAnswer::Status(static_status(&payload)),
            (3, 1) if payload.len() == 4 => {
                break RawAnswer::Reset(u32::from_be_bytes(payload[..4].try_into()?).into());
            }
            (7, 0) if payload.len() >= 8 => {
                break RawAnswer::GoAway(u32::from_be_bytes(payload[4..8].try_into()?).into());
            }
            _ => {}
        }
    };
    ensure!(got == want, "expected {want}, got {got}");
    Ok(got.to_string())
}

/// `:status` from a response's first header field, when it is one of
/// HPACK's static-table statuses (h2 encodes those as one indexed byte).
fn static_status(block: &[u8]) -> u16 {
    match block.first().map(|b| b & 0x7f) {
        Some(8) => 200,
        Some(9) => 204,
        Some(10) => 206,
        Some(11) => 304,
        Some(12) => 400,
        Some(13) => 404,
        Some(14) => 500,
        _ => 0,
    }
}

type Frame = (u8, u8, u32, Vec<u8>);

/// The next HTTP/2 frame, or `None` once the server closed.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes(head[5..9].try_into()?) & 0x7fff_ffff;
    Ok(Some((head[3], head[4], stream, payload)))
}

/// A peer that sends the preface and SETTINGS, and then either half a
/// CONNECT's header block (HEADERS without END_HEADERS, never continued)
/// or nothing; it answers nothing, PINGs included.
async fn slowloris(env: Arc<Env>, partial_headers: bool) -> Result<String> {
    let mut tls = env.good_tls().await?;
    let start = Instant::now();
    let mut out = PREFACE.to_vec();
    out.extend(frame(4, 0, 0, &[]));
    if partial_headers {
        out.extend(frame(1, 0, 1, &connect_block(&[])));
    }
    tls.write_all(&out).await?;
    tls.flush().await?;
    let bound = PING_INTERVAL + PING_TIMEOUT + SLACK;
    let mut pinged = None;
    loop {
        let left = bound.checked_sub(start.elapsed()).unwrap_or_default();
        let next = tokio::time::timeout(left, read_frame(&mut tls)).await.with_context(|| {
            format!(
                "expected the server to close an unresponsive peer: still open after {bound:?} (PINGed: {pinged:?})"
            )
        })?;
        match next? {
            Some((6, flags, _, _)) if flags & 1 == 0 => {
                pinged.get_or_insert(start.elapsed());
            }
            Some((1, _, _, _)) => bail!("the server answered a request that was never complete"),
            Some(_) => {}
            None => {
                let pinged = pinged.context("closed, but without a PING first: not the keepalive that closed it")?;
                return Ok(format!("PINGed after {pinged:.1?}, closed after {:.1?}", start.elapsed()));
            }
        }
    }
}

#[derive(Debug)]
enum Answer {
    Status(StatusCode),
    Reset(h2::Reason),
    GoAway(h2::Reason),
    Error(String),
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(s) => write!(f, "HTTP {}", s.as_u16()),
            Answer::Reset(r) => write!(f, "RST_STREAM {r:?}"),
            Answer::GoAway(r) => write!(f, "GOAWAY {r:?}"),
            Answer::Error(e) => write!(f, "error {e}"),
        }
    }
}

fn classify(e: h2::Error) -> Answer {
    match e.reason() {
        Some(r) if e.is_go_away() => Answer::GoAway(r),
        Some(r) if e.is_reset() => Answer::Reset(r),
        _ => Answer::Error(e.to_string()),
    }
}

fn request(method: Method, uri: &str) -> Result<Request<()>> {
    Ok(Request::builder().method(method).uri(uri).body(())?)
}

fn connect(authority: &str) -> Result<Request<()>> {
    request(Method::CONNECT, authority)
}

/// `req` with `count` extra headers of `size` value bytes each.
fn padded(req: Result<Request<()>>, count: usize, size: usize) -> Result<Request<()>> {
    let mut req = req?;
    let value = HeaderValue::from_str(&"a".repeat(size))?;
    for i in 0..count {
        req.headers_mut().append(HeaderName::from_bytes(format!("x-pad-{i}").as_bytes())?, value.clone());
    }
    Ok(req)
}

/// One request on a fresh mTLS connection with the h2 client, and its answer.
async fn ask(env: &Env, req: Result<Request<()>>) -> Result<Answer> {
    let req = req?;
    let tls = env.good_tls().await?;
    tokio::time::timeout(QUICK, async {
        let (client, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut client = client.ready().await?;
        let (resp, _send) = client.send_request(req, false)?;
        Ok::<_, anyhow::Error>(match resp.await {
            Ok(r) => Answer::Status(r.status()),
            Err(e) => classify(e),
        })
    })
    .await
    .with_context(|| format!("no answer within {QUICK:?}"))?
}

async fn expect_status(env: &Env, req: Result<Request<()>>, want: u16) -> Result<String> {
    match ask(env, req).await? {
        Answer::Status(s) if s.as_u16() == want => Ok(format!("HTTP {want}")),
        other => bail!("expected HTTP {want}, got {other}"),
    }
}

type Held = (h2::SendStream<Bytes>, h2::RecvStream);

/// Fills one connection with the allowed number of CONNECT streams to the
/// holder on 9000 (kept open in `holders`), then opens more to the app on
/// 8080: each must be refused. The h2 client honours the server's
/// SETTINGS_MAX_CONCURRENT_STREAMS, so it is told a larger one (`Lying`),
/// as a hostile client would simply ignore it.
async fn too_many_streams(env: &Env, holders: &mut Vec<Held>) -> Result<String> {
    let tls = env.good_tls().await?;
    let (client, conn) = h2::client::handshake(Lying::new(tls)).await?;
    tokio::spawn(conn);
    let mut client = client.ready().await?;
    let mut pending = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CONN {
        client = client.ready().await?;
        pending.push(client.send_request(connect(&format!("{}:9000", env.b1))?, false)?);
    }
    for (resp, send) in pending {
        let resp = tokio::time::timeout(Duration::from_secs(15), resp)
            .await
            .context("the allowed streams were not all answered within 15 s")?
            .map_err(classify)
            .map_err(|a| anyhow::anyhow!("an allowed stream got {a}, expected HTTP 200"))?;
        ensure!(resp.status() == StatusCode::OK, "an allowed stream got {}, expected HTTP 200", resp.status());
        holders.push((send, resp.into_body()));
    }
    let mut answers = Vec::new();
    for _ in 0..EXCESS_STREAMS {
        client = client.ready().await?;
        let (resp, send) = client.send_request(connect(&format!("{}:8080", env.b1))?, false)?;
        let answer = match tokio::time::timeout(QUICK, resp).await {
            Err(_) => bail!("an excess stream got no answer within {QUICK:?}; expected RST_STREAM REFUSED_STREAM"),
            Ok(Ok(r)) => Answer::Status(r.status()),
            Ok(Err(e)) => classify(e),
        };
        drop(send);
        answers.push(answer);
    }
    let refused = answers.iter().filter(|a| matches!(a, Answer::Reset(h2::Reason::REFUSED_STREAM))).count();
    ensure!(
        refused == EXCESS_STREAMS,
        "expected all {EXCESS_STREAMS} streams beyond {MAX_STREAMS_PER_CONN} refused with RST_STREAM REFUSED_STREAM, got {}",
        answers.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(format!("{} streams answered 200, the next {refused} RST_STREAM REFUSED_STREAM", holders.len()))
}

/// Rewrites SETTINGS_MAX_CONCURRENT_STREAMS in the server's first SETTINGS
/// frame to 10,000 on its way to the h2 client.
struct Lying<IO> {
    io: IO,
    head: Vec<u8>,
    left: usize,
    settings: bool,
    pos: usize,
    id: u16,
    done: bool,
}

impl<IO> Lying<IO> {
    fn new(io: IO) -> Self {
        Lying { io, head: Vec::new(), left: 0, settings: false, pos: 0, id: 0, done: false }
    }

    fn rewrite(&mut self, bytes: &mut [u8]) {
        for b in bytes {
            if self.done {
                return;
            }
            if self.left == 0 {
                self.head.push(*b);
                if self.head.len() == 9 {
                    self.left = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.settings = self.head[3] == 4 && self.head[4] & 1 == 0;
                    self.pos = 0;
                    self.head.clear();
                    self.done = self.settings && self.left == 0;
                }
                continue;
            }
            if self.settings {
                match self.pos % 6 {
                    0 => self.id = u16::from(*b) << 8,
                    1 => self.id |= u16::from(*b),
                    k if self.id == 3 => *b = 10_000u32.to_be_bytes()[k - 2],
                    _ => {}
                }
            }
            self.pos += 1;
            self.left -= 1;
            self.done = self.settings && self.left == 0;
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Lying<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            me.rewrite(&mut buf.filled_mut()[before..]);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Lying<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A good CONNECT to the app: 200, then the bytes echoed back.
async fn good_connect(env: &Env) -> Result<Vec<u8>> {
    let tls = env.good_tls().await?;
    tokio::time::timeout(Duration::from_secs(10), async {
        let (client, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut client = client.ready().await?;
        let (resp, mut send) = client.send_request(connect(&format!("{}:8080", env.b1))?, false)?;
        let resp = resp.await?;
        ensure!(resp.status() == StatusCode::OK, "a good CONNECT got {}, expected 200", resp.status());
        send.send_data(Bytes::from_static(b"still serving"), true)?;
        let mut body = resp.into_body();
        let mut echoed = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
            echoed.extend_from_slice(&chunk);
        }
        Ok::<_, anyhow::Error>(echoed)
    })
    .await
    .context("the good CONNECT did not complete within 10 s")?
}

// ------------------------------------------------------------------ health

fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The agent's descriptors, once back within 8 of `before` (5 s at most).
fn settle_fds(pid: u32, before: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = fd_count(pid)?;
        if now <= before + 8 {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "the agent's descriptors grew from {before} to {now} and stayed there for 5 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn self_calls(node: &Node) -> Result<u64> {
    let m = http_get(node, 15020, "/metrics")?;
    Ok(metric_sum(&m, "sluice_hbone_errors_total", &["direction=\"inbound\"", "status=\"self_call\""]))
}

/// The `PEER` lines an app printed since the last call, waiting `quiet` for
/// late ones.
fn drain_peers(app: &mut ChildGuard, quiet: Duration) -> Result<Vec<String>> {
    let mut peers = Vec::new();
    loop {
        match app.next_line(quiet) {
            Ok(Some(line)) if line.starts_with("PEER ") => peers.push(line),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the app exited: {}", app.stderr_text()),
            Err(_) => return Ok(peers),
        }
    }
}
