use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

pub(crate) const EXAMPLE: &str = r#"
trustDomain: cluster.local
ca:
  dir: /var/lib/sluice/ca        # root-cert.pem + ca-key.pem (+ optional cert-chain.pem)
  certTtl: 24h
workloads:
  - uid: default/client
    name: client
    namespace: default
    serviceAccount: sleep
    workloadIps: [10.10.1.2]
    node: node1
    protocol: HBONE
    netns: /var/run/netns/pod1
    cgroup: /sys/fs/cgroup/unified/sluice-pods/pod1
policies:
  - name: only-sleep
    namespace: default
    selector: {}
    action: ALLOW
    rules:
      - from: [{ principals: ["cluster.local/ns/default/sa/sleep"], namespaces: [] }]
        to:   [{ ports: [8080] }]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_named(text, "test.yaml")
}

/// Parses and returns the error message, which must name the file.
fn error_of(text: &str) -> String {
    let err = parse(text).expect_err("config should be rejected");
    let message = err.to_string();
    assert!(message.starts_with("test.yaml: "), "{message}");
    message
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} should contain {part:?}");
    }
}

/// The example with one line replaced, to test one rule at a time.
fn example_with(from: &str, to: &str) -> String {
    assert!(EXAMPLE.contains(from), "{from:?} not in example");
    EXAMPLE.replacen(from, to, 1)
}

fn second_workload(fields: &str) -> String {
    let extra = format!(
        "  - uid: default/server\n    name: server\n    namespace: default\n    serviceAccount: httpbin\n    node: node2\n{fields}"
    );
    example_with("policies:", &format!("{extra}policies:"))
}

