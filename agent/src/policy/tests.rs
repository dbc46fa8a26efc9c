use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::matcher::pattern_matches;
use super::*;
use crate::state::{Config, ConfigError};

const WORKLOADS: &str = r#"
trustDomain: cluster.local
ca: { dir: /ca }
workloads:
  - { uid: default/server, name: server, namespace: default, serviceAccount: httpbin,
      workloadIps: [10.0.0.2, 'fd00::2'], node: node2, labels: { app: httpbin, version: v1 } }
  - { uid: default/other, name: other, namespace: default, serviceAccount: other,
      workloadIps: [10.0.0.3], node: node2, labels: { app: other } }
  - { uid: prod/db, name: db, namespace: prod, serviceAccount: db,
      workloadIps: [10.0.0.4], node: node2, labels: { app: db } }
  - { uid: istio-system/gw, name: gw, namespace: istio-system, serviceAccount: gw,
      workloadIps: [10.0.0.5], node: node2, labels: { app: gw } }
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

// ---------------------------------------------------------------------------
// authorize_conn: ztunnel's L4 semantics, table-driven.

/// What a case expects.
#[derive(Debug, Clone, Copy)]
enum Want {
    Allow,
    /// The DENY policy, as `<namespace>/<name>`.
    DenyBy(&'static str),
    DefaultDeny,
}

impl Want {
    fn decision(self) -> Decision {
        match self {
            Want::Allow => Decision::Allow,
            Want::DenyBy(p) => denied_by(p),
            Want::DefaultDeny => default_deny(),
        }
    }
}

/// A peer: `sa@ns` for an mTLS peer of cluster.local, `plain` for plaintext,
/// followed by `from <ip>` to choose its address (10.0.0.1 by default).
fn peer(spec: &str) -> Source {
    let (who, ip) = spec.split_once(" from ").unwrap_or((spec, "10.0.0.1"));
    let ip: IpAddr = ip.parse().unwrap();
    match who.split_once('@') {
        Some((sa, ns)) => Source::authenticated(format!("cluster.local/ns/{ns}/sa/{sa}"), ip),
        None => {
            assert_eq!(who, "plain", "peer spec {spec:?}");
            Source::plaintext(ip)
        }
    }
}

/// One connection: destination uid, peer, address reached, expectation.
type Probe = (&'static str, &'static str, &'static str, Want);

/// Runs every probe against `policies` and reports all mismatches at once.
fn run_table(table: &[(&str, &str, &[Probe])]) {
    let mut failures = Vec::new();
    for (case, policies, probes) in table {
        let (state, _) = setup(policies);
        for (dst, src, addr, want) in *probes {
            let dst_w = state.workload_by_uid(dst).unwrap_or_else(|| panic!("{case}: no workload {dst}"));
            let src = peer(src);
            let dst_addr: SocketAddr = addr.parse().unwrap();
            let got = authorize_conn(&state, &Conn { src: &src, dst: &dst_w, dst_addr });
            if got != want.decision() {
                failures.push(format!("{case}: {src:?} -> {dst} at {addr}: got {got}, want {}", want.decision()));
            }
        }
    }
    assert!(failures.is_empty(), "{} failing probe(s):\n{}", failures.len(), failures.join("\n"));
}

const SRV: &str = "default/server";
const A8080: &str = "10.0.0.2:8080";

#[test]
fn authorize_conn_table() {
    use Want::*;
    let table: &[(&str, &str, &[Probe])] = &[
        (
            "ALLOW by principal",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ principals: [cluster.local/ns/default/sa/sleep] }] }] }\n",
            &[(SRV, "sleep@default", A8080, Allow), (SRV, "curl@default", A8080, DefaultDeny), (SRV, "plain", A8080, DefaultDeny)],
        ),
        (
            "DENY by namespace",
            "  - { name: deny-prod, namespace: default, action: DENY, rules: [{ from: [{ namespaces: [prod] }] }] }\n",
            &[(SRV, "db@prod", A8080, DenyBy("default/deny-prod")), (SRV, "sleep@default", A8080, Allow), (SRV, "plain", A8080, Allow)],
        ),
        (
            "ALLOW notPrincipals: a plaintext peer is not the listed principal",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ notPrincipals: [cluster.local/ns/default/sa/sleep] }] }] }\n",
            &[(SRV, "sleep@default", A8080, DefaultDeny), (SRV, "curl@default", A8080, Allow), (SRV, "plain", A8080, Allow)],
        ),
        (
            "DENY notPrincipals '*' is Istio's require-mTLS idiom",
            "  - { name: mtls, namespace: default, action: DENY, rules: [{ from: [{ notPrincipals: ['*'] }] }] }\n",
            &[(SRV, "plain", A8080, DenyBy("default/mtls")), (SRV, "sleep@default", A8080, Allow)],
        ),
        (
            "DENY notNamespaces",
            "  - { name: outsiders, namespace: default, action: DENY, rules: [{ from: [{ notNamespaces: [default] }] }] }\n",
            &[
                (SRV, "db@prod", A8080, DenyBy("default/outsiders")),
                (SRV, "plain", A8080, DenyBy("default/outsiders")),
                (SRV, "sleep@default", A8080, Allow),
            ],
        ),
        (
            "ALLOW ipBlocks, v4 and v6, CIDR and bare address",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ ipBlocks: [10.0.0.0/30, 'fd00::/64', 192.168.1.7] }] }] }\n",
            &[
                (SRV, "plain from 10.0.0.3", A8080, Allow),
                (SRV, "plain from 10.0.0.4", A8080, DefaultDeny),
                (SRV, "plain from ::ffff:10.0.0.1", A8080, Allow),
                (SRV, "plain from fd00::99", A8080, Allow),
                (SRV, "plain from fd01::1", A8080, DefaultDeny),
                (SRV, "plain from 192.168.1.7", A8080, Allow),
                (SRV, "plain from 192.168.1.8", A8080, DefaultDeny),
            ],
        ),
        (
            "DENY notIpBlocks",
            "  - { name: outside, namespace: default, action: DENY, rules: [{ from: [{ notIpBlocks: [10.0.0.0/8, 'fd00::/8'] }] }] }\n",
            &[
                (SRV, "sleep@default from 192.168.0.1", A8080, DenyBy("default/outside")),
                (SRV, "sleep@default from fe80::1", A8080, DenyBy("default/outside")),
                (SRV, "sleep@default from 10.9.9.9", A8080, Allow),
                (SRV, "sleep@default from fd12::1", A8080, Allow),
            ],
        ),
        (
            "ports and notPorts",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ to: [{ ports: [8080, 9090] }, { notPorts: [1, 2, 8080, 9090, 22] }] }] }\n",
            &[
                (SRV, "sleep@default", A8080, Allow),
                (SRV, "sleep@default", "10.0.0.2:9090", Allow),
                (SRV, "sleep@default", "10.0.0.2:80", Allow),
                (SRV, "sleep@default", "10.0.0.2:22", DefaultDeny),
            ],
        ),
        (
            "DENY on a port",
            "  - { name: no-ssh, namespace: default, action: DENY, rules: [{ to: [{ ports: [22] }] }] }\n",
            &[(SRV, "sleep@default", "10.0.0.2:22", DenyBy("default/no-ssh")), (SRV, "sleep@default", A8080, Allow)],
        ),
        (
            "when source.ip",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: source.ip, values: [10.0.0.0/30], notValues: [10.0.0.2] }] }] }\n",
            &[
                (SRV, "plain from 10.0.0.1", A8080, Allow),
                (SRV, "plain from 10.0.0.2", A8080, DefaultDeny),
                (SRV, "plain from 10.0.0.9", A8080, DefaultDeny),
            ],
        ),
        (
            "when source.namespace",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: source.namespace, values: ['prod*'] }] }] }\n",
            &[(SRV, "db@prod", A8080, Allow), (SRV, "db@production", A8080, Allow), (SRV, "sleep@default", A8080, DefaultDeny), (SRV, "plain", A8080, DefaultDeny)],
        ),
        (
            "when source.principal notValues: absent identity is not listed",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: source.principal, notValues: ['*/sa/curl'] }] }] }\n",
            &[(SRV, "sleep@default", A8080, Allow), (SRV, "curl@default", A8080, DefaultDeny), (SRV, "plain", A8080, Allow)],
        ),
        (
            "when destination.ip: the address the client reached",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: destination.ip, values: [10.0.0.2] }] }] }\n",
            &[(SRV, "sleep@default", A8080, Allow), (SRV, "sleep@default", "[fd00::2]:8080", DefaultDeny)],
        ),
        (
            "when destination.port, numbers or strings",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: destination.port, values: ['8080', 8443] }] }] }\n",
            &[
                (SRV, "sleep@default", A8080, Allow),
                (SRV, "sleep@default", "10.0.0.2:8443", Allow),
                (SRV, "sleep@default", "10.0.0.2:8081", DefaultDeny),
            ],
        ),
        (
            "DENY when destination.port notValues",
            "  - { name: only-web, namespace: default, action: DENY, rules: [{ when: [{ key: destination.port, notValues: ['8080'] }] }] }\n",
            &[(SRV, "sleep@default", A8080, Allow), (SRV, "sleep@default", "10.0.0.2:9", DenyBy("default/only-web"))],
        ),
        (
            "all present clauses of a rule must match",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ principals: ['*/sa/sleep'] }], to: [{ ports: [8080] }], when: [{ key: source.ip, values: [10.0.0.1] }] }] }\n",
            &[
                (SRV, "sleep@default", A8080, Allow),
                (SRV, "sleep@default from 10.0.0.9", A8080, DefaultDeny),
                (SRV, "sleep@default", "10.0.0.2:80", DefaultDeny),
                (SRV, "curl@default", A8080, DefaultDeny),
            ],
        ),
        (
            "within one source every field must match",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ namespaces: [default], ipBlocks: [10.0.0.1], notPrincipals: ['*/sa/curl'] }] }] }\n",
            &[
                (SRV, "sleep@default", A8080, Allow),
                (SRV, "sleep@default from 10.0.0.7", A8080, DefaultDeny),
                (SRV, "curl@default", A8080, DefaultDeny),
                (SRV, "db@prod", A8080, DefaultDeny),
            ],
        ),
        (
            "serviceAccounts: <sa> in the policy's namespace, or <ns>/<sa>",
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ serviceAccounts: [sleep, prod/db] }] }] }\n",
            &[
                (SRV, "sleep@default", A8080, Allow),
                (SRV, "db@prod", A8080, Allow),
                (SRV, "sleep@prod", A8080, DefaultDeny),
                (SRV, "plain", A8080, DefaultDeny),
            ],
        ),
        (
            "selector matchLabels: every label must match",
            "  - { name: web, namespace: default, selector: { matchLabels: { app: httpbin, version: v1 } }, action: DENY, rules: [{}] }\n  - { name: v2, namespace: default, selector: { matchLabels: { app: httpbin, version: v2 } }, action: DENY, rules: [{}] }\n",
            &[(SRV, "sleep@default", A8080, DenyBy("default/web")), ("default/other", "sleep@default", "10.0.0.3:8080", Allow)],
        ),
        (
            "names and matchLabels together",
            "  - { name: both, namespace: default, selector: { names: [other], matchLabels: { app: httpbin } }, action: DENY, rules: [{}] }\n",
            &[(SRV, "sleep@default", A8080, Allow), ("default/other", "sleep@default", "10.0.0.3:8080", Allow)],
        ),
        (
            "root-namespace policy without selector applies mesh-wide",
            "  - { name: no-prod, namespace: istio-system, action: DENY, rules: [{ from: [{ namespaces: [prod] }] }] }\n",
            &[
                (SRV, "db@prod", A8080, DenyBy("istio-system/no-prod")),
                ("prod/db", "db@prod", "10.0.0.4:5432", DenyBy("istio-system/no-prod")),
                ("istio-system/gw", "db@prod", "10.0.0.5:80", DenyBy("istio-system/no-prod")),
                (SRV, "sleep@default", A8080, Allow),
            ],
        ),
        (
            "root-namespace policy with selector selects in every namespace",
            "  - { name: dbs, namespace: istio-system, selector: { matchLabels: { app: db } }, action: ALLOW, rules: [{ from: [{ principals: ['*/sa/sleep'] }] }] }\n",
            &[
                ("prod/db", "sleep@default", "10.0.0.4:5432", Allow),
                ("prod/db", "curl@default", "10.0.0.4:5432", DefaultDeny),
                (SRV, "curl@default", A8080, Allow),
            ],
        ),
        (
            "root-namespace ALLOW makes every workload default-deny",
            "  - { name: sleep-only, namespace: istio-system, action: ALLOW, rules: [{ from: [{ principals: ['*/sa/sleep'] }] }] }\n",
            &[
                (SRV, "curl@default", A8080, DefaultDeny),
                ("prod/db", "curl@default", "10.0.0.4:5432", DefaultDeny),
                ("prod/db", "sleep@default", "10.0.0.4:5432", Allow),
            ],
        ),
        (
            "root and namespace ALLOW policies: either may allow",
            "  - { name: sleep-only, namespace: istio-system, action: ALLOW, rules: [{ from: [{ principals: ['*/sa/sleep'] }] }] }\n  - { name: curl-here, namespace: default, action: ALLOW, rules: [{ from: [{ principals: ['*/sa/curl'] }] }] }\n",
            &[
                (SRV, "curl@default", A8080, Allow),
                (SRV, "sleep@default", A8080, Allow),
                (SRV, "db@prod", A8080, DefaultDeny),
                ("prod/db", "curl@default", "10.0.0.4:5432", DefaultDeny),
            ],
        ),
        (
            "a policy in another namespace does not apply",
            "  - { name: p, namespace: prod, action: DENY, rules: [{}] }\n",
            &[(SRV, "sleep@default", A8080, Allow), ("prod/db", "sleep@default", "10.0.0.4:1", DenyBy("prod/p"))],
        ),
        (
            "DENY before ALLOW",
            "  - { name: all, namespace: default, action: ALLOW, rules: [{}] }\n  - { name: no-sleep, namespace: default, action: DENY, rules: [{ from: [{ principals: ['*/sa/sleep'] }] }] }\n",
            &[(SRV, "sleep@default", A8080, DenyBy("default/no-sleep")), (SRV, "curl@default", A8080, Allow)],
        ),
        (
            "default-deny once an ALLOW applies, only where it applies",
            "  - { name: web, namespace: default, selector: { matchLabels: { app: httpbin } }, action: ALLOW, rules: [{ from: [{ namespaces: [prod] }] }] }\n",
            &[
                (SRV, "sleep@default", A8080, DefaultDeny),
                (SRV, "db@prod", A8080, Allow),
                ("default/other", "sleep@default", "10.0.0.3:8080", Allow),
            ],
        ),
    ];
    run_table(table);
}

