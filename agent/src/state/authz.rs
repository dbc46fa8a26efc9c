//! The L4 subset of Istio's AuthorizationPolicy, as written in the config
//! file or translated from Kubernetes (`crate::policy::istio`). Evaluation
//! lives in `crate::policy`.

use serde::{Deserialize, Serialize};

use std::collections::{BTreeMap, HashMap};

use super::error::FieldError;
use super::names;
use super::validate::push_err;
use super::workload::Workload;
use crate::policy::{Condition, IpBlock, Values};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    /// In Istio's root namespace the policy applies to every workload of the
    /// mesh; elsewhere, to the workloads of this namespace.
    pub namespace: String,
    /// Narrows the policy to the workloads it selects (in every namespace,
    /// for a root-namespace policy).
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Required, unlike Istio's implicit ALLOW: in a hand-written file a
    /// forgotten `action: DENY` should not quietly become an allow list.
    pub action: Action,
    /// No rules means the policy never matches; for an ALLOW policy that is
    /// Istio's "deny everything" idiom.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// Whether the policy applies to `workload`, given Istio's root namespace.
    pub fn applies_to(&self, workload: &Workload, root_namespace: &str) -> bool {
        let in_scope = self.namespace == workload.namespace || self.namespace == root_namespace;
        in_scope && self.selector.as_ref().is_none_or(|s| s.selects(workload))
    }

    /// `<namespace>/<name>`, as denials report it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Narrows a policy to some workloads, by name and/or by labels. Both given:
/// both must match. An empty selector selects every workload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Workload (pod) names; empty places no constraint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Istio's `selector.matchLabels`: every label must be present with this
    /// value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn selects(&self, workload: &Workload) -> bool {
        (self.names.is_empty() || self.names.contains(&workload.name))
            && self.match_labels.iter().all(|(k, v)| workload.labels.get(k) == Some(v))
    }

    /// Selects everything: for a PeerAuthentication, namespace-wide.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.match_labels.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Action {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches when every present clause matches: one of `from`, one of `to`,
/// and every `when`. An empty rule matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
    /// Set by the Istio translation, never by the file: the rule as written
    /// needed more than L4 (HTTP fields such as `methods` or
    /// `requestPrincipals`, a `when` key such as `request.headers[...]`) or
    /// had fields this agent could not read. In an ALLOW policy such a rule
    /// never matches; in a DENY policy the translation has already reduced it
    /// to what it could read at L4, which is what is evaluated. See
    /// `crate::policy::istio`.
    #[serde(default, skip_deserializing, skip_serializing_if = "is_false")]
    pub l7: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A peer description: every present field must match; `not*` fields must
/// not. Empty lists place no constraint on their field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSource {
    /// Patterns over `<td>/ns/<ns>/sa/<sa>`: exact, `*`, `prefix*`, `*suffix`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Patterns over the peer's namespace, from its verified identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// The peer's address: CIDR blocks or single addresses, IPv4 or IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpBlock>,
    /// Istio's `serviceAccounts`: `<ns>/<sa>`, or `<sa>` in the policy's
    /// namespace; exact, any trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination ports; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

/// Config-file checks for `policies`, collected rather than stopping at the first.
pub(super) fn check_policies(policies: &[AuthorizationPolicy], errors: &mut Vec<FieldError>) {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, p) in policies.iter().enumerate() {
        let at = |field: &str| format!("policies[{i}].{field}");
        let name_ok = names::check_dns_subdomain(&p.name);
        let ns_ok = names::check_dns_label(&p.namespace);
        if name_ok.is_ok() && ns_ok.is_ok() {
            if let Some(&first) = seen.get(&(p.namespace.as_str(), p.name.as_str())) {
                errors.push(FieldError::new(
                    at("name"),
                    format!(
                        "duplicate policy {:?} in namespace {:?} (also policies[{first}].name)",
                        p.name, p.namespace
                    ),
                ));
            } else {
                seen.insert((&p.namespace, &p.name), i);
            }
        }
        push_err(errors, at("name"), name_ok);
        push_err(errors, at("namespace"), ns_ok);

        if let Some(selector) = &p.selector {
            check_selector(selector, &format!("policies[{i}].selector"), errors);
        }
        for (r, rule) in p.rules.iter().enumerate() {
            check_rule(rule, &format!("policies[{i}].rules[{r}]"), errors);
        }
    }
}

fn check_selector(selector: &Selector, at: &str, errors: &mut Vec<FieldError>) {
    for (k, name) in selector.names.iter().enumerate() {
        push_err(errors, format!("{at}.names[{k}]"), names::check_dns_subdomain(name));
    }
    for (key, value) in &selector.match_labels {
        push_err(errors, format!("{at}.matchLabels[{key:?}]"), check_label(key, value));
    }
}

