use std::net::IpAddr;
use std::sync::Arc;

use super::matcher::pattern_matches;
use super::*;
use crate::state::Config;

const WORKLOADS: &str = r#"
trustDomain: cluster.local
ca: { dir: /ca }
workloads:
  - { uid: default/server, name: server, namespace: default, serviceAccount: httpbin,
      workloadIps: [10.0.0.2], node: node2 }
  - { uid: default/other, name: other, namespace: default, serviceAccount: other,
      workloadIps: [10.0.0.3], node: node2 }
  - { uid: prod/db, name: db, namespace: prod, serviceAccount: db,
      workloadIps: [10.0.0.4], node: node2 }
policies:
"#;

/// State with the given policies (YAML list items) and the server workload.
fn setup(policies: &str) -> (State, Arc<Workload>) {
    let text = format!("{WORKLOADS}{policies}");
    let config = Config::from_str_named(&text, "test.yaml").unwrap();
    let state = State::from_config(&config, "node1").unwrap();
    let server = state.workload_by_uid("default/server").unwrap();
    (state, server)
}

fn ip() -> IpAddr {
    "10.0.0.1".parse().unwrap()
}

fn sleep() -> Source {
    Source::authenticated("cluster.local/ns/default/sa/sleep", ip())
}

fn from_ns(ns: &str, sa: &str) -> Source {
    Source::authenticated(format!("cluster.local/ns/{ns}/sa/{sa}"), ip())
}

fn denied_by(policy: &str) -> Decision {
    Decision::Deny { policy: policy.to_string() }
}

fn default_deny() -> Decision {
    denied_by(DEFAULT_DENY)
}

const ALLOW_SLEEP_8080: &str = r#"
  - name: allow-sleep
    namespace: default
    action: ALLOW
    rules:
      - from: [{ principals: ["cluster.local/ns/default/sa/sleep"] }]
        to: [{ ports: [8080] }]
"#;

#[test]
fn no_policies_allow() {
    let (state, server) = setup("  []\n");
    assert_eq!(authorize(&state, &server, &sleep(), 80), Decision::Allow);
    assert_eq!(authorize(&state, &server, &Source::plaintext(ip()), 80), Decision::Allow);
}

#[test]
fn allow_policy_matches_and_default_denies() {
    let (state, server) = setup(ALLOW_SLEEP_8080);
    assert_eq!(authorize(&state, &server, &sleep(), 8080), Decision::Allow);
    // Wrong port, wrong principal: an ALLOW policy applies, so default-deny.
    assert_eq!(authorize(&state, &server, &sleep(), 9090), default_deny());
    assert_eq!(authorize(&state, &server, &from_ns("default", "curl"), 8080), default_deny());
}

#[test]
fn deny_beats_allow() {
    let deny = r#"
  - name: no-sleep
    namespace: default
    action: DENY
    rules:
      - from: [{ principals: ["cluster.local/ns/default/sa/sleep"] }]
"#;
    let (state, server) = setup(&format!("{ALLOW_SLEEP_8080}{deny}"));
    assert_eq!(authorize(&state, &server, &sleep(), 8080), denied_by("no-sleep"));
}

#[test]
fn deny_only_policy_allows_the_rest() {
    let deny = r#"
  - name: no-admin-port
    namespace: default
    action: DENY
    rules:
      - to: [{ ports: [9000] }]
"#;
    let (state, server) = setup(deny);
    assert_eq!(authorize(&state, &server, &sleep(), 9000), denied_by("no-admin-port"));
    assert_eq!(authorize(&state, &server, &sleep(), 8080), Decision::Allow);
    assert_eq!(authorize(&state, &server, &Source::plaintext(ip()), 8080), Decision::Allow);
}

#[test]
fn allow_without_rules_denies_everything() {
    let (state, server) = setup("  - { name: deny-all, namespace: default, action: ALLOW }\n");
    assert_eq!(authorize(&state, &server, &sleep(), 8080), default_deny());
    // A DENY policy without rules never matches.
    let (state, server) = setup("  - { name: nothing, namespace: default, action: DENY }\n");
    assert_eq!(authorize(&state, &server, &sleep(), 8080), Decision::Allow);
}

#[test]
fn empty_rule_matches_everything() {
    let (state, server) = setup("  - { name: allow-all, namespace: default, action: ALLOW, rules: [{}] }\n");
    assert_eq!(authorize(&state, &server, &sleep(), 1), Decision::Allow);
    assert_eq!(authorize(&state, &server, &Source::plaintext(ip()), 65535), Decision::Allow);
}

