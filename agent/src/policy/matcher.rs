//! Whether one policy matches one connection, with ztunnel's semantics.
//!
//! A rule matches when one of its `from` sources, one of its `to` operations
//! and every `when` condition match (absent clauses place no constraint).
//! Within a source or operation every present field must match; a field
//! holds when the value is one of its positive list (if given) and none of
//! its negative list (if given).
//!
//! A plaintext peer has no principal, namespace or service account, so any
//! positive constraint on those fails for it, even `*` (which in Istio means
//! "any authenticated peer"), and any negative one holds: an absent identity
//! is not one of the listed ones. That is ztunnel's rule (an empty identity
//! never matches a pattern), and it is what makes Istio's "require mTLS"
//! idiom work: `DENY` with `notPrincipals: ["*"]` denies exactly the
//! plaintext peers.

use std::net::IpAddr;

use crate::state::names;
use crate::state::{Action, AuthorizationPolicy, Operation, Rule, RuleSource};

use super::types::{Condition, IpBlock, Values};
use super::Conn;

/// What is known about one connection, computed once per decision.
pub(super) struct Facts<'a> {
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    /// `(namespace, service account)` from the principal.
    service_account: Option<(&'a str, &'a str)>,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl<'a> Facts<'a> {
    pub(super) fn of(conn: &'a Conn<'a>) -> Facts<'a> {
        let principal = conn.src.principal.as_deref().map(strip_spiffe);
        let service_account = principal.and_then(names::parse_principal).map(|p| (p.namespace, p.service_account));
        Facts {
            principal,
            namespace: conn.src.namespace.as_deref(),
            service_account,
            src_ip: conn.src.ip.to_canonical(),
            dst_ip: conn.dst_addr.ip().to_canonical(),
            dst_port: conn.dst_addr.port(),
        }
    }
}

pub(super) fn policy_matches(policy: &AuthorizationPolicy, facts: &Facts<'_>) -> bool {
    policy.rules.iter().any(|rule| rule_matches(policy, rule, facts))
}

fn rule_matches(policy: &AuthorizationPolicy, rule: &Rule, facts: &Facts<'_>) -> bool {
    // Fail safe: an ALLOW rule that needs what L4 cannot see never allows.
    // A DENY rule was reduced to its L4 part when it was translated, and that
    // part is what applies.
    if rule.l7 && policy.action == Action::Allow {
        return false;
    }
    let from_ok = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, &policy.namespace, facts));
    let to_ok = rule.to.is_empty() || rule.to.iter().any(|op| operation_matches(op, facts));
    from_ok && to_ok && rule.when.iter().all(|c| condition_matches(c, facts))
}

fn source_matches(clause: &RuleSource, policy_namespace: &str, facts: &Facts<'_>) -> bool {
    let principal = |p: &String| facts.principal.is_some_and(|v| pattern_matches(strip_spiffe(p), v));
    let namespace = |p: &String| facts.namespace.is_some_and(|v| pattern_matches(p, v));
    let ip = |b: &IpBlock| b.contains(facts.src_ip);
    let service_account = |sa: &String| {
        let wanted = sa.split_once('/').unwrap_or((policy_namespace, sa));
        facts.service_account == Some(wanted)
    };
    holds(&clause.principals, &clause.not_principals, principal)
        && holds(&clause.namespaces, &clause.not_namespaces, namespace)
        && holds(&clause.ip_blocks, &clause.not_ip_blocks, ip)
        && holds(&clause.service_accounts, &clause.not_service_accounts, service_account)
}

fn operation_matches(op: &Operation, facts: &Facts<'_>) -> bool {
    holds(&op.ports, &op.not_ports, |p| *p == facts.dst_port)
}

fn condition_matches(condition: &Condition, facts: &Facts<'_>) -> bool {
    fn values<T>(v: &Values<T>, pred: impl Fn(&T) -> bool) -> bool {
        holds(&v.values, &v.not_values, pred)
    }
    match condition {
        Condition::SourceIp(v) => values(v, |b| b.contains(facts.src_ip)),
        Condition::DestinationIp(v) => values(v, |b| b.contains(facts.dst_ip)),
        Condition::DestinationPort(v) => values(v, |p| *p == facts.dst_port),
        Condition::SourceNamespace(v) => values(v, |p| facts.namespace.is_some_and(|ns| pattern_matches(p, ns))),
        Condition::SourcePrincipal(v) => {
            values(v, |p| facts.principal.is_some_and(|id| pattern_matches(strip_spiffe(p), id)))
        }
    }
}

/// One field: any positive value matches (if there are any) and no negative
/// value does.
fn holds<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

/// Istio writes principals with or without `spiffe://`; compare without.
pub(super) fn strip_spiffe(text: &str) -> &str {
    text.strip_prefix("spiffe://").unwrap_or(text)
}

/// Istio string match: `*` (any non-empty value), prefix `x*`, suffix `*x`,
/// or exact.
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