fn check_rule(rule: &Rule, at: &str, errors: &mut Vec<FieldError>) {
    for (f, source) in rule.from.iter().enumerate() {
        let src_at = |field: &str, k: usize| format!("{at}.from[{f}].{field}[{k}]");
        for (field, list) in [("principals", &source.principals), ("notPrincipals", &source.not_principals)] {
            for (k, principal) in list.iter().enumerate() {
                push_err(errors, src_at(field, k), names::check_principal(principal));
            }
        }
        for (field, list) in [("namespaces", &source.namespaces), ("notNamespaces", &source.not_namespaces)] {
            for (k, namespace) in list.iter().enumerate() {
                push_err(errors, src_at(field, k), check_namespace_pattern(namespace));
            }
        }
        for (field, list) in
            [("serviceAccounts", &source.service_accounts), ("notServiceAccounts", &source.not_service_accounts)]
        {
            for (k, sa) in list.iter().enumerate() {
                push_err(errors, src_at(field, k), check_service_account(sa));
            }
        }
    }
    for (t, op) in rule.to.iter().enumerate() {
        for (field, list) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
            for (k, port) in list.iter().enumerate() {
                if *port == 0 {
                    errors.push(FieldError::new(
                        format!("{at}.to[{t}].{field}[{k}]"),
                        "port 0 is not a valid destination port; use 1..=65535",
                    ));
                }
            }
        }
    }
    for (w, condition) in rule.when.iter().enumerate() {
        let (check, values): (Check, &Values<String>) = match condition {
            Condition::SourcePrincipal(v) => (names::check_principal, v),
            Condition::SourceNamespace(v) => (check_namespace_pattern, v),
            // Addresses and ports were parsed, and so checked, by serde.
            _ => continue,
        };
        for (field, list) in [("values", &values.values), ("notValues", &values.not_values)] {
            for (k, value) in list.iter().enumerate() {
                push_err(errors, format!("{at}.when[{w}].{field}[{k}]"), check(value));
            }
        }
    }
}

/// A syntax check for one value.
type Check = fn(&str) -> Result<(), String>;

fn check_namespace_pattern(pattern: &str) -> Result<(), String> {
    names::check_pattern(pattern)?;
    if pattern.contains('*') {
        Ok(())
    } else {
        names::check_dns_label(pattern)
    }
}

/// `<ns>/<sa>` or `<sa>`; Istio allows no wildcards here.
pub(crate) fn check_service_account(text: &str) -> Result<(), String> {
    if text.contains('*') {
        return Err(format!("{text:?}: serviceAccounts takes exact names, without '*'"));
    }
    match text.split_once('/') {
        Some((ns, sa)) => {
            names::check_dns_label(ns).map_err(|e| format!("namespace: {e}"))?;
            names::check_dns_subdomain(sa).map_err(|e| format!("service account: {e}"))
        }
        None => names::check_dns_subdomain(text),
    }
}

/// A Kubernetes label: `[prefix/]name` with a DNS-subdomain prefix and a name
/// of at most 63 alphanumerics, `-`, `_` or `.`, starting and ending with an
/// alphanumeric; the value follows the name's rule and may be empty.
pub(crate) fn check_label(key: &str, value: &str) -> Result<(), String> {
    fn name_ok(text: &str) -> bool {
        let bytes = text.as_bytes();
        let alnum = |b: &u8| b.is_ascii_alphanumeric();
        text.len() <= 63
            && bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes.iter().all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
    }
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            names::check_dns_subdomain(prefix).map_err(|e| format!("label key prefix: {e}"))?;
            name
        }
        None => key,
    };
    if !name_ok(name) {
        return Err(format!(
            "{key:?} is not a valid label key (at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit, after an optional DNS prefix and '/')"
        ));
    }
    if !value.is_empty() && !name_ok(value) {
        return Err(format!(
            "{value:?} is not a valid label value (at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// Istio's PeerAuthentication, the part an L4 data plane enforces: whether
/// plaintext may reach the selected workloads. Resolution (workload, then
/// namespace, then root namespace) is in `crate::policy::plaintext_allowed`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// Absent or empty: namespace-wide (mesh-wide in the root namespace).
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mode: MtlsMode,
    /// Per-port overrides (`portLevelMtls`), keyed by the workload's port.
    /// Istio honours them on workload-selector policies only.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthentication {
    /// Whether this is a workload-level policy (a non-empty selector).
    pub fn is_workload_level(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the namespace, then the root namespace; PERMISSIVE at the top.
    #[default]
    Unset,
    Permissive,
    Strict,
    Disable,
}
