//! The HBONE server contract, checked on the wire against a real agent's
//! 15008 by a hand-driven client: TLS 1.3 + ALPN h2, the client certificate's
//! trust domain, and the status codes ztunnel answers (400 not CONNECT,
//! 400 :authority mismatch, 401 policy deny, 503 app unreachable, 200 + bytes).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use sluice::{
    identity::{Ca, SpiffeId},
    netns::Netns,
};
use sluice_tests::{
    evidence,
    mesh::{http_get, metric_sum, Mesh},
    require_root,
    traffic::echo_server,
    Pod, Topology,
};

/// Open descriptors of process `pid`.
fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The ports of the agent's sk_assign listeners in `pod` (bound to port 0,
/// so the kernel picked them): every listener but the three fixed ones and
/// the test's own servers.
fn assign_ports(pod: &Pod) -> Result<Vec<u16>> {
    let ss = pod.exec_ok(&["ss", "-Hltn4"])?;
    let mut ports: Vec<u16> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next()?.parse().ok())
        .filter(|p| ![15001, 15006, 15008, 8080, 9000].contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}
use tokio_rustls::{client::TlsStream, TlsConnector};

/// Accepts any server: these tests check the *server's* decisions.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

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
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
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

/// mTLS to `to` from inside `netns`, presenting a certificate for `id`
/// issued by the CA in `ca_dir`.
async fn handshake(
    netns: &Netns,
    to: SocketAddr,
    ca_dir: &std::path::Path,
    id: &SpiffeId,
) -> Result<TlsStream<tokio::net::TcpStream>> {
    let cert = Ca::load(ca_dir)?.issue(id, Duration::from_secs(3600))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    let tcp = netns.socket(to, None, false)?.connect(to).await.context("TCP connect to 15008")?;
    let tls = TlsConnector::from(Arc::new(config)).connect(ServerName::IpAddress(to.ip().into()), tcp).await?;
    Ok(tls)
}

