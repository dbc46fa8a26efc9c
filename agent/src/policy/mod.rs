//! L4 authorization with the semantics ztunnel gives Istio's
//! AuthorizationPolicy, restricted to what is known at connection setup:
//! peer identity (principal, namespace, service account), peer address,
//! and the destination address and port the client reached. Also
//! PeerAuthentication: whether plaintext may reach a workload.
//!
//! - `matcher`: whether one policy matches one connection.
//! - `istio`: translation of Kubernetes `security.istio.io/v1` objects into
//!   this model, with the fail-safe choices for what L4 cannot enforce.
//! - `types`: CIDR blocks and `when` conditions, shared with `crate::state`.

pub mod istio;
mod matcher;
mod types;

#[cfg(test)]
mod istio_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::state::names;
use crate::state::{Action, AuthorizationPolicy, MtlsMode, PeerAuthentication, State, Workload};

pub use istio::{authorization_policy_from_istio, peer_authentication_from_istio, Translated};
pub use types::{parse_port, Condition, ConditionError, IpBlock, Values, L4_CONDITION_KEYS};

/// Reported for a deny caused by ALLOW policies that apply but do not match.
pub const DEFAULT_DENY: &str = "default-deny: no ALLOW policy matched";

/// The peer of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `<td>/ns/<ns>/sa/<sa>` (no `spiffe://`) from a verified certificate;
    /// `None` for plaintext clients.
    pub principal: Option<String>,
    pub namespace: Option<String>,
    pub ip: IpAddr,
}

impl Source {
    /// A peer authenticated with mTLS. The namespace is taken from the
    /// principal, since the verified identity is the only trustworthy source
    /// for it. A `spiffe://` prefix is dropped.
    pub fn authenticated(principal: impl Into<String>, ip: IpAddr) -> Source {
        let mut principal = principal.into();
        if let Some(rest) = principal.strip_prefix("spiffe://") {
            principal = rest.to_string();
        }
        let namespace = names::parse_principal(&principal).map(|p| p.namespace.to_string());
        Source { principal: Some(principal), namespace, ip }
    }

    /// A plaintext peer: it matches no positive principal, namespace or
    /// service-account constraint, and every negative one (see `matcher`).
    pub fn plaintext(ip: IpAddr) -> Source {
        Source { principal: None, namespace: None, ip }
    }
}