#[test]
fn spiffe_prefixed_principals_are_normalized() {
    // From a peer certificate with the prefix.
    let src = Source::authenticated("spiffe://cluster.local/ns/default/sa/sleep", ip());
    assert_eq!(src.principal.as_deref(), Some("cluster.local/ns/default/sa/sleep"));
    assert_eq!(src.namespace.as_deref(), Some("default"));
    // In a policy built in code (the file refuses the prefix, see
    // state::config_tests::principals_are_checked; Kubernetes policies are
    // normalized by the translation).
    let (base, server) = setup(ALLOW_SLEEP_8080);
    let mut policy = (*base.policies_in("default")[0]).clone();
    policy.rules[0].from[0].principals = vec!["spiffe://cluster.local/ns/default/sa/sleep".into()];
    let state = with_policies(&base, vec![policy]);
    let conn = Conn { src: &sleep(), dst: &server, dst_addr: "10.0.0.2:8080".parse().unwrap() };
    assert_eq!(authorize_conn(&state, &conn), Decision::Allow);
    let conn = Conn { src: &from_ns("default", "curl"), ..conn };
    assert_eq!(authorize_conn(&state, &conn), default_deny());
}

/// `base`'s workloads with `policies` instead of its own.
pub(super) fn with_policies(base: &State, policies: Vec<AuthorizationPolicy>) -> State {
    let inventory = crate::state::Inventory {
        workloads: base.workloads().map(|w| (**w).clone()).collect(),
        policies,
        ..Default::default()
    };
    State::from_inventory(base.mesh().clone(), base.node(), inventory)
}

