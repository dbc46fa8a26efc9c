//! The Kubernetes translation: what it keeps, drops and refuses, and how the
//! result evaluates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use super::tests::with_policies;
use super::*;
use crate::state::{Config, Rule, RuleSource, Selector};

const WORKLOADS: &str = r#"
trustDomain: cluster.local
ca: { dir: /ca }
workloads:
  - { uid: default/server, name: server, namespace: default, serviceAccount: httpbin,
      workloadIps: [10.0.0.2], node: node2, labels: { app: httpbin } }
  - { uid: prod/db, name: db, namespace: prod, serviceAccount: db,
      workloadIps: [10.0.0.4], node: node2, labels: { app: db } }
"#;

fn translate(namespace: &str, spec: Value) -> Translated<AuthorizationPolicy> {
    authorization_policy_from_istio(namespace, "p", &spec).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

/// The translated policy; it must not be skipped.
fn policy(namespace: &str, spec: Value) -> (AuthorizationPolicy, Vec<String>) {
    let t = translate(namespace, spec.clone());
    (t.value.unwrap_or_else(|| panic!("{spec} was skipped: {:?}", t.warnings)), t.warnings)
}

fn state_with(policies: Vec<AuthorizationPolicy>) -> State {
    let config = Config::from_str_named(WORKLOADS, "test.yaml").unwrap();
    let base = State::from_config(&config, "node1").unwrap();
    with_policies(&base, policies)
}

fn sleep() -> Source {
    Source::authenticated("cluster.local/ns/default/sa/sleep", "10.0.0.1".parse().unwrap())
}

fn curl() -> Source {
    Source::authenticated("cluster.local/ns/default/sa/curl", "10.0.0.1".parse().unwrap())
}

fn plain() -> Source {
    Source::plaintext("10.0.0.1".parse().unwrap())
}

/// Decision for `src` reaching `addr` on `uid`.
fn decide(state: &State, uid: &str, src: &Source, addr: &str) -> Decision {
    let dst = state.workload_by_uid(uid).unwrap();
    let dst_addr: SocketAddr = addr.parse().unwrap();
    authorize_conn(state, &Conn { src, dst: &dst, dst_addr })
}

fn deny(p: &str) -> Decision {
    Decision::Deny { policy: p.to_string() }
}

fn default_deny() -> Decision {
    deny(DEFAULT_DENY)
}

fn assert_warned(warnings: &[String], parts: &[&str]) {
    assert!(
        warnings.iter().any(|w| parts.iter().all(|p| w.contains(p))),
        "no warning with all of {parts:?} in {warnings:#?}"
    );
}

#[test]
fn translates_the_l4_fields() {
    let (p, warnings) = policy(
        "default",
        json!({
            "selector": { "matchLabels": { "app": "httpbin" } },
            "rules": [{
                "from": [{ "source": {
                    "principals": ["spiffe://cluster.local/ns/default/sa/sleep", "cluster.local/ns/prod/*"],
                    "notPrincipals": ["spiffe://cluster.local/ns/default/sa/curl"],
                    "namespaces": ["default"], "notNamespaces": ["kube-*"],
                    "ipBlocks": ["10.0.0.0/8", "fd00::1"], "notIpBlocks": ["10.9.0.0/16"],
                    "serviceAccounts": ["sleep", "prod/db"], "notServiceAccounts": ["curl"]
                }}],
                "to": [{ "operation": { "ports": ["8080", 8443], "notPorts": ["9090"] } }],
                "when": [
                    { "key": "source.principal", "values": ["spiffe://cluster.local/ns/default/sa/sleep"] },
                    { "key": "destination.port", "notValues": ["22"] }
                ]
            }]
        }),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(p.action, Action::Allow, "ALLOW is Istio's default");
    assert_eq!(
        p.selector,
        Some(Selector { names: vec![], match_labels: BTreeMap::from([("app".into(), "httpbin".into())]) })
    );
    let rule = &p.rules[0];
    assert!(!rule.l7);
    let src = &rule.from[0];
    assert_eq!(src.principals, ["cluster.local/ns/default/sa/sleep", "cluster.local/ns/prod/*"]);
    assert_eq!(src.not_principals, ["cluster.local/ns/default/sa/curl"]);
    assert_eq!(src.namespaces, ["default"]);
    assert_eq!(src.not_namespaces, ["kube-*"]);
    assert_eq!(src.ip_blocks.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.0/8", "fd00::1/128"]);
    assert_eq!(src.not_ip_blocks.len(), 1);
    assert_eq!(src.service_accounts, ["default/sleep", "prod/db"]);
    assert_eq!(src.not_service_accounts, ["default/curl"]);
    assert_eq!(rule.to[0].ports, [8080, 8443]);
    assert_eq!(rule.to[0].not_ports, [9090]);
    assert_eq!(
        rule.when,
        [
            Condition::SourcePrincipal(Values {
                values: vec!["cluster.local/ns/default/sa/sleep".into()],
                not_values: vec![]
            }),
            Condition::DestinationPort(Values { values: vec![], not_values: vec![22] }),
        ]
    );

    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:8080"), Decision::Allow);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:9090"), default_deny());
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:8080"), default_deny());
    // The selector does not pick the db.
    assert_eq!(decide(&state, "prod/db", &curl(), "10.0.0.4:8080"), Decision::Allow);
}

#[test]
fn empty_spec_is_allow_nothing() {
    for spec in [json!({}), Value::Null, json!({ "rules": [] })] {
        let (p, _) = policy("default", spec);
        let state = state_with(vec![p]);
        assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), default_deny());
    }
    // And `rules: [{}]` is allow-all.
    let (p, _) = policy("default", json!({ "rules": [{}] }));
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &plain(), "10.0.0.2:80"), Decision::Allow);
}

