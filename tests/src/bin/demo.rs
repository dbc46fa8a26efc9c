//! `cargo xtask demo`: Sluice on two simulated nodes, no cluster needed.
//!
//! 1. The mesh: a local config, a CA, one `sluice run` per node, real traffic
//!    between pods, a capture of the wire between the nodes, and a summary of
//!    what moved, who proved which identity, what policy decided.
//!    One pod ("checkout") is brought up the way a container runtime does it
//!    on a node: the CNI chain `bridge` (IPAM `host-local`), then
//!    `sluice-cni`, which asks the agent and returns only once the pod is
//!    captured. A service VIP (the config's `services:`) is dialled too.
//! 2. The kernel path: sock_ops + sk_msg moving bytes socket to socket in an
//!    enrolled pod's cgroup, with the counters to show it.
//!
//! Everything it creates is removed at the end, also on failure.

use std::{path::Path, process::Command, time::Duration, time::Instant};

use anyhow::{bail, ensure, Context, Result};
use sluice_tests::{
    agent_bin,
    capture::{Capture, WireReport},
    cni_chain::{bridge_conflist, plugin_dirs, result_ipv4, sluice_plugin, Attachment, Chain},
    mesh::{http_get, metric_sum, write_atomic, Mesh, MeshService},
    traffic::{echo_server, send, send_verified},
    Agent, CniPod, Topology,
};

const PIN_ROOT: &str = "/sys/fs/bpf/sluice";
/// The CNI pod's address: host-local hands it out on request (`IP=` in
/// CNI_ARGS, a static address), so the config file can name it beforehand.
const CHECKOUT_IP: &str = "10.10.1.130";
/// The httpbin Service's ClusterIP.
const HTTPBIN_VIP: &str = "10.96.0.10";

