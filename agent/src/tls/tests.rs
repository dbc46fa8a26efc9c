//! Real handshakes between the HBONE configs, over in-memory pipes and TCP.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{ProtocolVersion, RootCertStore};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::{testutil, Ca, CertCache};

const TD: &str = "cluster.local";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn id(td: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, ns, sa).unwrap()
}

fn server_id() -> SpiffeId {
    id(TD, "backend", "api")
}

fn client_id() -> SpiffeId {
    id(TD, "frontend", "web")
}

/// One CA and a cache on it, as one node would have.
struct Pki {
    _dir: tempfile::TempDir,
    cache: Arc<CertCache>,
    roots: Arc<RootCertStore>,
}

impl Pki {
    fn new(ttl: Duration) -> Self {
        let (dir, ca) = testutil::new_ca();
        Self::from_ca(dir, ca, ttl)
    }

    fn from_ca(dir: tempfile::TempDir, ca: Arc<Ca>, ttl: Duration) -> Self {
        let roots = Arc::new(ca.roots());
        Self { _dir: dir, cache: Arc::new(CertCache::new(ca, ttl)), roots }
    }

    fn server(&self, id: SpiffeId) -> Arc<rustls::ServerConfig> {
        server_config(self.cache.clone(), id, self.roots.clone(), TD.into()).unwrap()
    }

    fn client(&self, id: SpiffeId, expected: SpiffeId) -> Arc<rustls::ClientConfig> {
        client_config(self.cache.clone(), id, self.roots.clone(), expected).unwrap()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

type Outcome<S> = (io::Result<server::TlsStream<S>>, io::Result<client::TlsStream<S>>);

async fn handshake_over<S>(
    server_io: S,
    client_io: S,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Outcome<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let accept = TlsAcceptor::from(server).accept(server_io);
    let connect = TlsConnector::from(client).connect(connect_server_name(LOCALHOST), client_io);
    tokio::join!(accept, connect)
}

async fn handshake(server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Outcome<DuplexStream> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    handshake_over(server_io, client_io, server, client).await
}

/// One round trip in each direction.
async fn exchange<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = [0u8; 4];
    a.write_all(b"ping").await?;
    a.flush().await?;
    b.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong").await?;
    b.flush().await?;
    a.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"pong");
    Ok(())
}

/// The identity-check verdict inside a handshake error, if that is what
/// failed it.
fn rejection(err: &io::Error) -> Option<&PeerRejected> {
    PeerRejected::find(err.get_ref()?.downcast_ref::<rustls::Error>()?)
}

/// In TLS 1.3 the client's handshake completes before the server has judged
/// the client certificate; the verdict arrives as an alert on first read.
async fn client_sees_failure(client: io::Result<client::TlsStream<DuplexStream>>) {
    if let Ok(mut stream) = client {
        let mut buf = [0u8; 1];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!("client read data from a server that refused it"),
        }
    }
}