#[test]
fn root_namespace_scope() {
    let deny_prod = json!({ "action": "DENY", "rules": [{ "from": [{ "source": { "namespaces": ["prod"] } }] }] });
    let (p, _) = policy("istio-system", deny_prod);
    let state = state_with(vec![p]);
    let db = Source::authenticated("cluster.local/ns/prod/sa/db", "10.0.0.4".parse().unwrap());
    assert_eq!(decide(&state, "default/server", &db, "10.0.0.2:80"), deny("istio-system/p"));
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), Decision::Allow);

    let only_db = json!({ "selector": { "matchLabels": { "app": "db" } }, "rules": [{ "from": [{ "source": { "principals": ["*/sa/sleep"] } }] }] });
    let (p, _) = policy("istio-system", only_db);
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "prod/db", &sleep(), "10.0.0.4:5432"), Decision::Allow);
    assert_eq!(decide(&state, "prod/db", &curl(), "10.0.0.4:5432"), default_deny());
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:80"), Decision::Allow);
}

#[test]
fn custom_audit_and_target_refs_are_skipped_with_a_warning() {
    let cases = [
        (json!({ "action": "CUSTOM", "provider": { "name": "ext-authz" }, "rules": [{}] }), "CUSTOM"),
        (json!({ "action": "AUDIT", "rules": [{}] }), "AUDIT"),
        (
            json!({ "targetRef": { "kind": "Gateway", "name": "waypoint" }, "action": "DENY", "rules": [{}] }),
            "spec.targetRef",
        ),
        (json!({ "targetRefs": [{ "kind": "Service", "name": "httpbin" }], "rules": [{}] }), "spec.targetRefs"),
    ];
    for (spec, mention) in cases {
        let t = translate("default", spec.clone());
        assert_eq!(t.value, None, "{spec}");
        assert_warned(&t.warnings, &[mention]);
    }
    // An empty targetRefs is no binding.
    assert!(translate("default", json!({ "targetRefs": [], "rules": [{}] })).value.is_some());
}