#[test]
fn plaintext_client_never_matches_identity_constraints() {
    let plaintext = Source::plaintext(ip());
    let (state, server) = setup(ALLOW_SLEEP_8080);
    assert_eq!(authorize(&state, &server, &plaintext, 8080), default_deny());

    // Even `*`, which means "any authenticated peer".
    let any_principal =
        "  - { name: mtls-only, namespace: default, action: ALLOW, rules: [{ from: [{ principals: ['*'] }] }] }\n";
    let (state, server) = setup(any_principal);
    assert_eq!(authorize(&state, &server, &plaintext, 8080), default_deny());
    assert_eq!(authorize(&state, &server, &sleep(), 8080), Decision::Allow);

    let any_namespace =
        "  - { name: ns, namespace: default, action: ALLOW, rules: [{ from: [{ namespaces: ['*'] }] }] }\n";
    let (state, server) = setup(any_namespace);
    assert_eq!(authorize(&state, &server, &plaintext, 8080), default_deny());

    // So a DENY on principals does not catch plaintext clients either.
    let deny_any =
        "  - { name: deny-mtls, namespace: default, action: DENY, rules: [{ from: [{ principals: ['*'] }] }] }\n";
    let (state, server) = setup(deny_any);
    assert_eq!(authorize(&state, &server, &plaintext, 8080), Decision::Allow);
    assert_eq!(authorize(&state, &server, &sleep(), 8080), denied_by("deny-mtls"));

    // A source clause with empty lists places no constraint at all.
    let open = "  - { name: open, namespace: default, action: ALLOW, rules: [{ from: [{ principals: [], namespaces: [] }] }] }\n";
    let (state, server) = setup(open);
    assert_eq!(authorize(&state, &server, &plaintext, 8080), Decision::Allow);
}

#[test]
fn wildcard_principals() {
    let cases = [
        ("cluster.local/ns/default/sa/sleep", true),
        ("*", true),
        ("cluster.local/ns/default/*", true),
        ("cluster.local/ns/prod/*", false),
        ("*/sa/sleep", true),
        ("*/sa/curl", false),
        ("cluster.local/ns/default/sa/sle", false),
    ];
    for (pattern, allowed) in cases {
        let policy = format!(
            "  - {{ name: p, namespace: default, action: ALLOW, rules: [{{ from: [{{ principals: ['{pattern}'] }}] }}] }}\n"
        );
        let (state, server) = setup(&policy);
        let decision = authorize(&state, &server, &sleep(), 8080);
        assert_eq!(decision.is_allow(), allowed, "{pattern}: {decision}");
    }
}

#[test]
fn pattern_forms() {
    assert!(pattern_matches("*", "x"));
    assert!(!pattern_matches("*", ""));
    assert!(pattern_matches("ab*", "abc"));
    assert!(pattern_matches("ab*", "ab"));
    assert!(!pattern_matches("ab*", "xab"));
    assert!(pattern_matches("*bc", "abc"));
    assert!(!pattern_matches("*bc", "bcx"));
    assert!(pattern_matches("abc", "abc"));
    assert!(!pattern_matches("abc", "abcd"));
}

#[test]
fn namespaces_and_sources() {
    // Within one source both fields must match; across sources any may.
    let policy = r#"
  - name: p
    namespace: default
    action: ALLOW
    rules:
      - from:
          - { principals: ["*/sa/sleep"], namespaces: ["default"] }
          - { namespaces: ["prod*"] }
"#;
    let (state, server) = setup(policy);
    assert!(authorize(&state, &server, &from_ns("default", "sleep"), 1).is_allow());
    assert!(!authorize(&state, &server, &from_ns("staging", "sleep"), 1).is_allow());
    assert!(!authorize(&state, &server, &from_ns("default", "curl"), 1).is_allow());
    assert!(authorize(&state, &server, &from_ns("prod-eu", "anything"), 1).is_allow());
}

#[test]
fn from_and_to_must_both_match() {
    let (state, server) = setup(ALLOW_SLEEP_8080);
    assert!(authorize(&state, &server, &sleep(), 8080).is_allow());
    assert!(!authorize(&state, &server, &sleep(), 8081).is_allow());
    // Any listed operation may match; empty ports means any port.
    let policy =
        "  - { name: p, namespace: default, action: ALLOW, rules: [{ to: [{ ports: [1] }, { ports: [2, 3] }] }] }\n";
    let (state, server) = setup(policy);
    assert!(authorize(&state, &server, &sleep(), 3).is_allow());
    assert!(!authorize(&state, &server, &sleep(), 4).is_allow());
    let policy = "  - { name: p, namespace: default, action: ALLOW, rules: [{ to: [{ ports: [] }] }] }\n";
    let (state, server) = setup(policy);
    assert!(authorize(&state, &server, &sleep(), 4).is_allow());
}

#[test]
fn other_namespace_policy_does_not_apply() {
    let policy = "  - { name: prod-only, namespace: prod, action: ALLOW, rules: [{ from: [{ namespaces: [prod] }] }] }\n  - { name: prod-deny, namespace: prod, action: DENY, rules: [{}] }\n";
    let (state, server) = setup(policy);
    assert_eq!(authorize(&state, &server, &sleep(), 8080), Decision::Allow);
    let db = state.workload_by_uid("prod/db").unwrap();
    assert_eq!(authorize(&state, &db, &sleep(), 8080), denied_by("prod-deny"));
}

#[test]
fn selector_narrows_by_name() {
    let policy = "  - { name: server-only, namespace: default, selector: { names: [server] }, action: ALLOW }\n";
    let (state, server) = setup(policy);
    assert_eq!(authorize(&state, &server, &sleep(), 8080), default_deny());
    let other = state.workload_by_uid("default/other").unwrap();
    assert_eq!(authorize(&state, &other, &sleep(), 8080), Decision::Allow);
}

#[test]
fn authenticated_source_takes_namespace_from_principal() {
    let src = Source::authenticated("cluster.local/ns/prod/sa/db", ip());
    assert_eq!(src.namespace.as_deref(), Some("prod"));
    assert_eq!(Source::authenticated("weird", ip()).namespace, None);
    assert_eq!(default_deny().to_string(), format!("deny ({DEFAULT_DENY})"));
}