#[test]
fn l7_rules_never_allow_and_deny_on_their_l4_part() {
    let (base, server) = setup("  []\n");
    let allow_l7 = AuthorizationPolicy {
        name: "l7".into(),
        namespace: "default".into(),
        selector: None,
        action: Action::Allow,
        rules: vec![crate::state::Rule { l7: true, ..Default::default() }],
    };
    let state = with_policies(&base, vec![allow_l7.clone()]);
    let at = |src: &Source, state: &State| {
        authorize_conn(state, &Conn { src, dst: &server, dst_addr: "10.0.0.2:8080".parse().unwrap() })
    };
    // An empty rule would allow everything; flagged L7, it allows nothing.
    assert_eq!(at(&sleep(), &state), default_deny());
    // The same rule in a DENY policy is evaluated on what it has (nothing
    // left: it matches everything).
    let deny_l7 = AuthorizationPolicy { name: "deny-l7".into(), action: Action::Deny, ..allow_l7 };
    let state = with_policies(&base, vec![deny_l7]);
    assert_eq!(at(&sleep(), &state), denied_by("default/deny-l7"));
    assert_eq!(at(&Source::plaintext(ip()), &state), denied_by("default/deny-l7"));
}

#[test]
fn legacy_authorize_matches_authorize_conn() {
    let policies = "  - { name: no-sleep, namespace: istio-system, action: DENY, rules: [{ from: [{ principals: ['*/sa/sleep'] }] }] }\n  - { name: web, namespace: default, action: ALLOW, rules: [{ to: [{ ports: [8080] }], when: [{ key: destination.ip, values: [10.0.0.2] }] }] }\n";
    let (state, server) = setup(policies);
    // Bare policy names, for the call sites that still use it.
    assert_eq!(authorize(&state, &server, &sleep(), 8080), denied_by("no-sleep"));
    assert_eq!(authorize(&state, &server, &from_ns("default", "curl"), 8080), Decision::Allow);
    assert_eq!(authorize(&state, &server, &from_ns("default", "curl"), 9090), default_deny());
    let conn = Conn { src: &sleep(), dst: &server, dst_addr: "10.0.0.2:8080".parse().unwrap() };
    assert_eq!(authorize_conn(&state, &conn), denied_by("istio-system/no-sleep"));
    assert_eq!(applicable_policies(&state, &server).count(), 2);
}

