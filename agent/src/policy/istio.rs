//! Translation of Kubernetes `security.istio.io/v1` AuthorizationPolicy and
//! PeerAuthentication objects (their `spec`, as JSON) into the model in
//! `crate::state`, as istiod does for ztunnel. Pure functions: the caller
//! (the Kubernetes source) watches the objects, logs the warnings once per
//! object version, and adds the object's name to messages; every message
//! here names the field, as `spec.rules[0].to[1].operation.ports[2]`.
//!
//! # What L4 cannot enforce, and what cannot be read
//!
//! Removing or narrowing a DENY widens access; removing an ALLOW can widen it
//! too (a workload whose only ALLOW policy disappears goes from default-deny
//! to allow-all), while making an ALLOW *rule* match less only narrows it.
//! Hence, whether the cause is an HTTP attribute (`methods`, `paths`,
//! `hosts`, `requestPrincipals`, `remoteIpBlocks`, a `when` key such as
//! `request.headers[...]`, their `not*` forms), an unknown field, or a value
//! that cannot be parsed (`ports: ["http"]`, a bad CIDR, a wrong JSON type):
//!
//! - in an ALLOW policy, the rule concerned never matches (the policy stays,
//!   so the default-deny it causes stays too); the rule is marked
//!   [`Rule::l7`](crate::state::Rule);
//! - in a DENY policy, the rule is enforced on what could be read at L4: a
//!   constraint (a field of a source or operation, a `when` condition) that
//!   cannot be enforced is dropped, and an unreadable entry of `from` or `to`
//!   becomes one that matches any peer or port. The DENY therefore matches
//!   more than written, never less (fail closed). A DENY rule whose only
//!   constraints were HTTP ones thus denies every connection its scope
//!   selects. That is what istiod's status message promises ("enforced
//!   without the HTTP rules ... more restrictive") and what Istio documents
//!   for DENY policies on TCP traffic through sidecars; ztunnel itself lets such a rule match nothing (istiod sends
//!   it an empty match, istio/istio#61126), which we do not copy;
//! - a DENY policy whose `selector` cannot be read applies to its whole
//!   scope; an ALLOW policy whose `selector` cannot be read is an error
//!   (neither keeping nor dropping it is safe; the API server's schema makes
//!   this all but impossible).
//!
//! Each of these yields a warning. Errors (`Err`) are for what leaves no
//! safe reading at all: a `spec` that is not an object, an unknown `action`,
//! invalid metadata names. Istio's own translation is looser in places: it
//! skips unparsable ports and CIDRs silently, which can widen an ALLOW rule.
//!
//! Policies with `targetRef`/`targetRefs` are for waypoints and gateways,
//! and CUSTOM and AUDIT policies are not enforced by ztunnel: those are
//! skipped (`value: None`) with a warning.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::state::names;
use crate::state::{Action, AuthorizationPolicy, MtlsMode, Operation, PeerAuthentication, Rule, RuleSource, Selector};

use super::types::{parse_port, Condition, ConditionError, IpBlock, L4_CONDITION_KEYS};

/// The outcome of a translation that can skip an object or keep it with
/// caveats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated<T> {
    /// `None`: the object is not for this agent (CUSTOM or AUDIT action,
    /// `targetRef`); the warnings say why.
    pub value: Option<T>,
    /// To log once per object version.
    pub warnings: Vec<String>,
}

/// Fields of a source that need HTTP (istiod's `httpSources`).
const HTTP_SOURCE_FIELDS: [&str; 4] =
    ["requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"];
/// Fields of an operation that need HTTP (istiod's `httpOperations`).
const HTTP_OPERATION_FIELDS: [&str; 6] = ["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"];