#[tokio::test]
async fn mtls_over_tcp_sees_both_identities() {
    let pki = Pki::new(HOUR);
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client_io, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (server, client) = handshake_over(
        accepted.unwrap().0,
        client_io.unwrap(),
        pki.server(server_id()),
        pki.client(client_id(), server_id()),
    )
    .await;
    let (mut server, mut client) = (server.unwrap(), client.unwrap());

    let server_conn = server.get_ref().1;
    let client_conn = client.get_ref().1;
    assert_eq!(peer_identity(server_conn), Some(client_id()));
    assert_eq!(peer_identity(client_conn), Some(server_id()));
    assert_eq!(server_conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(client_conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(server_conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(client_conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(server_conn.server_name(), None, "HBONE sends no SNI");
    exchange(&mut client, &mut server).await.unwrap();
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let pki = Pki::new(HOUR);
    let expected = id(TD, "backend", "not-api");
    let (server, client) = handshake(pki.server(server_id()), pki.client(client_id(), expected)).await;
    let err = client.unwrap_err();
    assert!(matches!(rejection(&err), Some(PeerRejected::WrongIdentity { .. })), "{err}");
    assert!(err.to_string().contains("not-api"), "{err}");
    assert!(server.is_err(), "the server sees the client's alert");
}

#[tokio::test]
async fn server_refuses_a_client_from_another_trust_domain() {
    let pki = Pki::new(HOUR);
    let outsider = id("other.local", "frontend", "web");
    let (server, client) = handshake(pki.server(server_id()), pki.client(outsider, server_id())).await;
    let err = server.unwrap_err();
    assert!(matches!(rejection(&err), Some(PeerRejected::WrongTrustDomain { .. })), "{err}");
    assert!(err.to_string().contains("other.local"), "{err}");
    client_sees_failure(client).await;
}

#[tokio::test]
async fn server_refuses_a_client_signed_by_another_root() {
    let ours = Pki::new(HOUR);
    let theirs = Pki::new(HOUR);
    // Same trust domain name, different CA: only the chain can tell them apart.
    let client = client_config(theirs.cache.clone(), client_id(), ours.roots.clone(), server_id()).unwrap();
    let (server, client) = handshake(ours.server(server_id()), client).await;
    let err = server.unwrap_err();
    assert!(rejection(&err).is_none());
    assert_signed_elsewhere(&err);
    client_sees_failure(client).await;
}

#[tokio::test]
async fn client_refuses_a_server_signed_by_another_root() {
    let ours = Pki::new(HOUR);
    let theirs = Pki::new(HOUR);
    let server = server_config(theirs.cache.clone(), server_id(), ours.roots.clone(), TD.into()).unwrap();
    let (_, client) = handshake(server, ours.client(client_id(), server_id())).await;
    assert_signed_elsewhere(&client.unwrap_err());
}

/// Both built-in roots are named "sluice root CA", so webpki finds a root by
/// name and then fails its signature; a differently named root would give
/// UnknownIssuer. Either way the chain, not the identity check, refused it.
fn assert_signed_elsewhere(err: &io::Error) {
    let text = err.to_string();
    assert!(text.contains("BadSignature") || text.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn server_requires_a_client_certificate() {
    let pki = Pki::new(HOUR);
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::new(pki.roots.clone(), server_id(), &provider);
    let mut anonymous = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
    let (server, client) = handshake(pki.server(server_id()), Arc::new(anonymous)).await;
    let err = server.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    client_sees_failure(client).await;
}

/// rustls here is built without TLS 1.2 at all, so a TLS 1.2 client has to
/// be written by hand: a ClientHello with no supported_versions extension.
fn tls12_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03]; // legacy_version: TLS 1.2
    body.extend([0x42; 32]); // random
    body.push(0); // empty session id
    body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // two ECDHE AES-128-GCM suites
    body.extend([0x01, 0x00]); // compression: null
    let extensions = [
        &[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17][..], // supported_groups: P-256
        &[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00],                 // ec_point_formats
        &[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03],     // signature_algorithms
        &[0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2'], // ALPN: h2
    ]
    .concat();
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![0x01, 0x00]; // client_hello, 24-bit length
    handshake.extend((body.len() as u16).to_be_bytes());
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls12_is_refused() {
    let pki = Pki::new(HOUR);
    let (server_io, mut raw) = tokio::io::duplex(64 * 1024);
    let accept = TlsAcceptor::from(pki.server(server_id())).accept(server_io);
    let talk = async {
        raw.write_all(&tls12_client_hello()).await.unwrap();
        let mut reply = Vec::new();
        let _ = raw.read_to_end(&mut reply).await;
        reply
    };
    let (server, reply) = tokio::join!(accept, talk);
    let err = server.unwrap_err();
    let tls_err = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(matches!(tls_err, Some(rustls::Error::PeerIncompatible(_))), "{err}");
    // A fatal alert record: type 21, level 2 (fatal), protocol_version (70).
    assert_eq!(reply.first(), Some(&0x15), "{reply:02x?}");
    assert_eq!(&reply[5..7], &[2, 70], "{reply:02x?}");
}

#[tokio::test]
async fn intermediate_chain_verifies_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    testutil::write_ca_dir(
        dir.path(),
        testutil::RSA2048_ROOT,
        testutil::RSA_INTERMEDIATE_KEY,
        Some(&format!("{}{}", testutil::RSA_INTERMEDIATE_CERT, testutil::RSA2048_ROOT)),
    );
    let ca = Arc::new(Ca::load(dir.path()).unwrap());
    let pki = Pki::from_ca(dir, ca, HOUR);
    let (server, client) = handshake(pki.server(server_id()), pki.client(client_id(), server_id())).await;
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    assert_eq!(client.get_ref().1.peer_certificates().map(<[_]>::len), Some(2));
    assert_eq!(server.get_ref().1.peer_certificates().map(<[_]>::len), Some(2));
    assert_eq!(peer_identity(server.get_ref().1), Some(client_id()));
    exchange(&mut client, &mut server).await.unwrap();
}

#[tokio::test]
async fn rotation_keeps_old_sessions_and_serves_new_certs() {
    let pki = Pki::new(Duration::from_secs(2));
    let server_cfg = pki.server(server_id());
    let client_cfg = pki.client(client_id(), server_id());

    let (server, client) = handshake(server_cfg.clone(), client_cfg.clone()).await;
    let (mut old_server, mut old_client) = (server.unwrap(), client.unwrap());
    let old_leaf = old_client.get_ref().1.peer_certificates().unwrap()[0].clone();
    let old_cert = pki.cache.get(&server_id()).unwrap();

    // Past the old certificate's expiry, not just its half-life, to show
    // that an established session does not care.
    let wait = old_cert.not_after.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;

    let (server, client) = handshake(server_cfg, client_cfg).await;
    let (mut new_server, mut new_client) = (server.unwrap(), client.unwrap());
    let new_leaf = new_client.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(old_leaf, new_leaf, "a new handshake must present the renewed certificate");
    assert_eq!(peer_identity(new_server.get_ref().1), Some(client_id()));

    exchange(&mut old_client, &mut old_server).await.unwrap();
    exchange(&mut new_client, &mut new_server).await.unwrap();
}

#[test]
fn configs_fail_fast_with_reasons() {
    let pki = Pki::new(HOUR);
    let err = server_config(pki.cache.clone(), server_id(), pki.roots.clone(), "Bad Domain".into()).unwrap_err();
    assert!(matches!(err, TlsError::TrustDomain(_)), "{err}");

    let expired = Pki::new(Duration::ZERO);
    let err = client_config(expired.cache.clone(), client_id(), expired.roots.clone(), server_id()).unwrap_err();
    assert!(err.to_string().contains(&client_id().to_string()), "{err}");
}

#[test]
fn connect_server_name_is_an_ip() {
    let name = connect_server_name(LOCALHOST);
    assert!(matches!(name, rustls::pki_types::ServerName::IpAddress(_)));
}
