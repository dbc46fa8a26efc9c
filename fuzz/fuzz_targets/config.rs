//! The config file, as `sluice run --config` and every reload read it:
//! YAML → `Config::from_str_named` (parse + validation), then for each node
//! `State::from_config` (the node-specific rules and the indexes), a diff
//! against the state of the README's example (what a reload computes), and
//! the policy decisions the data path asks of that state. Nothing of this
//! may panic, whatever the file holds; errors must print.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice::policy::{authorize_conn, plaintext_allowed, Conn, Source};
use sluice::state::{Config, State};

/// The README's example config: the "old" state a reload starts from.
const BASE: &str = r#"trustDomain: cluster.local
ca:
  dir: /var/lib/sluice/ca        # root-cert.pem + ca-key.pem (+ optional cert-chain.pem); RSA >= 2048 or ECDSA P-256
  certTtl: 24h                   # leaf lifetime; renewed at half-life
workloads:
  - uid: default/client
    name: client
    namespace: default
    serviceAccount: sleep
    workloadIps: [10.10.1.2, "fd10:1::2"]
    node: node1
    protocol: HBONE              # HBONE (enrolled) | TCP (not enrolled)
    netns: /var/run/netns/pod1   # required for HBONE workloads on this node
    cgroup: /sys/fs/cgroup/unified/kubepods/pod1   # optional; for eBPF capture
policies:
  - name: only-sleep
    namespace: default            # applies to workloads in this namespace
    selector: { names: [httpbin] } # optional: only these workloads
    action: ALLOW                 # ALLOW | DENY; DENY is checked first
    rules:
      - from: [{ principals: ["cluster.local/ns/default/sa/sleep"], namespaces: [] }]
        to:   [{ ports: [8080] }]
"#;

fn base(node: &str) -> &'static State {
    static NODE1: OnceLock<State> = OnceLock::new();
    static OTHER: OnceLock<State> = OnceLock::new();
    let build = |n: &str| {
        let config = Config::from_str_named(BASE, "readme.yaml").expect("the README's config is valid");
        State::from_config(&config, n).expect("the README's config is valid for any node")
    };
    if node == "node1" {
        NODE1.get_or_init(|| build("node1"))
    } else {
        OTHER.get_or_init(|| build("fuzz-node"))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match Config::from_str_named(text, "fuzz.yaml") {
        Ok(c) => c,
        Err(e) => {
            // The message the operator reads; must format without panicking.
            let _ = e.to_string();
            return;
        }
    };
    let _ = config.inventory_sections();
    let _ = config.mesh();

    // The nodes this file names, and one it does not.
    let mut nodes: Vec<String> = config.workloads.iter().filter_map(|w| w.node.clone()).take(3).collect();
    nodes.push("node1".into());
    nodes.push("fuzz-node".into());
    nodes.dedup();
    for node in &nodes {
        let state = match State::from_config(&config, node) {
            Ok(s) => s,
            Err(e) => {
                let _ = e.to_string();
                continue;
            }
        };
        let old = base(if node == "node1" { "node1" } else { "fuzz-node" });
        let _ = State::diff(old, &state, node);
        let _ = State::diff(&state, old, node);
        let _ = state.local_workloads(node);
        authorize_some(&state);
    }
});

/// Every workload (at most 8) as destination, from each workload's identity
/// and from a plaintext peer, on a few ports: the decisions the inbound
/// path asks for.
fn authorize_some(state: &State) {
    let td = state.trust_domain().to_string();
    let workloads: Vec<_> = state.workloads().take(8).cloned().collect();
    let mut sources: Vec<Source> = workloads
        .iter()
        .map(|w| {
            let ip = w.ips.first().copied().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
            Source::authenticated(w.principal(&td), ip)
        })
        .collect();
    sources.push(Source::plaintext(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
    sources.push(Source::authenticated("spiffe://other.domain/ns/x/sa/y", IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))));
    for dst in &workloads {
        let ip = dst.ips.first().copied().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        for port in [80u16, 8080, 15008] {
            let _ = plaintext_allowed(state, dst, port);
            for src in &sources {
                let conn = Conn { src, dst, dst_addr: SocketAddr::new(ip, port) };
                let _ = authorize_conn(state, &conn).to_string();
            }
        }
        for ip in dst.ips.iter().take(2) {
            let _ = state.workload_by_ip(*ip);
        }
    }
    for svc in state.services().take(8) {
        for vip in svc.vips.iter().take(2) {
            let _ = state.service_by_vip(*vip);
        }
    }
}