#[test]
fn l7_allow_rules_never_match() {
    let (p, warnings) = policy(
        "default",
        json!({ "rules": [
            { "from": [{ "source": { "principals": ["*/sa/sleep"] } }], "to": [{ "operation": { "methods": ["GET"] } }] },
            { "from": [{ "source": { "principals": ["*/sa/curl"] } }] }
        ]}),
    );
    assert!(p.rules[0].l7);
    assert!(!p.rules[1].l7);
    assert_warned(&warnings, &["spec.rules[0]", "spec.rules[0].to[0].operation.methods", "never matches"]);
    let state = state_with(vec![p]);
    // Sleep would match rule 0 on principal; the HTTP part makes it fail safe.
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), default_deny());
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:80"), Decision::Allow);

    // Every HTTP attribute, and non-L4 `when` keys, do the same.
    let l7_rules = [
        json!({ "to": [{ "operation": { "paths": ["/x"] } }] }),
        json!({ "to": [{ "operation": { "notPaths": ["/x"] } }] }),
        json!({ "to": [{ "operation": { "hosts": ["a.example"] } }] }),
        json!({ "to": [{ "operation": { "notHosts": ["a.example"] } }] }),
        json!({ "to": [{ "operation": { "notMethods": ["GET"] } }] }),
        json!({ "from": [{ "source": { "requestPrincipals": ["*"] } }] }),
        json!({ "from": [{ "source": { "notRequestPrincipals": ["*"] } }] }),
        json!({ "from": [{ "source": { "remoteIpBlocks": ["10.0.0.0/8"] } }] }),
        json!({ "from": [{ "source": { "notRemoteIpBlocks": ["10.0.0.0/8"] } }] }),
        json!({ "when": [{ "key": "request.headers[x-user]", "values": ["a"] }] }),
        json!({ "when": [{ "key": "request.auth.claims[iss]", "values": ["a"] }] }),
        json!({ "when": [{ "key": "connection.sni", "values": ["a"] }] }),
        json!({ "from": [{ "source": { "principals": ["*"], "someFutureField": ["x"] } }] }),
    ];
    for rule in l7_rules {
        let (p, warnings) = policy("default", json!({ "rules": [rule.clone()] }));
        assert!(p.rules[0].l7, "{rule}");
        assert_warned(&warnings, &["spec.rules[0]", "not enforceable at L4", "never matches"]);
        let state = state_with(vec![p]);
        assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), default_deny(), "{rule}");
    }
}

#[test]
fn deny_with_l7_parts_matches_on_its_l4_part() {
    // Sleep on any method: denied on every port, curl untouched.
    let (p, warnings) = policy(
        "default",
        json!({ "action": "DENY", "rules": [{
            "from": [{ "source": { "principals": ["*/sa/sleep"], "requestPrincipals": ["*"] } }],
            "to": [{ "operation": { "methods": ["POST"], "ports": ["8080"] } }],
            "when": [{ "key": "request.headers[x]", "values": ["y"] }, { "key": "source.ip", "values": ["10.0.0.0/24"] }]
        }]}),
    );
    assert_warned(&warnings, &["spec.rules[0]", "L4 part alone", "denies more than written"]);
    let rule = &p.rules[0];
    assert!(rule.l7);
    assert_eq!(rule.from, [RuleSource { principals: vec!["*/sa/sleep".into()], ..Default::default() }]);
    assert_eq!(rule.to[0].ports, [8080]);
    assert_eq!(rule.when.len(), 1, "the HTTP condition is dropped, the L4 one kept");
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:8080"), deny("default/p"));
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:9090"), Decision::Allow);
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:8080"), Decision::Allow);

    // Only HTTP constraints: the DENY covers every connection in its scope
    // (ztunnel would let it match nothing; see the istio module docs).
    let (p, _) = policy(
        "default",
        json!({ "action": "DENY", "selector": { "matchLabels": { "app": "httpbin" } },
                "rules": [{ "from": [{ "source": { "notRequestPrincipals": ["*"] } }] }] }),
    );
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), deny("default/p"));
    assert_eq!(decide(&state, "default/server", &plain(), "10.0.0.2:80"), deny("default/p"));
    assert_eq!(decide(&state, "prod/db", &sleep(), "10.0.0.4:80"), Decision::Allow);

    // One HTTP-only source among others: that source matches any peer.
    let (p, _) = policy(
        "default",
        json!({ "action": "DENY", "rules": [{ "from": [
            { "source": { "principals": ["*/sa/sleep"] } },
            { "source": { "requestPrincipals": ["issuer/*"] } }
        ]}]}),
    );
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:80"), deny("default/p"));
}

