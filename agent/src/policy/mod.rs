//! L4 authorization with the semantics of Istio's AuthorizationPolicy,
//! restricted to what is known at connection setup: peer identity, peer
//! namespace and destination port.

mod matcher;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;

use crate::state::names;
use crate::state::{Action, AuthorizationPolicy, State, Workload};

/// Reported for a deny caused by ALLOW policies that apply but do not match.
pub const DEFAULT_DENY: &str = "default-deny: no ALLOW policy matched";

/// The peer of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `<td>/ns/<ns>/sa/<sa>` from a verified certificate; `None` for
    /// plaintext clients.
    pub principal: Option<String>,
    pub namespace: Option<String>,
    pub ip: IpAddr,
}

impl Source {
    /// A peer authenticated with mTLS. The namespace is taken from the
    /// principal, since the verified identity is the only trustworthy source
    /// for it.
    pub fn authenticated(principal: impl Into<String>, ip: IpAddr) -> Source {
        let principal = principal.into();
        let namespace = names::parse_principal(&principal).map(|p| p.namespace.to_string());
        Source { principal: Some(principal), namespace, ip }
    }

    /// A plaintext peer: it matches no principal or namespace constraint.
    pub fn plaintext(ip: IpAddr) -> Source {
        Source { principal: None, namespace: None, ip }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` is the name of the DENY policy that matched, or
    /// [`DEFAULT_DENY`].
    Deny {
        policy: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allow"),
            Decision::Deny { policy } => write!(f, "deny ({policy})"),
        }
    }
}

/// Decides whether `src` may connect to `dst` on `dst_port`.
///
/// DENY policies are checked first and win. Then, if any ALLOW policy applies
/// to `dst`, one of its rules must match; if none applies, the connection is
/// allowed.
pub fn authorize(state: &State, dst: &Workload, src: &Source, dst_port: u16) -> Decision {
    let applicable = || state.policies_in(&dst.namespace).iter().filter(|p| p.applies_to(dst));

    if let Some(deny) = applicable().filter(|p| p.action == Action::Deny).find(|p| policy_matches(p, src, dst_port)) {
        return Decision::Deny { policy: deny.name.clone() };
    }

    let mut allow_policies = applicable().filter(|p| p.action == Action::Allow).peekable();
    if allow_policies.peek().is_none() {
        return Decision::Allow;
    }
    if allow_policies.any(|p| policy_matches(p, src, dst_port)) {
        Decision::Allow
    } else {
        Decision::Deny { policy: DEFAULT_DENY.to_string() }
    }
}

fn policy_matches(policy: &AuthorizationPolicy, src: &Source, dst_port: u16) -> bool {
    policy.rules.iter().any(|rule| matcher::rule_matches(rule, src, dst_port))
}