/// Translates an Istio AuthorizationPolicy. See the module documentation for
/// what is kept, dropped or refused.
pub fn authorization_policy_from_istio(
    namespace: &str,
    name: &str,
    spec: &Value,
) -> Result<Translated<AuthorizationPolicy>, String> {
    check_metadata(namespace, name)?;
    let empty = Map::new();
    let spec = match spec {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => return Err(format!("spec: expected an object, got {}", kind(other))),
    };
    let mut warnings = Vec::new();

    let target_ref = spec.get("targetRef").is_some_and(|v| !v.is_null());
    let target_refs = spec.get("targetRefs").is_some_and(|v| !is_empty_value(v));
    if target_ref || target_refs {
        let field = if target_ref { "spec.targetRef" } else { "spec.targetRefs" };
        warnings.push(format!(
            "{field}: the policy is bound to a waypoint or gateway, which enforces it; skipped by this node agent"
        ));
        return Ok(Translated { value: None, warnings });
    }

    let action = match spec.get("action") {
        None | Some(Value::Null) => Action::Allow,
        Some(Value::String(s)) => match s.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "CUSTOM" | "AUDIT" => {
                warnings.push(format!(
                    "spec.action: {s} is not enforced by ztunnel-style L4 authorization; the policy is ignored"
                ));
                return Ok(Translated { value: None, warnings });
            }
            other => {
                return Err(format!("spec.action: unknown action {other:?} (expected ALLOW, DENY, CUSTOM or AUDIT)"))
            }
        },
        Some(other) => return Err(format!("spec.action: expected a string, got {}", kind(other))),
    };

    let selector = match spec.get("selector").map(|v| selector("spec.selector", v)).transpose() {
        Ok(selector) => selector,
        Err(e) if action == Action::Deny => {
            warnings
                .push(format!("{e}; this DENY policy applies to every workload in its scope instead (fail closed)"));
            None
        }
        Err(e) => return Err(format!("{e}; an ALLOW policy cannot be applied without knowing what it selects")),
    };

    let rules = match spec.get("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(r, item)| translate_rule(item, &format!("spec.rules[{r}]"), namespace, action, &mut warnings))
            .collect(),
        Some(other) => {
            let problem = format!("spec.rules: expected a list, got {}", kind(other));
            warnings.push(consequence(action, &[problem], Reason::Unreadable, "spec.rules"));
            vec![unreadable_rule()]
        }
    };

    for key in spec.keys() {
        if !matches!(key.as_str(), "selector" | "action" | "rules" | "provider" | "targetRef" | "targetRefs") {
            warnings.push(format!("spec.{key}: unknown field, ignored"));
        }
    }

    let policy =
        AuthorizationPolicy { name: name.to_string(), namespace: namespace.to_string(), selector, action, rules };
    Ok(Translated { value: Some(policy), warnings })
}

/// Translates an Istio PeerAuthentication: `spec.selector.matchLabels`,
/// `spec.mtls.mode`, `spec.portLevelMtls` (keys are ports, as strings or
/// numbers). Anything unreadable is an error naming the field; unknown
/// fields are ignored.
pub fn peer_authentication_from_istio(namespace: &str, name: &str, spec: &Value) -> Result<PeerAuthentication, String> {
    check_metadata(namespace, name)?;
    let empty = Map::new();
    let spec = match spec {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => return Err(format!("spec: expected an object, got {}", kind(other))),
    };
    let selector = spec.get("selector").map(|v| selector("spec.selector", v)).transpose()?;
    let mode = match spec.get("mtls") {
        None | Some(Value::Null) => MtlsMode::Unset,
        Some(v) => mtls("spec.mtls", v)?,
    };
    let mut port_level_mtls = BTreeMap::new();
    match spec.get("portLevelMtls") {
        None | Some(Value::Null) => {}
        Some(Value::Object(ports)) => {
            for (key, value) in ports {
                let at = format!("spec.portLevelMtls[{key:?}]");
                let port = parse_port(key).map_err(|e| format!("{at}: {e}"))?;
                port_level_mtls.insert(port, mtls(&at, value)?);
            }
        }
        Some(other) => return Err(format!("spec.portLevelMtls: expected a map of port to mtls, got {}", kind(other))),
    }
    Ok(PeerAuthentication { name: name.to_string(), namespace: namespace.to_string(), selector, mode, port_level_mtls })
}

fn check_metadata(namespace: &str, name: &str) -> Result<(), String> {
    names::check_dns_label(namespace).map_err(|e| format!("metadata.namespace: {e}"))?;
    names::check_dns_subdomain(name).map_err(|e| format!("metadata.name: {e}"))
}

