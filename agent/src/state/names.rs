//! Syntax rules for the names that end up inside SPIFFE IDs and policy
//! patterns. They are checked at load time because a malformed name would
//! otherwise only surface as a policy that silently never matches.

/// The parts of an exact principal `<td>/ns/<ns>/sa/<sa>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrincipalParts<'a> {
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// Builds the Istio-style principal (a SPIFFE ID without `spiffe://`).
pub fn principal(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Splits an exact principal. Only structure is checked here; use
/// [`check_principal`] to also check each part's characters.
pub fn parse_principal(text: &str) -> Option<PrincipalParts<'_>> {
    let mut parts = text.split('/');
    let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if td.is_empty() || ns.is_empty() || sa.is_empty() {
        return None;
    }
    Some(PrincipalParts { trust_domain: td, namespace: ns, service_account: sa })
}

/// SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`, with no
/// empty dot-separated label.
pub fn check_trust_domain(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.len() > 255 {
        return Err(format!("{text:?} is longer than 255 characters"));
    }
    if let Some(bad) =
        text.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "{text:?} contains {bad:?}; a trust domain is a DNS-like name of lowercase letters, digits, '.', '-' and '_'"
        ));
    }
    if text.split('.').any(str::is_empty) {
        return Err(format!("{text:?} has an empty label (leading, trailing or doubled '.')"));
    }
    Ok(())
}

/// Kubernetes DNS-1123 label, the rule for namespace names.
pub fn check_dns_label(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.len() > 63 {
        return Err(format!("{text:?} is longer than 63 characters"));
    }
    if !label_ok(text) {
        return Err(format!(
            "{text:?} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// Kubernetes DNS-1123 subdomain, the rule for service account names.
pub fn check_dns_subdomain(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.len() > 253 {
        return Err(format!("{text:?} is longer than 253 characters"));
    }
    if !text.split('.').all(label_ok) {
        return Err(format!(
            "{text:?} is not a DNS-1123 subdomain (dot-separated labels of lowercase letters, digits and '-')"
        ));
    }
    Ok(())
}

fn label_ok(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-'),
        _ => false,
    }
}

/// An Istio match pattern: exact, `*`, prefix `x*` or suffix `*x`. Anything
/// else (`a*b`, `**`) would be taken literally by Istio and never match, so it
/// is refused instead.
pub fn check_pattern(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.chars().any(char::is_whitespace) {
        return Err(format!("{text:?} contains whitespace"));
    }
    if text == "*" {
        return Ok(());
    }
    let inner = text.strip_prefix('*').or_else(|| text.strip_suffix('*')).unwrap_or(text);
    if inner.contains('*') {
        return Err(format!("{text:?}: '*' is only allowed alone, as a prefix (*x) or as a suffix (x*)"));
    }
    Ok(())
}

/// A principal pattern: a wildcard form, or an exact `<td>/ns/<ns>/sa/<sa>`
/// whose parts follow the same rules as the workloads they must match.
pub fn check_principal(text: &str) -> Result<(), String> {
    check_pattern(text)?;
    if text.contains('*') {
        return Ok(());
    }
    if text.starts_with("spiffe://") {
        return Err(format!(
            "{text:?}: write principals without the spiffe:// prefix, as <trust-domain>/ns/<namespace>/sa/<service-account>"
        ));
    }
    let parts = parse_principal(text)
        .ok_or_else(|| format!("{text:?} is not of the form <trust-domain>/ns/<namespace>/sa/<service-account>"))?;
    check_trust_domain(parts.trust_domain).map_err(|e| format!("trust domain: {e}"))?;
    check_dns_label(parts.namespace).map_err(|e| format!("namespace: {e}"))?;
    check_dns_subdomain(parts.service_account).map_err(|e| format!("service account: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_round_trips() {
        let p = principal("cluster.local", "default", "sleep");
        assert_eq!(p, "cluster.local/ns/default/sa/sleep");
        let parts = parse_principal(&p).unwrap();
        assert_eq!(parts.trust_domain, "cluster.local");
        assert_eq!(parts.namespace, "default");
        assert_eq!(parts.service_account, "sleep");
    }

    #[test]
    fn principal_forms() {
        for ok in ["cluster.local/ns/default/sa/sleep", "*", "cluster.local/ns/default/*", "*/sa/sleep"] {
            assert_eq!(check_principal(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "sleep",
            "cluster.local/ns/default",
            "cluster.local/ns/default/sa/sleep/extra",
            "cluster.local/ns//sa/sleep",
            "spiffe://cluster.local/ns/default/sa/sleep",
            "Cluster.local/ns/default/sa/sleep",
            "a*b",
            "**",
            "* ",
        ] {
            assert!(check_principal(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn names() {
        assert!(check_dns_label("default").is_ok());
        assert!(check_dns_label("-x").is_err());
        assert!(check_dns_label("a.b").is_err());
        assert!(check_dns_subdomain("bookinfo.reviews").is_ok());
        assert!(check_dns_subdomain("a..b").is_err());
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("cluster.").is_err());
        assert!(check_trust_domain("Cluster").is_err());
    }
}