// ---------------------------------------------------------------------------
// The config file: new fields, and validation naming the field.

fn load(policies: &str) -> Result<Config, ConfigError> {
    Config::from_str_named(&format!("{WORKLOADS}{policies}"), "test.yaml")
}

fn file_error(policies: &str) -> String {
    let err = load(policies).expect_err("the policy should be rejected");
    err.to_string()
}

#[test]
fn file_accepts_the_new_fields() {
    let policy = r#"
  - name: full
    namespace: default
    selector: { names: [server], matchLabels: { app: httpbin, app.kubernetes.io/part-of: shop } }
    action: DENY
    rules:
      - from:
          - principals: ["*/sa/sleep"]
            notPrincipals: [cluster.local/ns/default/sa/curl]
            namespaces: [default]
            notNamespaces: ["kube-*"]
            ipBlocks: [10.0.0.0/8, "fd00::/8", 192.168.1.1, "::ffff:10.1.0.0/112"]
            notIpBlocks: [10.9.0.0/16]
            serviceAccounts: [sleep, prod/db]
            notServiceAccounts: [default/curl]
        to: [{ ports: [8080], notPorts: [9090] }]
        when:
          - { key: source.ip, values: [10.0.0.1] }
          - { key: source.namespace, notValues: [kube-system] }
          - { key: source.principal, values: ["*/sa/sleep"] }
          - { key: destination.ip, values: ["fd00::2"] }
          - { key: destination.port, values: [8080, "8443"] }
"#;
    let config = load(policy).unwrap();
    let rule = &config.policies[0].rules[0];
    let blocks: Vec<String> = rule.from[0].ip_blocks.iter().map(ToString::to_string).collect();
    assert_eq!(blocks, ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32", "10.1.0.0/16"]);
    assert_eq!(rule.when.len(), 5);
    assert_eq!(rule.when[4], Condition::DestinationPort(Values { values: vec![8080, 8443], not_values: vec![] }));
    assert!(!rule.l7);
    // It survives a round trip through its serialized form.
    let yaml = serde_yaml::to_string(&config.policies).unwrap();
    let back: Vec<AuthorizationPolicy> = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(back, config.policies);
}

#[test]
fn file_errors_name_the_field() {
    let cases = [
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{}, { from: [{ ipBlocks: [10.0.0.0/8, 10.1.0.0/16, 10.0.0.0/33] }] }] }\n",
            &["policies[0].rules[1].from[0].ipBlocks[2]", "prefix length 33", "IPv4"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ notIpBlocks: [not-an-ip] }] }] }\n",
            &["policies[0].rules[0].from[0].notIpBlocks[0]", "not an IP address"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ ipBlocks: ['fd00::/129'] }] }] }\n",
            &["policies[0].rules[0].from[0].ipBlocks[0]", "128", "IPv6"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: 'request.headers[x-user]', values: [a] }] }] }\n",
            &["policies[0].rules[0].when[0]", "request.headers[x-user]", "not enforceable at L4", "source.ip"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: destination.port, values: ['80', http] }] }] }\n",
            &["policies[0].rules[0].when[0]", "values[1]", "\"http\" is not a port number"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: source.ip }] }] }\n",
            &["policies[0].rules[0].when[0]", "values or notValues"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: source.principal, notValues: [sleep] }] }] }\n",
            &["policies[0].rules[0].when[0].notValues[0]", "not of the form"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ when: [{ key: source.namespace, values: [Prod] }] }] }\n",
            &["policies[0].rules[0].when[0].values[0]", "DNS-1123"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ notPrincipals: [x] }] }] }\n",
            &["policies[0].rules[0].from[0].notPrincipals[0]", "not of the form"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ notNamespaces: [a*b] }] }] }\n",
            &["policies[0].rules[0].from[0].notNamespaces[0]", "'*'"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ serviceAccounts: ['default/*'] }] }] }\n",
            &["policies[0].rules[0].from[0].serviceAccounts[0]", "exact names"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ to: [{ notPorts: [0] }] }] }\n",
            &["policies[0].rules[0].to[0].notPorts[0]", "1..=65535"][..],
        ),
        (
            "  - { name: p, namespace: default, selector: { matchLabels: { 'bad key!': x } }, action: ALLOW }\n",
            &["policies[0].selector.matchLabels[\"bad key!\"]", "label key"][..],
        ),
        (
            // The L7 flag is the translation's; a file cannot set it.
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ l7: true }] }\n",
            &["policies[0].rules[0]", "unknown field `l7`"][..],
        ),
        (
            "  - { name: p, namespace: default, action: ALLOW, rules: [{ to: [{ methods: [GET] }] }] }\n",
            &["policies[0].rules[0].to[0]", "unknown field `methods`"][..],
        ),
    ];
    let mut failures = Vec::new();
    for (policy, parts) in cases {
        let message = match load(policy) {
            Ok(_) => {
                failures.push(format!("accepted: {policy}"));
                continue;
            }
            Err(e) => e.to_string(),
        };
        for part in parts {
            if !message.contains(part) {
                failures.push(format!("{message:?} should contain {part:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Several validation problems are reported together.
    let message = file_error(
        "  - { name: p, namespace: default, action: ALLOW, rules: [{ from: [{ notPrincipals: [x], serviceAccounts: ['a/B'] }], to: [{ ports: [0] }] }] }\n",
    );
    for part in ["from[0].notPrincipals[0]", "from[0].serviceAccounts[0]", "to[0].ports[0]"] {
        assert!(message.contains(part), "{message}");
    }
}

#[test]
fn ip_blocks() {
    let block = |s: &str| s.parse::<IpBlock>().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(block("10.1.2.3/8").to_string(), "10.0.0.0/8");
    assert_eq!(block("10.1.2.3").to_string(), "10.1.2.3/32");
    assert_eq!(block("fd00::1").to_string(), "fd00::1/128");
    assert_eq!(block("0.0.0.0/0").to_string(), "0.0.0.0/0");
    assert_eq!(block("::ffff:10.0.0.0/104"), block("10.0.0.0/8"));
    assert!(block("0.0.0.0/0").contains(ip("1.2.3.4")));
    assert!(!block("0.0.0.0/0").contains(ip("fd00::1")));
    assert!(block("::/0").contains(ip("fd00::1")));
    assert!(!block("::/0").contains(ip("1.2.3.4")));
    assert!(block("10.0.0.0/8").contains(ip("::ffff:10.2.3.4")));
    assert!(!block("10.0.0.0/8").contains(ip("11.0.0.0")));
    assert!(block("fd00::/16").contains(ip("fd00:ffff::1")));
    assert!(!block("fd00::/16").contains(ip("fd01::1")));
    for bad in ["", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8/8", "10.0.0/8", "10.0.0.0/ 8", "fd00::/129", "x"] {
        assert!(bad.parse::<IpBlock>().is_err(), "{bad:?} should be rejected");
    }
}

// ---------------------------------------------------------------------------
// PeerAuthentication.

fn with_peer_authns(peer_authns: &str) -> State {
    let text = format!("{WORKLOADS}  []\npeerAuthentications:\n{peer_authns}");
    let config = Config::from_str_named(&text, "test.yaml").unwrap();
    State::from_config(&config, "node1").unwrap()
}

#[test]
fn peer_authentication_precedence() {
    const MESH_STRICT: &str = "  - { name: mesh, namespace: istio-system, mode: STRICT }\n";
    const NS_PERMISSIVE: &str = "  - { name: ns, namespace: default, mode: PERMISSIVE }\n";
    const NS_STRICT: &str = "  - { name: ns, namespace: default, mode: STRICT }\n";
    const NS_UNSET: &str = "  - { name: ns, namespace: default }\n";
    let web = |rest: &str| {
        format!("  - {{ name: web, namespace: default, selector: {{ matchLabels: {{ app: httpbin }} }}, {rest} }}\n")
    };
    let strict = |who: &str| Err::<(), String>(format!("{who} requires mTLS"));
    // (case, policies, destination, port, expected)
    type Case = (&'static str, String, &'static str, u16, Result<(), String>);
    let cases: Vec<Case> = vec![
        ("nothing: PERMISSIVE", String::new(), SRV, 80, Ok(())),
        ("mesh STRICT", MESH_STRICT.into(), SRV, 80, strict("istio-system/mesh")),
        ("mesh STRICT covers other namespaces", MESH_STRICT.into(), "prod/db", 80, strict("istio-system/mesh")),
        (
            "mesh STRICT covers the root namespace",
            MESH_STRICT.into(),
            "istio-system/gw",
            80,
            strict("istio-system/mesh"),
        ),
        ("namespace beats mesh", format!("{MESH_STRICT}{NS_PERMISSIVE}"), SRV, 80, Ok(())),
        ("namespace UNSET inherits", format!("{MESH_STRICT}{NS_UNSET}"), SRV, 80, strict("istio-system/mesh")),
        ("namespace STRICT", NS_STRICT.into(), SRV, 80, strict("default/ns")),
        ("namespace policy stays in its namespace", NS_STRICT.into(), "prod/db", 80, Ok(())),
        ("workload beats namespace", format!("{NS_STRICT}{}", web("mode: PERMISSIVE")), SRV, 80, Ok(())),
        ("workload DISABLE allows plaintext", format!("{NS_STRICT}{}", web("mode: DISABLE")), SRV, 80, Ok(())),
        (
            "unselected workload keeps namespace",
            format!("{NS_STRICT}{}", web("mode: PERMISSIVE")),
            "default/other",
            80,
            strict("default/ns"),
        ),
        ("workload STRICT", format!("{NS_PERMISSIVE}{}", web("mode: STRICT")), SRV, 80, strict("default/web")),
        ("workload UNSET inherits", format!("{NS_STRICT}{}", web("mode: UNSET")), SRV, 80, strict("default/ns")),
        (
            "port override opens one port",
            format!("{MESH_STRICT}{}", web("mode: STRICT, portLevelMtls: { 8080: PERMISSIVE }")),
            SRV,
            8080,
            Ok(()),
        ),
        (
            "other ports keep the workload mode",
            format!("{MESH_STRICT}{}", web("mode: STRICT, portLevelMtls: { 8080: PERMISSIVE }")),
            SRV,
            9090,
            strict("default/web"),
        ),
        (
            "port override closes one port",
            format!("{NS_PERMISSIVE}{}", web("portLevelMtls: { 8080: STRICT }")),
            SRV,
            8080,
            strict("default/web"),
        ),
        (
            "workload UNSET, port not listed: namespace",
            format!("{NS_PERMISSIVE}{}", web("portLevelMtls: { 8080: STRICT }")),
            SRV,
            9090,
            Ok(()),
        ),
        (
            "port UNSET inherits all the way up",
            format!("{MESH_STRICT}{}", web("portLevelMtls: { 8080: UNSET }")),
            SRV,
            8080,
            strict("istio-system/mesh"),
        ),
        (
            "portLevelMtls counts only on a workload policy",
            "  - { name: ns, namespace: default, mode: PERMISSIVE, portLevelMtls: { 8080: STRICT } }\n".into(),
            SRV,
            8080,
            Ok(()),
        ),
        (
            "root-namespace selector policy does not reach other namespaces",
            "  - { name: sel, namespace: istio-system, selector: { matchLabels: { app: httpbin } }, mode: STRICT }\n"
                .into(),
            SRV,
            80,
            Ok(()),
        ),
        (
            "an empty selector is namespace-wide",
            "  - { name: ns, namespace: default, selector: {}, mode: STRICT }\n".into(),
            "default/other",
            80,
            strict("default/ns"),
        ),
    ];
    let mut failures = Vec::new();
    for (case, policies, dst, port, want) in cases {
        let state = with_peer_authns(if policies.is_empty() { "  []\n" } else { &policies });
        let w = state.workload_by_uid(dst).unwrap();
        let got = plaintext_allowed(&state, &w, port);
        if got != want {
            failures.push(format!("{case}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