fn mtls(at: &str, value: &Value) -> Result<MtlsMode, String> {
    let Value::Object(map) = value else {
        return Err(format!("{at}: expected an object with `mode`, got {}", kind(value)));
    };
    match map.get("mode") {
        None | Some(Value::Null) => Ok(MtlsMode::Unset),
        Some(Value::String(s)) => match s.as_str() {
            "UNSET" => Ok(MtlsMode::Unset),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "STRICT" => Ok(MtlsMode::Strict),
            "DISABLE" => Ok(MtlsMode::Disable),
            other => Err(format!("{at}.mode: unknown mode {other:?} (expected UNSET, PERMISSIVE, STRICT or DISABLE)")),
        },
        Some(other) => Err(format!("{at}.mode: expected a string, got {}", kind(other))),
    }
}

/// `selector: {matchLabels: {k: v}}`; null means none.
fn selector(at: &str, value: &Value) -> Result<Selector, String> {
    let map = match value {
        Value::Null => return Ok(Selector::default()),
        Value::Object(map) => map,
        other => return Err(format!("{at}: expected an object, got {}", kind(other))),
    };
    let mut match_labels = BTreeMap::new();
    match map.get("matchLabels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            for (k, v) in labels {
                let Value::String(v) = v else {
                    return Err(format!("{at}.matchLabels[{k:?}]: expected a string, got {}", kind(v)));
                };
                match_labels.insert(k.clone(), v.clone());
            }
        }
        Some(other) => return Err(format!("{at}.matchLabels: expected a map of strings, got {}", kind(other))),
    }
    if let Some(key) = map.keys().find(|k| *k != "matchLabels") {
        return Err(format!("{at}.{key}: unknown field (a workload selector has only matchLabels)"));
    }
    Ok(Selector { names: Vec::new(), match_labels })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// Needs HTTP, or an unknown field: fine as written, not enforceable here.
    NotL4,
    /// Could not be parsed.
    Unreadable,
}

/// What one rule could not honour.
#[derive(Default)]
struct Problems {
    not_l4: Vec<String>,
    unreadable: Vec<String>,
}

impl Problems {
    fn not_l4(&mut self, at: String) {
        self.not_l4.push(at);
    }

    fn unreadable(&mut self, problem: String) {
        self.unreadable.push(problem);
    }

    /// Records a field's parse failure; the field stays empty (dropped).
    fn take<T: Default>(&mut self, parsed: Result<T, String>) -> T {
        parsed.unwrap_or_else(|e| {
            self.unreadable(e);
            T::default()
        })
    }
}

fn consequence(action: Action, problems: &[String], reason: Reason, rule_at: &str) -> String {
    let list = problems.join("; ");
    match (reason, action) {
        (Reason::NotL4, Action::Allow) => format!(
            "{rule_at}: not enforceable at L4 ({list}); this ALLOW rule never matches, which is more restrictive than written (HTTP rules need a waypoint)"
        ),
        (Reason::NotL4, Action::Deny) => format!(
            "{rule_at}: not enforceable at L4 ({list}); this DENY rule is enforced on its L4 part alone, which denies more than written (HTTP rules need a waypoint)"
        ),
        (Reason::Unreadable, Action::Allow) => {
            format!("{rule_at}: cannot be read ({list}); this ALLOW rule never matches (fail closed)")
        }
        (Reason::Unreadable, Action::Deny) => format!(
            "{rule_at}: cannot be read ({list}); this DENY rule is enforced without the unreadable parts, which denies more than written (fail closed)"
        ),
    }
}

/// The stand-in for a rule that cannot be read at all: never matches in an
/// ALLOW policy; in a DENY policy it has no constraint left, so it matches
/// everything (the matcher ignores `l7` for DENY).
fn unreadable_rule() -> Rule {
    Rule { l7: true, ..Rule::default() }
}

fn translate_rule(value: &Value, at: &str, namespace: &str, action: Action, warnings: &mut Vec<String>) -> Rule {
    let mut problems = Problems::default();
    let mut rule = Rule::default();
    match value {
        Value::Object(map) => {
            for (key, field) in map {
                let field_at = format!("{at}.{key}");
                match key.as_str() {
                    "from" => {
                        for (f, item) in problems_list(&mut problems, field, &field_at).iter().enumerate() {
                            let source = source(item, &format!("{field_at}[{f}]"), namespace, &mut problems);
                            rule.from.push(source);
                        }
                    }
                    "to" => {
                        for (t, item) in problems_list(&mut problems, field, &field_at).iter().enumerate() {
                            rule.to.push(operation(item, &format!("{field_at}[{t}]"), &mut problems));
                        }
                    }
                    "when" => {
                        for (w, item) in problems_list(&mut problems, field, &field_at).iter().enumerate() {
                            if let Some(c) = condition(item, &format!("{field_at}[{w}]"), &mut problems) {
                                rule.when.push(c);
                            }
                        }
                    }
                    _ if is_empty_value(field) => {}
                    _ => problems.not_l4(format!("{field_at} (unknown field)")),
                }
            }
        }
        other => problems.unreadable(format!("{at}: expected an object, got {}", kind(other))),
    }
    if !problems.not_l4.is_empty() {
        warnings.push(consequence(action, &problems.not_l4, Reason::NotL4, at));
    }
    if !problems.unreadable.is_empty() {
        warnings.push(consequence(action, &problems.unreadable, Reason::Unreadable, at));
    }
    rule.l7 = !problems.not_l4.is_empty() || !problems.unreadable.is_empty();
    rule
}

