//! The L4 subset of Istio's AuthorizationPolicy, as written in the config
//! file. Evaluation lives in `crate::policy`.

use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use super::error::FieldError;
use super::names;
use super::validate::push_err;
use super::workload::Workload;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    /// The policy applies to workloads in this namespace only.
    pub namespace: String,
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
    pub fn applies_to(&self, workload: &Workload) -> bool {
        self.namespace == workload.namespace && self.selector.as_ref().is_none_or(|s| s.selects(workload))
    }
}

/// Narrows a policy to some workloads of its namespace, by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Empty selects every workload, as an empty `matchLabels` does.
    #[serde(default)]
    pub names: Vec<String>,
}

impl Selector {
    pub fn selects(&self, workload: &Workload) -> bool {
        self.names.is_empty() || self.names.contains(&workload.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Action {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches when every non-empty clause matches; an empty rule matches all.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleSource>,
    #[serde(default)]
    pub to: Vec<Operation>,
}

/// A peer description. Empty lists place no constraint on their field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSource {
    /// Patterns over `<td>/ns/<ns>/sa/<sa>`: exact, `*`, `prefix*`, `*suffix`.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Destination ports; empty means any.
    #[serde(default)]
    pub ports: Vec<u16>,
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
            for (k, name) in selector.names.iter().enumerate() {
                push_err(errors, format!("policies[{i}].selector.names[{k}]"), names::check_dns_subdomain(name));
            }
        }
        for (r, rule) in p.rules.iter().enumerate() {
            let rule_at = format!("policies[{i}].rules[{r}]");
            for (f, source) in rule.from.iter().enumerate() {
                for (k, principal) in source.principals.iter().enumerate() {
                    push_err(errors, format!("{rule_at}.from[{f}].principals[{k}]"), names::check_principal(principal));
                }
                for (k, namespace) in source.namespaces.iter().enumerate() {
                    push_err(
                        errors,
                        format!("{rule_at}.from[{f}].namespaces[{k}]"),
                        check_namespace_pattern(namespace),
                    );
                }
            }
            for (t, op) in rule.to.iter().enumerate() {
                for (k, port) in op.ports.iter().enumerate() {
                    if *port == 0 {
                        errors.push(FieldError::new(
                            format!("{rule_at}.to[{t}].ports[{k}]"),
                            "port 0 is not a valid destination port; use 1..=65535",
                        ));
                    }
                }
            }
        }
    }
}

fn check_namespace_pattern(pattern: &str) -> Result<(), String> {
    names::check_pattern(pattern)?;
    if pattern.contains('*') {
        Ok(())
    } else {
        names::check_dns_label(pattern)
    }
}


/// Istio's PeerAuthentication, the part an L4 data plane enforces: whether
/// plaintext may reach the selected workloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub mode: MtlsMode,
    /// Per-port overrides (`portLevelMtls`), keyed by the workload's port.
    #[serde(default)]
    pub port_level_mtls: std::collections::BTreeMap<u16, MtlsMode>,
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