#[test]
fn unreadable_fields_fail_closed() {
    // ALLOW: the rule concerned never matches, the others still do.
    let (p, warnings) = policy(
        "default",
        json!({ "rules": [
            { "to": [{ "operation": { "ports": ["8080", "http"] } }] },
            { "from": [{ "source": { "principals": ["*/sa/curl"] } }] }
        ]}),
    );
    assert_warned(
        &warnings,
        &["spec.rules[0].to[0].operation.ports[1]", "\"http\" is not a port number", "never matches"],
    );
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:8080"), default_deny());
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:8080"), Decision::Allow);

    // DENY: the unreadable constraint is dropped, so it denies more.
    let (p, warnings) = policy(
        "default",
        json!({ "action": "DENY", "rules": [{
            "from": [{ "source": { "principals": ["*/sa/sleep"] } }],
            "to": [{ "operation": { "ports": ["http"] } }]
        }]}),
    );
    assert_warned(&warnings, &["spec.rules[0].to[0].operation.ports[0]", "fail closed", "denies more than written"]);
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:1"), deny("default/p"));
    assert_eq!(decide(&state, "default/server", &curl(), "10.0.0.2:1"), Decision::Allow);

    // A bad CIDR in a DENY source drops that field only.
    let (p, warnings) = policy(
        "default",
        json!({ "action": "DENY", "rules": [{ "from": [{ "source": {
            "namespaces": ["default"], "ipBlocks": ["10.0.0.0/8", "10.0.0.0/33"]
        }}]}]}),
    );
    assert_warned(&warnings, &["spec.rules[0].from[0].source.ipBlocks[1]", "prefix length 33"]);
    let state = state_with(vec![p]);
    let far = Source::authenticated("cluster.local/ns/default/sa/sleep", "192.168.0.1".parse().unwrap());
    assert_eq!(decide(&state, "default/server", &far, "10.0.0.2:80"), deny("default/p"));
    let db = Source::authenticated("cluster.local/ns/prod/sa/db", "10.0.0.4".parse().unwrap());
    assert_eq!(decide(&state, "default/server", &db, "10.0.0.2:80"), Decision::Allow);
}