fn main() {
    if let Err(e) = demo() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn say(s: &str) {
    println!("--- {s}");
}

fn demo() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    if Path::new(PIN_ROOT).exists() {
        bail!("{PIN_ROOT} exists: another Sluice agent is running on this machine; stop it first");
    }
    let started = Instant::now();
    say("building two simulated nodes (netns + veth + bridge), pods with their own netns and cgroup");
    let topo = Topology::new("demo")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let (sleep, legacy, web) = (n1.add_pod("sleep")?, n1.add_pod("legacy")?, n1.add_pod("web")?);
    let (httpbin, other) = (n2.add_pod("httpbin")?, n2.add_pod("other")?);
    let mut mesh = Mesh::new(&topo, "cluster.local")?;
    mesh.add(&sleep, "default", "sleep", true);
    mesh.add(&legacy, "default", "legacy", false);
    mesh.add(&web, "default", "web", true);
    mesh.add(&httpbin, "default", "httpbin", true);
    mesh.add(&other, "other", "other", true);
    let svc = mesh.add_service(MeshService::new("httpbin", "default", &[HTTPBIN_VIP], &[(80, 8080)]));
    mesh.add_endpoint("httpbin", &svc, &[]);
    // Created by the "runtime": a netns with nothing in it yet and kubelet's
    // pod cgroup; its interface and address come from the CNI chain.
    let checkout = n1.add_cni_pod("checkout")?;
    mesh.policies_yaml = "  - name: httpbin-from-sleep\n    namespace: default\n    selector: { names: [httpbin] }\n    action: ALLOW\n    rules:\n      - from: [{ principals: [\"cluster.local/ns/default/sa/sleep\"] }]\n        to: [{ ports: [8080] }]\n".into();
    let config = mesh.config_path();
    write_atomic(&config, &with_cni_workload(&mesh.render(), &checkout))?;
    println!(
        "    node1: sleep {} (meshed), web {} (meshed), legacy {} (not meshed)",
        sleep.ipv4(),
        web.ipv4(),
        legacy.ipv4()
    );
    println!("    node1: checkout {CHECKOUT_IP} (meshed; set up through the CNI chain below)");
    println!(
        "    node2: httpbin {} (meshed; ALLOW only sa sleep on 8080), other {} (meshed)",
        httpbin.ipv4(),
        other.ipv4()
    );
    println!("    service httpbin.default.svc.cluster.local {HTTPBIN_VIP}:80 -> httpbin:8080");
    println!("    config {}  CA {}", config.display(), mesh.ca_dir().display());

    say("starting one `sluice run --redirect auto` per node (eBPF capture when the kernel has every piece)");
    let ag1 = mesh.start_agent(&n1, "auto")?;
    let ag2 = mesh.start_agent(&n2, "auto")?;
    let mode = http_get(&n1, 15021, "/healthz/ready")?
        .lines()
        .find_map(|l| l.strip_prefix("mode: ").map(str::to_owned))
        .unwrap_or_default();
    println!("    agents pid {} (node1) and {} (node2), ready; capture mode: {mode}", ag1.pid(), ag2.pid());

    say("a new pod the way kubelet and the runtime bring it up: CNI ADD through bridge + host-local, then sluice-cni");
    let cni_log = mesh.dir.path().join("sluice-cni.log");
    let socket = ag1.cni_socket.clone().context("the agent serves the CNI plugin")?;
    let conflist = bridge_conflist(
        "k8s-pod-network",
        "10.10.1.128/25",
        (CHECKOUT_IP, "10.10.1.250"),
        "10.10.1.129",
        &mesh.dir.path().join("ipam"),
        vec![sluice_plugin(&socket, true, &cni_log)],
    );
    let chain = Chain { conflist, cni_path: plugin_dirs()?, netns: n1.netns_name().to_owned() };
    let attachment = Attachment::kubelet(&checkout, "default", &[("IP", CHECKOUT_IP)]);
    println!("    conflist plugins: bridge (cni0, IPAM host-local 10.10.1.128/25) -> sluice-cni (agentSocket {}, failClosed)", socket.display());
    let t = Instant::now();
    let result = chain.add(&attachment).map_err(|e| anyhow::anyhow!("CNI ADD of checkout: {e}"))?;
    let add_ms = t.elapsed().as_millis();
    let ip = result_ipv4(&result)?;
    ensure!(ip.to_string() == CHECKOUT_IP, "host-local gave {ip}, not the requested {CHECKOUT_IP}");
    println!("    ADD returned in {add_ms} ms with the bridge plugin's result, passed through: {result}");
    for line in std::fs::read_to_string(&cni_log).unwrap_or_default().lines() {
        println!("    plugin log: {line}");
    }
    let idle = sluice_tests::cgroup::procs(&checkout.cgroup_path())?.is_empty();
    let listeners: Vec<String> = checkout
        .exec_ok(&["ss", "-Hltn"])?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect();
    ensure!(idle && listeners.len() >= 3, "checkout captured before it runs: idle {idle}, listeners {listeners:?}");
    println!("    no process runs in the pod yet, and the agent already listens in it: {}", listeners.join(" "));

    say("capturing the wire between the nodes while the pods talk");
    let pcap = mesh.dir.path().join("wire.pcap");
    let capture = Capture::start(&topo.lan_netns(), topo.bridge(), &pcap)?;
    let (_srv, addr) = echo_server(&httpbin, &format!("{}:8080", httpbin.ipv4()), &[])?;
    let (_srv6, addr6) = echo_server(&httpbin, &format!("[{}]:8080", httpbin.ipv6()), &[])?;
    let mut moved = 0;
    for _ in 0..4 {
        moved += send_verified(&sleep, &addr, 8 << 20, Duration::from_secs(60))?.bytes_verified;
    }
    moved += send_verified(&sleep, &addr6, 4 << 20, Duration::from_secs(60))?.bytes_verified;
    // The Service: sleep dials the VIP; the agent picks the endpoint.
    let vip = format!("{HTTPBIN_VIP}:80");
    let via_vip = send_verified(&sleep, &vip, 4 << 20, Duration::from_secs(60))?.bytes_verified;
    // The CNI pod's app starts only now, and is reached from the other node.
    let (_co, checkout_addr) = echo_server(&checkout, &format!("{CHECKOUT_IP}:8080"), &[])?;
    let to_checkout = send_verified(&other, &checkout_addr, 4 << 20, Duration::from_secs(60))?.bytes_verified;
    let wire = WireReport::from_pcap(&capture.stop()?)?;
    // After the capture: this client is outside the mesh, so its attempt
    // crosses the wire in plaintext by design; the destination agent denies it.
    let denied = send(&legacy, &addr, 4096, Duration::from_secs(10))?;
    ensure!(!denied.ok, "the plaintext client should have been denied");

    let (m1, m2) = (http_get(&n1, 15020, "/metrics")?, http_get(&n2, 15020, "/metrics")?);
    let dump1: serde_json::Value = serde_json::from_str(&http_get(&n1, 15000, "/config_dump")?)?;
    say("summary");
    println!("    echoed byte-exact          {} MiB (IPv4 and IPv6), each byte both ways", moved >> 20);
    let service_line = m1
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_service=\"httpbin.default.svc.cluster.local\"")
        })
        .context("node1 counted no connection to the httpbin service")?;
    let label = |line: &str, k: &str| {
        line.split(&format!("{k}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap_or("?").to_owned()
    };
    println!(
        "    service VIP                {vip}: {} MiB echoed byte-exact, reached {} ({}) over HBONE",
        via_vip >> 20,
        label(service_line, "destination_workload"),
        label(service_line, "connection_security_policy"),
    );
    println!(
        "    CNI pod                    other (node2) -> checkout {CHECKOUT_IP}:8080: {} MiB echoed byte-exact over HBONE",
        to_checkout >> 20
    );
    println!(
        "    counted by node1 (source)  {} MiB sent, {} MiB received",
        metric_sum(&m1, "istio_tcp_received_bytes_total", &["reporter=\"source\""]) >> 20,
        metric_sum(&m1, "istio_tcp_sent_bytes_total", &["reporter=\"source\""]) >> 20
    );
    println!(
        "    HBONE                      {} streams on {} pooled connection(s) from node1",
        metric_sum(&m1, "istio_tcp_connections_opened_total", &["reporter=\"source\"", "mutual_tls"]),
        dump1["pool"]["connections"]
    );
    let m1_now = http_get(&n1, 15020, "/metrics")?;
    let proved: std::collections::BTreeSet<(String, String)> = m2
        .lines()
        .chain(m1_now.lines())
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("mutual_tls")
        })
        .map(|l| (label(l, "source_principal"), label(l, "destination_principal")))
        .collect();
    for (from, to) in proved {
        println!("    identities proved          {from} -> {to}");
    }
    println!(
        "    policy                     allowed {} mTLS stream(s) from sa sleep; denied {} plaintext connection(s) from legacy (httpbin-from-sleep)",
        metric_sum(&m2, "istio_tcp_connections_opened_total", &["reporter=\"destination\"", "mutual_tls"]),
        metric_sum(&m2, "sluice_auth_denials_total", &[]),
    );
    println!("    wire between the nodes     {}", wire.summary());
    let mut marker = [0u8; 64];
    sluice_tests::pattern::fill(1 << 20, &mut marker);
    println!(
        "    plaintext on the wire      {}",
        if wire.contains(&marker) { "FOUND (this is a bug)" } else { "none: the payload pattern never appears" }
    );
    ensure!(
        wire.non_hbone_segments == 0 && wire.tls_versions.iter().all(|v| *v == 0x0304),
        "the wire carried more than HBONE"
    );
    if mode == "ebpf" {
        let (c1, c2) = (ag1.counters()?, ag2.counters()?);
        println!(
            "    kernel counters            node1: connect() captured {}, SO_ORIGINAL_DST answered {}; node2: tc sk_assign {}",
            c1["outbound_captured"], c1["orig_dst_answered"], c2["inbound_assigned"]
        );

        say("same node: sleep -> web on node1, authorized by the agent, then spliced in the kernel");
        let (_w, web_addr) = echo_server(&web, &format!("{}:8080", web.ipv4()), &[])?;
        let io = |pid: u32| -> Result<u64> {
            let text = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
            Ok(text
                .lines()
                .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum())
        };
        let (io0, spliced0) = (io(ag1.pid())?, ag1.counters()?["spliced_bytes"].as_u64().unwrap_or(0));
        let r = send_verified(&sleep, &web_addr, 64 << 20, Duration::from_secs(60))?;
        let (io1, spliced1) = (io(ag1.pid())?, ag1.counters()?["spliced_bytes"].as_u64().unwrap_or(0));
        println!(
            "    64 MiB echoed byte-exact in {} ms; the kernel moved {} MiB app to app; the agent process itself read+wrote {} KiB",
            r.elapsed_ms,
            (spliced1 - spliced0) >> 20,
            (io1 - io0) >> 10
        );
    }
    say("the runtime tears checkout down: CNI DEL through the chain, in reverse order");
    let before = std::fs::read_to_string(&cni_log).unwrap_or_default().lines().count();
    chain.del(&attachment, Some(&result)).map_err(|e| anyhow::anyhow!("CNI DEL of checkout: {e}"))?;
    for line in std::fs::read_to_string(&cni_log).unwrap_or_default().lines().skip(before) {
        println!("    plugin log: {line}");
    }
    ag1.stop()?;
    ag2.stop()?;

    say("opt-in loopback bypass: sock_ops + sk_msg between loopback sockets in an enrolled cgroup");
    let bypass =
        Agent::start(&n1, Path::new(PIN_ROOT), &["run", "--cgroup", sleep.cgroup_path().to_str().context("cgroup")?])?;
    for line in run(Command::new("bpftool").args(["prog", "show"]))?.lines().filter(|l| l.contains("sluice")) {
        println!("    bpftool prog: {}", line.trim());
    }
    let (_l, local) = echo_server(&sleep, "127.0.0.1:0", &[])?;
    let fast = send_verified(&sleep, &local, 16 << 20, Duration::from_secs(60))?;
    let (_l2, local2) = echo_server(&legacy, "127.0.0.1:0", &[])?;
    let slow = send_verified(&legacy, &local2, 16 << 20, Duration::from_secs(60))?;
    println!("    16 MiB each way over 127.0.0.1: enrolled pod TCP segs_out {} bytes_acked {}; plain pod segs_out {} bytes_acked {}",
        fast.tcp_info.segs_out, fast.tcp_info.bytes_acked, slow.tcp_info.segs_out, slow.tcp_info.bytes_acked);
    for line in run(Command::new(agent_bin()).args(["inspect", "--pin-root", PIN_ROOT]))?.lines() {
        println!("    {line}");
    }
    bypass.stop()?;
    ensure!(!Path::new(PIN_ROOT).exists(), "pins left behind in {PIN_ROOT}");

    let names = topo.netns_names();
    drop(topo);
    let netns = run(Command::new("ip").args(["netns", "list"]))?;
    ensure!(!names.iter().any(|n| netns.contains(n.as_str())), "network namespaces left behind");
    say(&format!(
        "done in {:.1} s: agents stopped, programs detached, pins, namespaces and cgroups removed",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The config text with the CNI pod added to `workloads`: its netns path
/// (the runtime creates it before the chain runs), kubelet's pod cgroup,
/// and the address it will request from host-local. With the file as the
/// source the agent answers the plugin's ADD from this entry.
fn with_cni_workload(config: &str, pod: &CniPod) -> String {
    let entry = format!(
        "  - uid: default/{name}\n    name: {name}\n    namespace: default\n    serviceAccount: {name}\n    workloadIps: [{CHECKOUT_IP}]\n    node: {node}\n    protocol: HBONE\n    netns: {netns}\n    cgroup: {cgroup}\n",
        name = pod.name(),
        node = pod.node_name(),
        netns = pod.netns_path().display(),
        cgroup = pod.cgroup_path().display(),
    );
    config.replacen("workloads:\n", &format!("workloads:\n{entry}"), 1)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