/// A list field of a rule (`from`, `to`, `when`); anything else is recorded
/// and read as absent.
fn problems_list<'v>(problems: &mut Problems, value: &'v Value, at: &str) -> &'v [Value] {
    match value {
        Value::Null => &[],
        Value::Array(items) => items,
        other => {
            problems.unreadable(format!("{at}: expected a list, got {}", kind(other)));
            &[]
        }
    }
}

/// One `from` entry. Always returns a source to add: an unreadable entry
/// becomes an empty source, which matches any peer (what a DENY needs; an
/// ALLOW rule with problems never matches anyway).
fn source(value: &Value, at: &str, namespace: &str, problems: &mut Problems) -> RuleSource {
    let mut out = RuleSource::default();
    each_field(value, at, "source", "a source", problems, |key, field, field_at, problems| match key {
        "principals" => out.principals = problems.take(principals(field, field_at)),
        "notPrincipals" => out.not_principals = problems.take(principals(field, field_at)),
        "namespaces" => out.namespaces = problems.take(strings(field, field_at)),
        "notNamespaces" => out.not_namespaces = problems.take(strings(field, field_at)),
        "ipBlocks" => out.ip_blocks = problems.take(ip_blocks(field, field_at)),
        "notIpBlocks" => out.not_ip_blocks = problems.take(ip_blocks(field, field_at)),
        "serviceAccounts" => out.service_accounts = problems.take(service_accounts(field, field_at, namespace)),
        "notServiceAccounts" => out.not_service_accounts = problems.take(service_accounts(field, field_at, namespace)),
        k if HTTP_SOURCE_FIELDS.contains(&k) => problems.not_l4(field_at.to_owned()),
        _ => problems.not_l4(format!("{field_at} (unknown field)")),
    });
    out
}

/// One `to` entry; an unreadable one becomes an empty operation (any port).
fn operation(value: &Value, at: &str, problems: &mut Problems) -> Operation {
    let mut out = Operation::default();
    each_field(value, at, "operation", "an operation", problems, |key, field, field_at, problems| match key {
        "ports" => out.ports = problems.take(ports(field, field_at)),
        "notPorts" => out.not_ports = problems.take(ports(field, field_at)),
        k if HTTP_OPERATION_FIELDS.contains(&k) => problems.not_l4(field_at.to_owned()),
        _ => problems.not_l4(format!("{field_at} (unknown field)")),
    });
    out
}

/// Calls `f` for each non-empty field of a `{<name>: {...}}` entry, with the
/// field's path; an entry with no field at all is unreadable, since Istio
/// requires at least one.
fn each_field(
    value: &Value,
    at: &str,
    name: &str,
    what: &str,
    problems: &mut Problems,
    mut f: impl FnMut(&str, &Value, &str, &mut Problems),
) {
    let Some(inner) = wrapped(value, at, name, problems) else {
        return;
    };
    let at = format!("{at}.{name}");
    let mut constrained = false;
    for (key, field) in inner {
        if is_empty_value(field) {
            continue;
        }
        constrained = true;
        f(key, field, &format!("{at}.{key}"), problems);
    }
    if !constrained {
        problems.unreadable(format!("{at}: empty; Istio requires at least one field in {what}"));
    }
}