#[test]
fn malformed_inputs_are_reported_by_field() {
    // (spec, for an ALLOW: the words the warning must contain)
    let rule_problems = [
        (
            json!({ "rules": [{ "to": [{ "operation": { "ports": ["0"] } }] }] }),
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            json!({ "rules": [{ "to": [{ "operation": { "ports": [true] } }] }] }),
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (json!({ "rules": [{ "to": [{ "operation": { "ports": "8080" } }] }] }), "spec.rules[0].to[0].operation.ports"),
        (
            json!({ "rules": [{ "from": [{ "source": { "principals": "sleep" } }] }] }),
            "spec.rules[0].from[0].source.principals",
        ),
        (
            json!({ "rules": [{ "from": [{ "source": { "namespaces": [1] } }] }] }),
            "spec.rules[0].from[0].source.namespaces[0]",
        ),
        (
            json!({ "rules": [{ "from": [{ "source": { "notIpBlocks": ["nope"] } }] }] }),
            "spec.rules[0].from[0].source.notIpBlocks[0]",
        ),
        (json!({ "rules": [{ "from": [{ "source": {} }] }] }), "spec.rules[0].from[0].source: empty"),
        (json!({ "rules": [{ "from": [{}] }] }), "spec.rules[0].from[0].source: missing"),
        (json!({ "rules": [{ "from": ["x"] }] }), "spec.rules[0].from[0]"),
        (json!({ "rules": [{ "from": { "source": {} } }] }), "spec.rules[0].from: expected a list"),
        (json!({ "rules": [{ "to": [{ "operation": {} }] }] }), "spec.rules[0].to[0].operation: empty"),
        (json!({ "rules": [{ "when": [{ "key": "source.ip" }] }] }), "spec.rules[0].when[0]: a condition needs values"),
        (
            json!({ "rules": [{ "when": [{ "key": "destination.port", "values": ["x"] }] }] }),
            "spec.rules[0].when[0].values[0]",
        ),
        (json!({ "rules": [{ "when": [{ "key": 3, "values": ["x"] }] }] }), "spec.rules[0].when[0].key"),
        (
            json!({ "rules": [{ "when": [{ "key": "source.ip", "notValues": "10.0.0.1" }] }] }),
            "spec.rules[0].when[0].notValues",
        ),
        (json!({ "rules": ["x"] }), "spec.rules[0]: expected an object"),
        (json!({ "rules": "x" }), "spec.rules: expected a list"),
    ];
    for (spec, path) in rule_problems {
        let (p, warnings) = policy("default", spec.clone());
        assert_warned(&warnings, &[path]);
        let state = state_with(vec![p.clone()]);
        // Whatever is left never allows: the workload stays default-deny.
        assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:8080"), default_deny(), "{spec}");
        // The same problem in a DENY denies (fail closed).
        let mut spec = spec;
        spec["action"] = json!("DENY");
        let (p, warnings) = policy("default", spec.clone());
        assert_warned(&warnings, &[path]);
        let state = state_with(vec![p]);
        assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:8080"), deny("default/p"), "{spec}");
    }

    // No safe reading: errors naming the field.
    let errors = [
        (json!("x"), "spec: expected an object"),
        (json!({ "action": 1 }), "spec.action: expected a string"),
        (json!({ "action": "allow" }), "spec.action: unknown action \"allow\""),
        (json!({ "selector": { "matchLabels": ["app"] } }), "spec.selector.matchLabels: expected a map"),
        (json!({ "selector": { "matchLabels": { "app": 1 } } }), "spec.selector.matchLabels[\"app\"]"),
        (json!({ "selector": "app=x" }), "spec.selector: expected an object"),
        (json!({ "selector": { "matchExpressions": [] } }), "spec.selector.matchExpressions"),
    ];
    for (spec, message) in errors {
        let err = authorization_policy_from_istio("default", "p", &spec).expect_err(&spec.to_string());
        assert!(err.contains(message), "{err:?} should contain {message:?}");
    }
    assert!(authorization_policy_from_istio("Default", "p", &json!({})).unwrap_err().contains("metadata.namespace"));
    assert!(authorization_policy_from_istio("default", "", &json!({})).unwrap_err().contains("metadata.name"));

    // A DENY whose selector cannot be read applies to its whole scope.
    let (p, warnings) =
        policy("default", json!({ "action": "DENY", "selector": { "matchLabels": ["app"] }, "rules": [{}] }));
    assert_eq!(p.selector, None);
    assert_warned(&warnings, &["spec.selector.matchLabels", "every workload in its scope"]);

    // Unknown top-level fields are ignored, with a warning.
    let (_, warnings) = policy("default", json!({ "rules": [{}], "bogus": 1 }));
    assert_warned(&warnings, &["spec.bogus", "ignored"]);
}

#[test]
fn deny_without_rules_never_matches_and_plaintext_semantics_hold() {
    let (p, _) = policy("default", json!({ "action": "DENY" }));
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), Decision::Allow);

    // Istio's require-mTLS idiom, from Kubernetes.
    let (p, _) = policy(
        "default",
        json!({ "action": "DENY", "rules": [{ "from": [{ "source": { "notPrincipals": ["*"] } }] }] }),
    );
    let state = state_with(vec![p]);
    assert_eq!(decide(&state, "default/server", &plain(), "10.0.0.2:80"), deny("default/p"));
    assert_eq!(decide(&state, "default/server", &sleep(), "10.0.0.2:80"), Decision::Allow);
}