#[test]
fn example_parses() {
    let config = parse(EXAMPLE).unwrap();
    assert_eq!(config.trust_domain, "cluster.local");
    assert_eq!(config.ca.dir.as_deref(), Some(Path::new("/var/lib/sluice/ca")));
    assert_eq!(config.ca.cert_ttl, Duration::from_secs(86_400));
    let w = &config.workloads[0];
    assert_eq!(w.uid, "default/client");
    assert_eq!(w.service_account, "sleep");
    assert_eq!(w.workload_ips, vec!["10.10.1.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(w.node.as_deref(), Some("node1"));
    let p = &config.policies[0];
    assert_eq!(p.action, Action::Allow);
    assert_eq!(p.selector, Some(Selector::default()));
    assert_eq!(p.rules[0].to[0].ports, vec![8080]);
    assert_eq!(config.origin(), "test.yaml");
}

#[test]
fn defaults_apply() {
    let text = "trustDomain: td\nca: { dir: /ca }\nworkloads:\n  - { uid: u, name: n, namespace: ns, serviceAccount: sa, workloadIps: ['fd00::1', 10.0.0.1] }\n";
    let config = parse(text).unwrap();
    assert_eq!(config.ca.cert_ttl, DEFAULT_CERT_TTL);
    assert_eq!(config.workloads[0].protocol, Protocol::Hbone);
    assert_eq!(config.workloads[0].node, None);
    assert_eq!(config.workloads[0].workload_ips.len(), 2);
    assert!(config.policies.is_empty());
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    let err = Config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert_contains(&err.to_string(), &[&path.display().to_string(), "cannot read"]);

    std::fs::write(&path, EXAMPLE.replace("certTtl: 24h", "certTtl: 24")).unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_contains(&err.to_string(), &[&path.display().to_string(), "ca.certTtl"]);

    std::fs::write(&path, EXAMPLE).unwrap();
    assert_eq!(Config::load(&path).unwrap().origin(), path.display().to_string());
}

#[test]
fn empty_and_non_utf8_files() {
    assert_contains(&error_of(""), &["empty"]);
    assert_contains(&error_of("  \n# only a comment\n"), &["empty"]);
    assert_contains(&error_of("[]"), &["invalid type"]);
    let err = Config::from_bytes_named(b"trustDomain: \xff\n", "test.yaml").unwrap_err();
    assert_contains(&err.to_string(), &["test.yaml", "UTF-8"]);
}

#[test]
fn unknown_field_is_named() {
    let message = error_of(&example_with("    node: node1", "    node: node1\n    nodeName: x"));
    assert_contains(&message, &["workloads[0]", "unknown field `nodeName`", "line 13"]);

    let message = error_of(&example_with("action: ALLOW", "action: ALLOW\n    selectr: {}"));
    assert_contains(&message, &["policies[0]", "unknown field `selectr`"]);
}

#[test]
fn parse_errors_carry_location() {
    let err = parse(&example_with("certTtl: 24h", "certTtl: 24")).unwrap_err();
    let ConfigError::Parse { line, column, message, .. } = &err else {
        panic!("expected a parse error, got {err:?}");
    };
    assert_eq!(*line, Some(5));
    assert!(column.is_some());
    assert_contains(message, &["ca.certTtl", "missing unit"]);
}

#[test]
fn bad_duration() {
    assert_contains(&error_of(&example_with("certTtl: 24h", "certTtl: 1d")), &["ca.certTtl", "unknown unit \"d\""]);
    assert_contains(&error_of(&example_with("certTtl: 24h", "certTtl: 0s")), &["ca.certTtl", "at least 1s"]);
}

#[test]
fn bad_ip() {
    assert_contains(
        &error_of(&example_with("[10.10.1.2]", "[10.10.1.256]")),
        &["workloads[0].workloadIps[0]", "invalid IP address", "line 11"],
    );
    assert_contains(
        &error_of(&example_with("[10.10.1.2]", "[127.0.0.1]")),
        &["workloads[0].workloadIps[0]", "loopback"],
    );
    assert_contains(&error_of(&example_with("[10.10.1.2]", "[]")), &["workloads[0].workloadIps", "at least one"]);
}

#[test]
fn duplicate_ip_names_both_workloads() {
    let message = error_of(&second_workload("    workloadIps: [10.10.1.3, 10.10.1.2]\n"));
    assert_contains(
        &message,
        &["workloads[1].workloadIps[1]", "\"default/server\"", "\"default/client\"", "workloads[0].workloadIps[0]"],
    );
    // The IPv4-mapped spelling of the same address is the same address.
    let message = error_of(&second_workload("    workloadIps: ['::ffff:10.10.1.2']\n"));
    assert_contains(&message, &["workloads[1].workloadIps[0]", "owned by both"]);
    // Twice within one workload.
    let message = error_of(&example_with("[10.10.1.2]", "[10.10.1.2, 10.10.1.2]"));
    assert_contains(&message, &["workloads[0].workloadIps[1]", "listed twice"]);
}

#[test]
fn duplicate_uid() {
    let message = error_of(
        &second_workload("    workloadIps: [10.10.1.3]\n").replace("uid: default/server", "uid: default/client"),
    );
    assert_contains(&message, &["workloads[1].uid", "duplicate uid \"default/client\"", "workloads[0].uid"]);
}

#[test]
fn trust_domain_rules() {
    assert_contains(&error_of(&example_with("cluster.local", "''")), &["trustDomain", "empty"]);
    assert_contains(
        &error_of(&example_with("trustDomain: cluster.local", "trustDomain: Cluster.Local")),
        &["trustDomain", "'C'"],
    );
    assert_contains(
        &error_of(&example_with("trustDomain: cluster.local", "trustDomain: cluster..local")),
        &["trustDomain", "empty label"],
    );
}

#[test]
fn workload_name_rules() {
    assert_contains(
        &error_of(&example_with("namespace: default\n    serviceAccount", "namespace: ''\n    serviceAccount")),
        &["workloads[0].namespace", "must not be empty"],
    );
    assert_contains(
        &error_of(&example_with("serviceAccount: sleep", "serviceAccount: ''")),
        &["workloads[0].serviceAccount", "must not be empty"],
    );
    assert_contains(
        &error_of(&example_with("serviceAccount: sleep", "serviceAccount: Sleep/x")),
        &["workloads[0].serviceAccount", "DNS-1123"],
    );
    assert_contains(
        &error_of(&example_with("uid: default/client", "uid: ''")),
        &["workloads[0].uid", "must not be empty"],
    );
    assert_contains(&error_of(&example_with("node: node1", "node: ''")), &["workloads[0].node", "must not be empty"]);
    assert_contains(
        &error_of(&example_with("netns: /var/run/netns/pod1", "netns: run/pod1")),
        &["workloads[0].netns", "absolute"],
    );
}

#[test]
fn enums_are_checked() {
    assert_contains(
        &error_of(&example_with("protocol: HBONE", "protocol: hbone")),
        &["workloads[0].protocol", "unknown variant `hbone`", "HBONE", "TCP"],
    );
    assert_contains(
        &error_of(&example_with("action: ALLOW", "action: AUDIT")),
        &["policies[0].action", "unknown variant `AUDIT`"],
    );
    assert_contains(&error_of(&example_with("    action: ALLOW\n", "")), &["policies[0]", "missing field `action`"]);
}

#[test]
fn ports_are_checked() {
    assert_contains(
        &error_of(&example_with("ports: [8080]", "ports: [8080, 0]")),
        &["policies[0].rules[0].to[0].ports[1]", "1..=65535"],
    );
    assert_contains(
        &error_of(&example_with("ports: [8080]", "ports: [70000]")),
        &["policies[0].rules[0].to[0].ports[0]", "70000"],
    );
    assert_contains(&error_of(&example_with("ports: [8080]", "ports: [-1]")), &["policies[0].rules[0].to[0].ports[0]"]);
}

#[test]
fn principals_are_checked() {
    let cases = [
        ("sleep", "not of the form"),
        ("spiffe://cluster.local/ns/default/sa/sleep", "spiffe://"),
        ("cluster.local/ns/def*ault/sa/x", "'*'"),
        ("cluster.local/ns/Default/sa/sleep", "namespace"),
    ];
    for (bad, reason) in cases {
        let message = error_of(&example_with("\"cluster.local/ns/default/sa/sleep\"", &format!("{bad:?}")));
        assert_contains(&message, &["policies[0].rules[0].from[0].principals[0]", reason]);
    }
    for good in ["*", "cluster.local/*", "*/sa/sleep", "other.domain/ns/x/sa/y"] {
        parse(&example_with("\"cluster.local/ns/default/sa/sleep\"", &format!("{good:?}")))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    assert_contains(
        &error_of(&example_with("namespaces: []", "namespaces: [a*b]")),
        &["policies[0].rules[0].from[0].namespaces[0]", "'*'"],
    );
}

#[test]
fn policy_names_unique_per_namespace() {
    let dup = "  - name: only-sleep\n    namespace: default\n    action: DENY\n";
    let message = error_of(&format!("{EXAMPLE}{dup}"));
    assert_contains(&message, &["policies[1].name", "duplicate policy \"only-sleep\"", "policies[0].name"]);
    // Same name in another namespace is fine.
    parse(&format!("{EXAMPLE}{}", dup.replace("namespace: default", "namespace: other"))).unwrap();
}

#[test]
fn all_problems_reported_at_once() {
    let text = example_with("serviceAccount: sleep", "serviceAccount: ''").replace("ports: [8080]", "ports: [0]");
    let err = parse(&text).unwrap_err();
    let ConfigError::Invalid { errors, .. } = &err else {
        panic!("expected validation errors, got {err:?}");
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["workloads[0].serviceAccount", "policies[0].rules[0].to[0].ports[0]"]);
}
