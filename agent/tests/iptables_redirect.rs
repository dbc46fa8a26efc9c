//! The iptables capture backend against real network namespaces and real
//! sockets. Each test builds its own pair of namespaces, "pod" and "client",
//! joined by a veth; every command runs inside them, never on the host, and a
//! Drop guard deletes them even when an assertion fails.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use sluice::{
    netns::{original_dst, Netns},
    redirect::{
        iptables::{Backend, IptablesRedirect},
        Mode, PodCapture, Redirect,
    },
};
use sluice_tests::require_root;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    time::timeout,
};

const WAIT: Duration = Duration::from_secs(5);

/// Runs `ip` on the host, only ever to add or delete our own namespaces or,
/// with `-n`, inside them.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A pod netns and a client netns joined by a veth, with v4 and v6 addresses.
struct TestNet {
    names: Vec<String>,
    pod: Netns,
    client: Netns,
    pod_v4: IpAddr,
    client_v4: IpAddr,
    pod_v6: IpAddr,
    client_v6: IpAddr,
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for name in &self.names {
            // Already gone is fine: a test may delete the pod netns itself.
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Deletes namespaces created before `TestNet` exists, if setup fails.
struct Names(Vec<String>);

impl Drop for Names {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl TestNet {
    fn new() -> TestNet {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let pod = format!("slipt-{pid}-{n}-pod");
        let client = format!("slipt-{pid}-{n}-cli");
        let mut guard = Names(Vec::new());
        for name in [&pod, &client] {
            ip(&["netns", "add", name]);
            guard.0.push(name.clone());
        }
        // Created inside the pod netns with its peer moved straight into
        // the client's, so no interface ever appears on the host.
        ip(&["-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &client]);
        for (name, host) in [(&pod, 1), (&client, 2)] {
            ip(&["-n", name, "link", "set", "lo", "up"]);
            ip(&["-n", name, "link", "set", "eth0", "up"]);
            let v4 = format!("10.250.{n}.{host}/24");
            ip(&["-n", name, "addr", "add", &v4, "dev", "eth0"]);
            // nodad: the address is usable at once, not after DAD's delay.
            let v6 = format!("fd99:{n:x}::{host}/64");
            ip(&["-n", name, "addr", "add", &v6, "dev", "eth0", "nodad"]);
        }
        let open = |name: &str| Netns::open(&PathBuf::from("/run/netns").join(name)).unwrap();
        TestNet {
            pod: open(&pod),
            client: open(&client),
            pod_v4: IpAddr::V4(Ipv4Addr::new(10, 250, n as u8, 1)),
            client_v4: IpAddr::V4(Ipv4Addr::new(10, 250, n as u8, 2)),
            pod_v6: IpAddr::V6(Ipv6Addr::new(0xfd99, n as u16, 0, 0, 0, 0, 0, 1)),
            client_v6: IpAddr::V6(Ipv6Addr::new(0xfd99, n as u16, 0, 0, 0, 0, 0, 2)),
            names: std::mem::take(&mut guard.0),
        }
    }

    fn ips(&self) -> [IpAddr; 2] {
        [self.pod_v4, self.pod_v6]
    }

    /// (pod ip, client ip) of one family.
    fn pair(&self, v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            (self.pod_v6, self.client_v6)
        } else {
            (self.pod_v4, self.client_v4)
        }
    }
}

fn capture<'a>(net: &'a TestNet, ips: &'a [IpAddr]) -> PodCapture<'a> {
    PodCapture { uid: "test-pod-uid", netns: &net.pod, ips, identity: "", cgroup: None, inbound_listeners: &[] }
}

/// stdout of `program args` inside `ns`.
fn run_in(ns: &Netns, program: &str, args: &[&str]) -> String {
    let out = ns.command(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn strip_counters(line: &str) -> &str {
    match line.rsplit_once(" [") {
        Some((head, tail)) if line.starts_with(':') && tail.ends_with(']') => head,
        _ => line,
    }
}

/// One table of `*-save` output, without comments and counters.
fn saved_table(ns: &Netns, save: &str, table: &str) -> Vec<String> {
    let text = run_in(ns, save, &[]);
    let mut lines = text
        .lines()
        .skip_while(|l| *l != format!("*{table}"))
        .take_while(|l| *l != "COMMIT")
        .filter(|l| !l.starts_with('#'))
        // Chain policies print live `[packets:bytes]`; traffic the kernel
        // sends by itself (IPv6 MLD after link-up) can move them at any time.
        .map(|l| strip_counters(l).to_owned())
        .collect::<Vec<_>>();
    if !lines.is_empty() {
        lines.push("COMMIT".into());
    }
    lines
}

fn expected_mangle() -> Vec<String> {
    [
        "*mangle",
        ":PREROUTING ACCEPT",
        ":INPUT ACCEPT",
        ":FORWARD ACCEPT",
        ":OUTPUT ACCEPT",
        ":POSTROUTING ACCEPT",
        ":SLUICE_OUTPUT -",
        ":SLUICE_PRERT -",
        "-A PREROUTING -j SLUICE_PRERT",
        "-A OUTPUT -j SLUICE_OUTPUT",
        "-A SLUICE_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-A SLUICE_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "COMMIT",
    ]
    .map(String::from)
    .to_vec()
}

fn expected_nat(lo: &str) -> Vec<String> {
    [
        "*nat".to_owned(),
        ":PREROUTING ACCEPT".into(),
        ":INPUT ACCEPT".into(),
        ":OUTPUT ACCEPT".into(),
        ":POSTROUTING ACCEPT".into(),
        ":SLUICE_OUTPUT -".into(),
        ":SLUICE_PRERT -".into(),
        "-A PREROUTING -j SLUICE_PRERT".into(),
        "-A OUTPUT -j SLUICE_OUTPUT".into(),
        "-A SLUICE_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT".into(),
        format!("-A SLUICE_OUTPUT ! -d {lo} -o lo -j ACCEPT"),
        format!("-A SLUICE_OUTPUT ! -d {lo} -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"),
        format!("-A SLUICE_PRERT ! -d {lo} -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"),
        "COMMIT".into(),
    ]
    .to_vec()
}

/// Asserts the full ruleset of both families, as `prefix`-save shows it.
fn assert_rules_installed(ns: &Netns, backend: &str) {
    for (save, lo) in
        [(format!("iptables-{backend}-save"), "127.0.0.1/32"), (format!("ip6tables-{backend}-save"), "::1/128")]
    {
        assert_eq!(saved_table(ns, &save, "mangle"), expected_mangle(), "{save}");
        assert_eq!(saved_table(ns, &save, "nat"), expected_nat(lo), "{save}");
    }
    for fam in ["-4", "-6"] {
        let rules = run_in(ns, "ip", &[fam, "rule", "show"]);
        let ours: Vec<&str> = rules.lines().filter(|l| l.contains("0x111")).collect();
        assert_eq!(ours, ["32764:\tfrom all fwmark 0x111/0xfff lookup 133"], "ip {fam} rule");
        let routes = run_in(ns, "ip", &[fam, "route", "show", "table", "133"]);
        assert!(
            routes.trim().starts_with("local default dev lo") && routes.trim().lines().count() == 1,
            "ip {fam} route show table 133: {routes}"
        );
    }
}

fn assert_nothing_left(ns: &Netns, backend: &str) {
    for save in [format!("iptables-{backend}-save"), format!("ip6tables-{backend}-save")] {
        let text = run_in(ns, &save, &[]);
        assert!(!text.contains("SLUICE"), "{save} still shows:\n{text}");
    }
    for fam in ["-4", "-6"] {
        let rules = run_in(ns, "ip", &[fam, "rule", "show"]);
        assert!(!rules.contains("0x111"), "ip {fam} rule: {rules}");
        let routes = run_in(ns, "ip", &[fam, "route", "show", "table", "133"]);
        assert_eq!(routes.trim(), "", "ip {fam} route show table 133");
    }
}

#[test]
fn enroll_installs_exact_rules_idempotently_and_unenroll_removes_them() {
    require_root!();
    let net = TestNet::new();
    let ips = net.ips();
    let pod = capture(&net, &ips);
    let redirect = IptablesRedirect::with_backend(Backend::Nft);
    assert_eq!(redirect.mode(), Mode::Iptables);

    redirect.enroll(&pod).unwrap();
    assert_rules_installed(&net.pod, "nft");
    redirect.enroll(&pod).unwrap();
    assert_rules_installed(&net.pod, "nft");

    // The dump shows our chains and nothing else.
    let dump = redirect.dump(&pod).unwrap();
    let v4 = &dump.iptables["v4"];
    assert!(v4.contains("-A PREROUTING -j SLUICE_PRERT\n"), "{v4}");
    assert!(v4.contains("--to-ports 15001"), "{v4}");
    assert!(!v4.contains(":INPUT"), "{v4}");
    assert!(dump.iptables["v6"].contains("! -d ::1/128"));
    assert_eq!(dump.ip_rules["v6"].len(), 1);

    redirect.unenroll(&pod).unwrap();
    assert_nothing_left(&net.pod, "nft");
    redirect.unenroll(&pod).unwrap();
    assert_eq!(redirect.dump(&pod).unwrap().iptables["v4"], "");

    // Unenroll after the pod's netns path is gone: the open fd still reaches
    // it, and there is simply nothing to do or something to clean.
    redirect.enroll(&pod).unwrap();
    ip(&["netns", "del", &net.names[0]]);
    redirect.unenroll(&pod).unwrap();
    assert_nothing_left(&net.pod, "nft");
}

#[test]
fn legacy_backend_and_detection() {
    require_root!();
    let net = TestNet::new();
    let ips = net.ips();
    let pod = capture(&net, &ips);
    // Detection runs in the agent's netns; here a thread stands in the pod's.
    let detect_in = |ns: &Netns| {
        std::thread::scope(|s| s.spawn(|| ns.run(|| Ok(IptablesRedirect::detect())).unwrap()).join().unwrap())
            .unwrap()
            .backend()
    };
    assert_eq!(detect_in(&net.pod), Backend::Nft, "no rules anywhere: nft");

    let legacy = IptablesRedirect::with_backend(Backend::Legacy);
    legacy.enroll(&pod).unwrap();
    legacy.enroll(&pod).unwrap();
    assert_rules_installed(&net.pod, "legacy");
    assert!(!run_in(&net.pod, "iptables-nft-save", &[]).contains("-A SLUICE"));
    assert_eq!(detect_in(&net.pod), Backend::Legacy, "only legacy has rules");

    legacy.unenroll(&pod).unwrap();
    assert_nothing_left(&net.pod, "legacy");
}

#[tokio::test]
async fn legacy_rules_capture() {
    require_root!();
    let net = TestNet::new();
    let ips = net.ips();
    let redirect = IptablesRedirect::with_backend(Backend::Legacy);
    redirect.enroll(&capture(&net, &ips)).unwrap();
    outbound_is_captured(&net, false).await;
    inbound_is_captured(&net, true).await;
}

/// An unmarked socket in `ns`, as an app would have.
fn app_socket(ns: &Netns, peer: SocketAddr) -> TcpSocket {
    let s = ns
        .run(|| {
            let s = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .unwrap();
    TcpSocket::from_std_stream(s.into())
}

/// A plain (unmarked) listener in `ns`, as an app would have.
fn app_listener(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let l = ns
        .run(|| {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap();
    TcpListener::from_std(l).unwrap()
}

/// A listener like the agent's (marked, in the pod netns).
fn agent_listener(ns: &Netns, v6: bool, port: u16) -> TcpListener {
    let any = if v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    TcpListener::from_std(ns.listen(SocketAddr::new(any, port), false).unwrap()).unwrap()
}

async fn accept(l: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    timeout(WAIT, l.accept()).await.unwrap_or_else(|_| panic!("{what}: nothing accepted")).unwrap()
}

async fn connect(s: TcpSocket, to: SocketAddr) -> TcpStream {
    timeout(WAIT, s.connect(to))
        .await
        .unwrap_or_else(|_| panic!("connect to {to} timed out"))
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"))
}

async fn outbound_is_captured(net: &TestNet, v6: bool) {
    let (pod_ip, client_ip) = net.pair(v6);
    let outbound = agent_listener(&net.pod, v6, 15001);
    let upstream = app_listener(&net.client, SocketAddr::new(client_ip, 8080));
    let dst = SocketAddr::new(client_ip, 8080);

    // An app's connection lands on 15001, remembering where it was going.
    let _app = connect(app_socket(&net.pod, dst), dst).await;
    let (captured, _) = accept(&outbound, "outbound 15001").await;
    assert_eq!(original_dst(&captured).unwrap(), dst);

    // The agent's own (marked) socket goes where it asked.
    let agent = net.pod.socket(dst, None, false).unwrap();
    let _agent = connect(agent, dst).await;
    let (_, peer) = accept(&upstream, "client's 8080 from a marked socket").await;
    assert_eq!(peer.ip(), pod_ip);
}

async fn inbound_is_captured(net: &TestNet, v6: bool) {
    let (pod_ip, _) = net.pair(v6);
    let inbound = agent_listener(&net.pod, v6, 15006);
    let hbone = agent_listener(&net.pod, v6, 15008);

    let dst = SocketAddr::new(pod_ip, 8080);
    let _c = connect(app_socket(&net.client, dst), dst).await;
    let (captured, _) = accept(&inbound, "inbound 15006").await;
    assert_eq!(original_dst(&captured).unwrap(), dst);

    // HBONE is the tunnel itself and must reach 15008 untouched.
    let dst = SocketAddr::new(pod_ip, 15008);
    let _c = connect(app_socket(&net.client, dst), dst).await;
    let (tunnel, _) = accept(&hbone, "hbone 15008").await;
    assert_eq!(tunnel.local_addr().unwrap(), dst);
}

async fn capture_works(v6: bool) {
    let net = TestNet::new();
    let ips = net.ips();
    IptablesRedirect::with_backend(Backend::Nft).enroll(&capture(&net, &ips)).unwrap();
    outbound_is_captured(&net, v6).await;
    inbound_is_captured(&net, v6).await;
}

#[tokio::test]
async fn capture_works_v4() {
    require_root!();
    capture_works(false).await;
}

#[tokio::test]
async fn capture_works_v6() {
    require_root!();
    capture_works(true).await;
}

/// The agent's inbound flow: accept on 15006, connect to the app from the
/// client's own IP (transparent), and splice. The app's replies go to a
/// foreign IP; only the connmark and the ip rule bring them back.
async fn transparent_return_path(v6: bool) {
    let net = TestNet::new();
    let ips = net.ips();
    IptablesRedirect::with_backend(Backend::Nft).enroll(&capture(&net, &ips)).unwrap();
    let (pod_ip, client_ip) = net.pair(v6);
    let inbound = agent_listener(&net.pod, v6, 15006);
    let any = if v6 { "[::]:8080" } else { "0.0.0.0:8080" };
    let app = app_listener(&net.pod, any.parse().unwrap());

    let dst = SocketAddr::new(pod_ip, 8080);
    let mut client = connect(app_socket(&net.client, dst), dst).await;
    let (mut from_client, peer) = accept(&inbound, "inbound 15006").await;
    assert_eq!(peer.ip(), client_ip);
    let orig = original_dst(&from_client).unwrap();
    assert_eq!(orig, dst);

    let upstream = net.pod.socket(orig, Some(SocketAddr::new(peer.ip(), 0)), true).unwrap();
    let mut to_app = connect(upstream, orig).await;
    let (mut at_app, app_peer) = accept(&app, "app 8080").await;
    assert_eq!(app_peer.ip(), client_ip, "the app sees the real client");

    tokio::spawn(async move {
        let _ = tokio::io::copy_bidirectional(&mut from_client, &mut to_app).await;
    });
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    timeout(WAIT, at_app.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ping");
    at_app.write_all(b"pong").await.unwrap();
    timeout(WAIT, client.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn transparent_return_path_v4() {
    require_root!();
    transparent_return_path(false).await;
}

#[tokio::test]
async fn transparent_return_path_v6() {
    require_root!();
    transparent_return_path(true).await;
}

#[test]
fn errors_carry_context_and_partial_enroll_is_cleanable() {
    require_root!();
    let net = TestNet::new();
    // A pod netns with IPv6 switched off cannot take the v6 return route.
    for key in ["all", "default", "lo", "eth0"] {
        let sysctl = format!("net.ipv6.conf.{key}.disable_ipv6=1");
        run_in(&net.pod, "sysctl", &["-qw", &sysctl]);
    }
    let ips = net.ips();
    let pod = capture(&net, &ips);
    let redirect = IptablesRedirect::with_backend(Backend::Nft);
    let err = format!("{:#}", redirect.enroll(&pod).unwrap_err());
    assert!(err.contains("pod test-pod-uid"), "{err}");
    assert!(err.contains("ip -6 route replace local ::/0"), "{err}");
    assert!(err.contains(&net.names[0]), "names the netns: {err}");
    assert!(err.contains("IPv6 is disabled"), "carries stderr: {err}");

    // Whatever got in before the failure, unenroll takes out.
    redirect.unenroll(&pod).unwrap();
    assert_nothing_left(&net.pod, "nft");
}