/// One connection to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    pub src: &'a Source,
    pub dst: &'a Workload,
    /// The destination address and port the client reached (for `ports`,
    /// `destination.ip` and `destination.port`).
    pub dst_addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` names the DENY policy that matched as `<namespace>/<name>`
    /// (bare `<name>` from the legacy [`authorize`]), or is [`DEFAULT_DENY`].
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

/// Decides whether `conn` may proceed, as ztunnel does:
///
/// 1. if any DENY policy that applies to the destination matches, deny;
/// 2. if no ALLOW policy applies, allow;
/// 3. if one of the applicable ALLOW policies matches, allow; else deny
///    ([`DEFAULT_DENY`]).
///
/// Policies in the root namespace apply mesh-wide; others to workloads of
/// their namespace; a selector narrows either. CUSTOM and AUDIT policies are
/// not in the model (the translation drops them).
pub fn authorize_conn(state: &State, conn: &Conn<'_>) -> Decision {
    match evaluate(state, conn) {
        Verdict::Allow => Decision::Allow,
        Verdict::DeniedBy(policy) => Decision::Deny { policy: policy.key() },
        Verdict::DefaultDeny => Decision::Deny { policy: DEFAULT_DENY.to_string() },
    }
}

/// The tests' shorthand for [`authorize_conn`]: `destination.ip` is the
/// workload's first address, and a DENY is reported by the policy's bare
/// name.
#[cfg(test)]
pub(crate) fn authorize(state: &State, dst: &Workload, src: &Source, dst_port: u16) -> Decision {
    let ip = dst.ips.first().copied().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let conn = Conn { src, dst, dst_addr: SocketAddr::new(ip, dst_port) };
    match evaluate(state, &conn) {
        Verdict::Allow => Decision::Allow,
        Verdict::DeniedBy(policy) => Decision::Deny { policy: policy.name.clone() },
        Verdict::DefaultDeny => Decision::Deny { policy: DEFAULT_DENY.to_string() },
    }
}

enum Verdict<'s> {
    Allow,
    DeniedBy(&'s AuthorizationPolicy),
    DefaultDeny,
}

fn evaluate<'s>(state: &'s State, conn: &Conn<'s>) -> Verdict<'s> {
    let facts = matcher::Facts::of(conn);
    let applicable = || applicable_policies(state, conn.dst);

    if let Some(deny) = applicable().filter(|p| p.action == Action::Deny).find(|p| matcher::policy_matches(p, &facts)) {
        return Verdict::DeniedBy(deny);
    }
    let mut allow_policies = applicable().filter(|p| p.action == Action::Allow).peekable();
    if allow_policies.peek().is_none() {
        return Verdict::Allow;
    }
    if allow_policies.any(|p| matcher::policy_matches(p, &facts)) {
        Verdict::Allow
    } else {
        Verdict::DefaultDeny
    }
}

/// The policies that apply to `dst`: the root namespace's (mesh-wide) first,
/// then those of `dst`'s namespace, each in the order the source gave them.
pub fn applicable_policies<'s>(
    state: &'s State,
    dst: &'s Workload,
) -> impl Iterator<Item = &'s Arc<AuthorizationPolicy>> + 's {
    let root = state.root_namespace();
    let mesh_wide: &[Arc<AuthorizationPolicy>] = if dst.namespace == root { &[] } else { state.policies_in(root) };
    mesh_wide.iter().chain(state.policies_in(&dst.namespace)).filter(move |p| p.applies_to(dst, root))
}

/// Whether plaintext may reach `dst` on `port`, by PeerAuthentication.
///
/// The effective mode is the first one set (not UNSET) of: the port's
/// `portLevelMtls` entry in the workload-level policy (a selector that selects
/// `dst`, in `dst`'s namespace), that policy's mode, the namespace-wide
/// policy's (no selector), the root namespace's mesh-wide one; PERMISSIVE if
/// none is set. `portLevelMtls` counts only on a workload-level policy, as in
/// Istio. When two policies compete for one level, the first in the source's
/// order wins (Istio takes the oldest; a Kubernetes source should list them
/// oldest first). STRICT refuses plaintext; PERMISSIVE and DISABLE accept it.
pub fn plaintext_allowed(state: &State, dst: &Workload, port: u16) -> Result<(), String> {
    let root = state.root_namespace();
    let own = state.peer_authentications_in(&dst.namespace);
    let namespace_wide = |list: &'_ [Arc<PeerAuthentication>]| -> Option<Arc<PeerAuthentication>> {
        list.iter().find(|p| !p.is_workload_level()).cloned()
    };
    let workload =
        own.iter().find(|p| p.is_workload_level() && p.selector.as_ref().is_some_and(|s| s.selects(dst))).cloned();
    let namespace = if dst.namespace == root { None } else { namespace_wide(own) };
    let mesh = namespace_wide(state.peer_authentications_in(root));

    let port_level = workload.as_ref().and_then(|p| p.port_level_mtls.get(&port).map(|m| (p, *m)));
    let levels = [workload.as_ref(), namespace.as_ref(), mesh.as_ref()];
    let decided = port_level
        .into_iter()
        .chain(levels.into_iter().flatten().map(|p| (p, p.mode)))
        .find(|(_, mode)| *mode != MtlsMode::Unset);
    match decided {
        Some((policy, MtlsMode::Strict)) => Err(format!("{} requires mTLS", policy.key())),
        _ => Ok(()),
    }
}