#[test]
fn translated_rules_keep_the_l7_flag_out_of_the_file_form() {
    let (p, _) = policy("default", json!({ "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] }));
    // The HTTP-only operation is read as "any port" (what a DENY needs); the
    // flag makes the ALLOW rule fail.
    assert_eq!(p.rules, [Rule { to: vec![Default::default()], l7: true, ..Default::default() }]);
    // Visible when dumped, but a file cannot set it back (unknown field).
    let yaml = serde_yaml::to_string(&p).unwrap();
    assert!(yaml.contains("l7: true"), "{yaml}");
    assert!(serde_yaml::from_str::<AuthorizationPolicy>(&yaml).is_err());
}

#[test]
fn peer_authentication_translation() {
    let pa = peer_authentication_from_istio(
        "default",
        "web",
        &json!({
            "selector": { "matchLabels": { "app": "httpbin" } },
            "mtls": { "mode": "STRICT" },
            "portLevelMtls": { "8080": { "mode": "PERMISSIVE" }, "9090": { "mode": "DISABLE" }, "22": {} }
        }),
    )
    .unwrap();
    assert_eq!(pa.mode, MtlsMode::Strict);
    assert!(pa.is_workload_level());
    assert_eq!(
        pa.port_level_mtls,
        BTreeMap::from([(22, MtlsMode::Unset), (8080, MtlsMode::Permissive), (9090, MtlsMode::Disable)])
    );
    let ns = peer_authentication_from_istio("default", "ns", &json!({})).unwrap();
    assert_eq!(ns.mode, MtlsMode::Unset);
    assert!(!ns.is_workload_level());
    let empty_selector = peer_authentication_from_istio("default", "ns", &json!({ "selector": {} })).unwrap();
    assert!(!empty_selector.is_workload_level());

    let errors = [
        (json!({ "mtls": { "mode": "STRICTER" } }), "spec.mtls.mode: unknown mode \"STRICTER\""),
        (json!({ "mtls": "STRICT" }), "spec.mtls: expected an object"),
        (json!({ "mtls": { "mode": 2 } }), "spec.mtls.mode: expected a string"),
        (json!({ "portLevelMtls": { "http": { "mode": "STRICT" } } }), "spec.portLevelMtls[\"http\"]"),
        (json!({ "portLevelMtls": { "70000": { "mode": "STRICT" } } }), "spec.portLevelMtls[\"70000\"]"),
        (json!({ "portLevelMtls": { "80": { "mode": "LOOSE" } } }), "spec.portLevelMtls[\"80\"].mode"),
        (json!({ "portLevelMtls": [80] }), "spec.portLevelMtls: expected a map"),
        (json!({ "selector": { "matchLabels": "app" } }), "spec.selector.matchLabels"),
        (json!(7), "spec: expected an object"),
    ];
    for (spec, message) in errors {
        let err = peer_authentication_from_istio("default", "p", &spec).expect_err(&spec.to_string());
        assert!(err.contains(message), "{err:?} should contain {message:?}");
    }

    // And it evaluates: STRICT namespace-wide, one port opened by the
    // workload policy.
    let config = Config::from_str_named(WORKLOADS, "test.yaml").unwrap();
    let base = State::from_config(&config, "node1").unwrap();
    let strict_ns = peer_authentication_from_istio("default", "ns", &json!({ "mtls": { "mode": "STRICT" } })).unwrap();
    let open_8080 = peer_authentication_from_istio(
        "default",
        "web",
        &json!({ "selector": { "matchLabels": { "app": "httpbin" } }, "portLevelMtls": { "8080": { "mode": "PERMISSIVE" } } }),
    )
    .unwrap();
    let inventory = crate::state::Inventory {
        workloads: base.workloads().map(|w| (**w).clone()).collect(),
        peer_authentications: vec![strict_ns, open_8080],
        ..Default::default()
    };
    let state = State::from_inventory(base.mesh().clone(), "node1", inventory);
    let server = state.workload_by_uid("default/server").unwrap();
    assert_eq!(plaintext_allowed(&state, &server, 8080), Ok(()));
    assert_eq!(plaintext_allowed(&state, &server, 80), Err("default/ns requires mTLS".to_string()));
    let db = state.workload_by_uid("prod/db").unwrap();
    assert_eq!(plaintext_allowed(&state, &db, 80), Ok(()));
}

#[test]
fn source_ip_is_compared_canonically() {
    let (p, _) = policy("default", json!({ "rules": [{ "from": [{ "source": { "ipBlocks": ["10.0.0.0/24"] } }] }] }));
    let state = state_with(vec![p]);
    let mapped = Source::plaintext("::ffff:10.0.0.7".parse::<IpAddr>().unwrap());
    assert_eq!(decide(&state, "default/server", &mapped, "10.0.0.2:80"), Decision::Allow);
    let v6 = Source::plaintext("fd00::7".parse::<IpAddr>().unwrap());
    assert_eq!(decide(&state, "default/server", &v6, "10.0.0.2:80"), default_deny());
}
