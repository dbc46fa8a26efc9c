//! Whether one rule matches one connection.
//!
//! Empty lists place no constraint; present ones must match. A plaintext peer
//! has no principal or namespace, so any constraint on those fails for it,
//! even `*`, which in Istio means "any authenticated peer".

use crate::state::{Operation, Rule, RuleSource};

use super::Source;

pub(super) fn rule_matches(rule: &Rule, src: &Source, dst_port: u16) -> bool {
    let from_ok = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, src));
    let to_ok = rule.to.is_empty() || rule.to.iter().any(|op| operation_matches(op, dst_port));
    from_ok && to_ok
}

fn source_matches(clause: &RuleSource, src: &Source) -> bool {
    field_matches(&clause.principals, src.principal.as_deref())
        && field_matches(&clause.namespaces, src.namespace.as_deref())
}

fn operation_matches(op: &Operation, dst_port: u16) -> bool {
    op.ports.is_empty() || op.ports.contains(&dst_port)
}

fn field_matches(patterns: &[String], value: Option<&str>) -> bool {
    if patterns.is_empty() {
        return true;
    }
    value.is_some_and(|v| patterns.iter().any(|p| pattern_matches(p, v)))
}

/// Istio string match: `*`, prefix `x*`, suffix `*x`, or exact.
pub(super) fn pattern_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}
