use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;

const BASE: &str = r#"
trustDomain: cluster.local
ca: { dir: /ca }
workloads:
  - { uid: default/client, name: client, namespace: default, serviceAccount: sleep,
      workloadIps: [10.0.0.1, 'fd00::1'], node: node1, netns: /run/netns/client }
  - { uid: default/server, name: server, namespace: default, serviceAccount: httpbin,
      workloadIps: [10.0.0.2], node: node2 }
  - { uid: legacy/db, name: db, namespace: legacy, serviceAccount: default,
      workloadIps: [10.0.0.3], node: node1, protocol: TCP }
  - { uid: external/vm, name: vm, namespace: external, serviceAccount: vm,
      workloadIps: [10.0.9.9] }
policies:
  - { name: a, namespace: default, action: ALLOW }
  - { name: b, namespace: default, action: DENY }
  - { name: c, namespace: legacy, action: ALLOW }
"#;

fn state(text: &str, node: &str) -> State {
    let config = Config::from_str_named(text, "test.yaml").unwrap();
    State::from_config(&config, node).unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn uids(workloads: &[Arc<Workload>]) -> Vec<&str> {
    workloads.iter().map(|w| w.uid.as_str()).collect()
}

#[test]
fn indexes_by_ip_and_uid() {
    let s = state(BASE, "node1");
    assert_eq!(s.trust_domain(), "cluster.local");
    assert_eq!(s.node(), "node1");
    assert_eq!(s.generation(), 0);

    let client = s.workload_by_ip(ip("10.0.0.1")).unwrap();
    assert_eq!(client.uid, "default/client");
    assert!(Arc::ptr_eq(&client, &s.workload_by_ip(ip("fd00::1")).unwrap()));
    assert!(Arc::ptr_eq(&client, &s.workload_by_uid("default/client").unwrap()));
    // Dual-stack sockets report IPv4 peers as IPv4-mapped IPv6.
    assert_eq!(s.workload_by_ip(ip("::ffff:10.0.0.1")).unwrap().uid, "default/client");
    assert!(s.workload_by_ip(ip("10.0.0.200")).is_none());
    assert!(s.workload_by_uid("nope").is_none());
    assert_eq!(client.netns.as_deref(), Some(Path::new("/run/netns/client")));
    assert_eq!(s.workload_by_uid("legacy/db").unwrap().protocol, Protocol::Tcp);
    assert_eq!(s.workloads().count(), 4);
}

#[test]
fn identity() {
    let s = state(BASE, "node1");
    let client = s.workload_by_uid("default/client").unwrap();
    assert_eq!(client.principal(s.trust_domain()), "cluster.local/ns/default/sa/sleep");
    assert_eq!(client.spiffe_id_parts("cluster.local"), ("cluster.local", "default", "sleep"));
}

#[test]
fn local_workloads_and_policies() {
    let s = state(BASE, "node1");
    assert_eq!(uids(&s.local_workloads("node1")), ["default/client", "legacy/db"]);
    assert_eq!(uids(&s.local_workloads("node2")), ["default/server"]);
    assert!(s.local_workloads("node3").is_empty());

    let names: Vec<&str> = s.policies_in("default").iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(s.policies_in("legacy").len(), 1);
    assert!(s.policies_in("nowhere").is_empty());
}

#[test]
fn netns_required_only_for_local_hbone() {
    let text = BASE.replace(", netns: /run/netns/client", "");
    let config = Config::from_str_named(&text, "test.yaml").unwrap();
    let err = State::from_config(&config, "node1").unwrap_err();
    let message = err.to_string();
    for part in ["test.yaml", "workloads[0].netns", "default/client", "node1"] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    // Only that one: legacy/db on node1 is TCP, and external/vm is on no node.
    let ConfigError::Invalid { errors, .. } = err else {
        panic!("expected validation errors");
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    // Workloads on other nodes need none.
    State::from_config(&config, "node3").unwrap();
}

#[test]
fn from_config_validates_hand_built_configs() {
    let mut config = Config::from_str_named(BASE, "test.yaml").unwrap();
    config.workloads[1].workload_ips.push(ip("10.0.0.1"));
    let message = State::from_config(&config, "node2").unwrap_err().to_string();
    assert!(message.contains("workloads[1].workloadIps[1]"), "{message}");
}

#[test]
fn diff_of_local_workloads() {
    let old = state(BASE, "node1");
    let new_text = BASE
        // changed: new IP
        .replace("[10.0.0.1, 'fd00::1']", "[10.0.0.1, 'fd00::1', 10.0.0.11]")
        // removed: moved off this node
        .replace("workloadIps: [10.0.0.3], node: node1", "workloadIps: [10.0.0.3], node: node2")
        // added: moved onto this node
        .replace(
            "workloadIps: [10.0.0.2], node: node2",
            "workloadIps: [10.0.0.2], node: node1, netns: /run/netns/server",
        );
    let new = state(&new_text, "node1");
    let diff = State::diff(&old, &new, "node1");
    assert_eq!(uids(&diff.added), ["default/server"]);
    assert_eq!(uids(&diff.removed), ["legacy/db"]);
    assert_eq!(uids(&diff.changed), ["default/client"]);
    assert_eq!(diff.changed[0].ips.len(), 3, "changed carries the new version");

    assert!(State::diff(&old, &old, "node1").is_empty());
    // Deleting a workload outright removes it too.
    let gone = state(
        &BASE.replace("workloadIps: [10.0.0.3], node: node1, protocol: TCP", "workloadIps: [10.0.0.3], protocol: TCP"),
        "node1",
    );
    assert_eq!(uids(&State::diff(&old, &gone, "node1").removed), ["legacy/db"]);
}