/// `{<name>: {...}}`, the shape of `from` and `to` entries.
fn wrapped<'v>(value: &'v Value, at: &str, name: &str, problems: &mut Problems) -> Option<&'v Map<String, Value>> {
    let Value::Object(outer) = value else {
        problems.unreadable(format!("{at}: expected an object with `{name}`, got {}", kind(value)));
        return None;
    };
    for key in outer.keys().filter(|k| *k != name) {
        problems.not_l4(format!("{at}.{key} (unknown field)"));
    }
    match outer.get(name) {
        Some(Value::Object(inner)) => Some(inner),
        None | Some(Value::Null) => {
            problems.unreadable(format!("{at}.{name}: missing; Istio requires it"));
            None
        }
        Some(other) => {
            problems.unreadable(format!("{at}.{name}: expected an object, got {}", kind(other)));
            None
        }
    }
}

/// One `when` entry; `None` when it cannot be enforced here (recorded).
fn condition(value: &Value, at: &str, problems: &mut Problems) -> Option<Condition> {
    let Value::Object(map) = value else {
        problems.unreadable(format!("{at}: expected an object with key and values, got {}", kind(value)));
        return None;
    };
    let key = match map.get("key") {
        Some(Value::String(key)) => key,
        None | Some(Value::Null) => {
            problems.unreadable(format!("{at}.key: missing"));
            return None;
        }
        Some(other) => {
            problems.unreadable(format!("{at}.key: expected a string, got {}", kind(other)));
            return None;
        }
    };
    for k in map.keys().filter(|k| !matches!(k.as_str(), "key" | "values" | "notValues")) {
        problems.not_l4(format!("{at}.{k} (unknown field)"));
    }
    if !L4_CONDITION_KEYS.contains(&key.as_str()) {
        problems.not_l4(format!("{at} (key {key:?})"));
        return None;
    }
    let list = |name: &str| match map.get(name) {
        None => Ok(Vec::new()),
        Some(v) => strings(v, &format!("{at}.{name}")),
    };
    let (values, not_values) = match (list("values"), list("notValues")) {
        (Ok(v), Ok(n)) => (v, n),
        (Err(e), _) | (_, Err(e)) => {
            problems.unreadable(e);
            return None;
        }
    };
    let strip = |v: Vec<String>| -> Vec<String> {
        if key == "source.principal" {
            v.into_iter().map(|p| super::matcher::strip_spiffe(&p).to_string()).collect()
        } else {
            v
        }
    };
    match Condition::parse(key, &strip(values), &strip(not_values)) {
        Ok(c) => Some(c),
        Err(ConditionError::BadValue { field, reason }) => {
            problems.unreadable(format!("{at}.{field}: {reason}"));
            None
        }
        Err(e) => {
            problems.unreadable(format!("{at}: {e}"));
            None
        }
    }
}

fn strings(value: &Value, at: &str) -> Result<Vec<String>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("{at}[{i}]: expected a string, got {}", kind(other))),
            })
            .collect(),
        other => Err(format!("{at}: expected a list of strings, got {}", kind(other))),
    }
}

/// Istio accepts principals with or without `spiffe://`; the model has none.
fn principals(value: &Value, at: &str) -> Result<Vec<String>, String> {
    Ok(strings(value, at)?.into_iter().map(|p| super::matcher::strip_spiffe(&p).to_string()).collect())
}

/// `<ns>/<sa>`, or `<sa>` in the policy's namespace; stored as `<ns>/<sa>`.
fn service_accounts(value: &Value, at: &str, namespace: &str) -> Result<Vec<String>, String> {
    Ok(strings(value, at)?
        .into_iter()
        .map(|sa| if sa.contains('/') { sa } else { format!("{namespace}/{sa}") })
        .collect())
}

/// Ports are strings in Istio's schema; numbers are accepted too.
fn ports(value: &Value, at: &str) -> Result<Vec<u16>, String> {
    let Value::Array(items) = value else {
        return Err(format!("{at}: expected a list of ports, got {}", kind(value)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let text = match item {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => return Err(format!("{at}[{i}]: expected a port, got {}", kind(other))),
            };
            parse_port(&text).map_err(|e| format!("{at}[{i}]: {e}"))
        })
        .collect()
}

fn ip_blocks(value: &Value, at: &str) -> Result<Vec<IpBlock>, String> {
    strings(value, at)?
        .iter()
        .enumerate()
        .map(|(i, text)| text.parse::<IpBlock>().map_err(|e| format!("{at}[{i}]: {e}")))
        .collect()
}

/// Absent, null, or an empty list/object/string: places no constraint.
fn is_empty_value(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
