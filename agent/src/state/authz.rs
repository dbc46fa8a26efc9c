//! The L4 subset of Istio's AuthorizationPolicy, as written in the config
//! file. Evaluation lives in `crate::policy`.

use serde::{Deserialize, Serialize};

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