/// TLS 1.3 checks the client certificate after the client's Finished, so a
/// refusal shows up here, as the alert that ends the HTTP/2 handshake.
async fn request(
    tls: TlsStream<tokio::net::TcpStream>,
    method: Method,
    authority: &str,
) -> Result<(StatusCode, h2::SendStream<Bytes>, h2::RecvStream)> {
    let step = async {
        let (client, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut client = client.ready().await?;
        let req = if method == Method::CONNECT {
            Request::builder().method(method).uri(authority).body(())?
        } else {
            Request::builder().method(method).uri(format!("http://{authority}/")).body(())?
        };
        let (resp, send) = client.send_request(req, false)?;
        let resp = resp.await?;
        Ok((resp.status(), send, resp.into_body()))
    };
    tokio::time::timeout(Duration::from_secs(10), step).await.context("HBONE request timed out")?
}

#[test]
fn hbone_server_contract() -> Result<()> {
    require_root!(Ok(()));
    let topo = Topology::new("wire")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let (b1, b2, c) = (n2.add_pod("b1")?, n2.add_pod("b2")?, n1.add_pod("c")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&b1, "default", "httpbin", true);
    mesh.add(&b2, "default", "httpbin", true);
    mesh.add(&c, "default", "client", false);
    mesh.policies_yaml =
        "  - name: no-9000\n    namespace: default\n    action: DENY\n    rules:\n      - to: [{ ports: [9000] }]\n"
            .into();
    mesh.write_config()?;
    // eBPF mode: 15008 must be reachable untouched by the tc capture.
    let agent = mesh.start_agent(&n2, "ebpf")?;
    let (_srv, _) = echo_server(&b1, &format!("{}:8080", b1.ipv4()), &[])?;
    let (_srv9, _) = echo_server(&b1, &format!("{}:9000", b1.ipv4()), &[])?;

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let netns = Netns::open(&c.netns_path())?;
        let hbone = SocketAddr::new(b1.ipv4().into(), 15008);
        let me = SpiffeId::new("cluster.local", "default", "client")?;
        let ca = mesh.ca_dir();
        let connect = |authority: String, method: Method| {
            let (netns, ca, me) = (&netns, &ca, &me);
            async move { request(handshake(netns, hbone, ca, me).await?, method, &authority).await }
        };

        let bad_requests = || -> Result<u64> {
            let m = http_get(&n2, 15020, "/metrics")?;
            Ok(metric_sum(&m, "sluice_hbone_errors_total", &["direction=\"inbound\"", "status=\"400\""]))
        };
        let before = bad_requests()?;
        let (status, _, _) = connect(format!("{}:8080", b1.ipv4()), Method::GET).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "a non-CONNECT request");
        let (status, _, _) = connect(format!("{}:8080", b2.ipv4()), Method::CONNECT).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, ":authority of another pod than the one dialled");
        assert_eq!(bad_requests()? - before, 2, "both refusals before the handler are counted as 400");
        let (status, _, _) = connect(format!("{}:9000", b1.ipv4()), Method::CONNECT).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "DENY policy on port 9000");
        let (status, _, _) = connect(format!("{}:7777", b1.ipv4()), Method::CONNECT).await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "nothing listens on 7777");
        let (status, mut send, mut recv) = connect(format!("{}:8080", b1.ipv4()), Method::CONNECT).await?;
        assert_eq!(status, StatusCode::OK);
        send.send_data(Bytes::from_static(b"hello through hbone"), true)?;
        let mut echoed = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), recv.data()).await? {
            let chunk = chunk?;
            recv.flow_control().release_capacity(chunk.len())?;
            echoed.extend_from_slice(&chunk);
        }
        assert_eq!(echoed, b"hello through hbone", "bytes must round-trip through the stream");

        // The agent's own ports: dialling one from inside the pod would be
        // accepted by the agent again, which would dial again (a loop that
        // once took thousands of descriptors). Refused before any dial.
        let self_calls = || -> Result<u64> {
            let m = http_get(&n2, 15020, "/metrics")?;
            Ok(metric_sum(&m, "sluice_hbone_errors_total", &["direction=\"inbound\"", "status=\"self_call\""]))
        };
        let (before, fds_before) = (self_calls()?, fd_count(agent.pid())?);
        let mut own = vec![15001u16, 15006, 15008];
        own.extend(assign_ports(&b1)?);
        assert_eq!(own.len(), 4, "eBPF mode has one sk_assign listener per family; b1 is IPv4+IPv6 so expect one v4 port: {own:?}");
        for port in &own {
            let (status, _, _) = connect(format!("{}:{port}", b1.ipv4()), Method::CONNECT).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "CONNECT to the agent's own port {port}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (after, fds_after) = (self_calls()?, fd_count(agent.pid())?);
        assert_eq!(after - before, own.len() as u64, "each refusal counted as self_call once");
        assert!(fds_after <= fds_before + 8, "the agent's descriptors grew from {fds_before} to {fds_after}");
        let (status, _, _) = connect(format!("{}:8080", b1.ipv4()), Method::CONNECT).await?;
        assert_eq!(status, StatusCode::OK, "the agent still serves after the refusals");
        evidence(&format!(
            "15008 :authority on the agent's own ports {own:?}: 400 each, self_call +{}, descriptors {fds_before} -> {fds_after}",
            after - before
        ));

        // Client certificates the server must refuse at the TLS layer.
        let foreign_td = SpiffeId::new("other.local", "default", "client")?;
        let target = format!("{}:8080", b1.ipv4());
        let attempt = |ca: std::path::PathBuf, id: SpiffeId| {
            let (netns, target) = (&netns, &target);
            async move {
                let tls = handshake(netns, hbone, &ca, &id).await?;
                request(tls, Method::CONNECT, target).await
            }
        };
        let refused = attempt(ca.clone(), foreign_td).await;
        assert!(refused.is_err(), "a client from trust domain other.local was accepted");
        let other_ca = mesh.dir.path().join("rogue-ca");
        Ca::init(&other_ca)?;
        let rogue = attempt(other_ca, me.clone()).await;
        assert!(rogue.is_err(), "a client certificate from another CA was accepted");
        evidence(&format!(
            "15008 answered 400/400/401/503/200 as specified; refused other.local ({}) and a rogue CA ({})",
            refused.err().map(|e| format!("{e:#}")).unwrap_or_default(),
            rogue.err().map(|e| format!("{e:#}")).unwrap_or_default()
        ));
        Ok(())
    })
}
