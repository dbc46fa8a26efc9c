//! Workload identities in the Istio shape:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

const SCHEME: &str = "spiffe://";
/// The SPIFFE ID spec caps a SPIFFE ID, as a URI, at 2048 bytes.
const MAX_LEN: usize = 2048;

/// A workload's identity. The fields are public for matching; build values
/// with [`SpiffeId::new`] or `parse()` so that they are validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a SPIFFE ID we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {input:?}: {reason}")]
pub struct SpiffeIdError {
    input: String,
    reason: String,
}

impl SpiffeIdError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        // A hostile peer controls this string; keep errors and logs bounded.
        let input = match input.char_indices().nth(256) {
            Some((cut, _)) => format!("{}...", &input[..cut]),
            None => input.to_owned(),
        };
        Self { input, reason: reason.into() }
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Why no SPIFFE ID could be read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdError {
    #[error("not a valid X.509 certificate: {0}")]
    NotACertificate(String),
    #[error("certificate has no subjectAltName extension, so no SPIFFE ID")]
    NoSubjectAltName,
    #[error("certificate has no URI subjectAltName, so no SPIFFE ID")]
    NoUri,
    // X509-SVID spec: exactly one URI SAN, so a certificate cannot claim two
    // identities and let each verifier pick a different one.
    #[error("certificate has {0} URI subjectAltNames; a SPIFFE certificate has exactly one")]
    ManyUris(usize),
    #[error(transparent)]
    Invalid(#[from] SpiffeIdError),
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let id = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        let text = id.to_string();
        validate_trust_domain(&id.trust_domain).map_err(|r| SpiffeIdError::new(&text, r))?;
        validate_segment("namespace", &id.namespace).map_err(|r| SpiffeIdError::new(&text, r))?;
        validate_segment("service account", &id.service_account).map_err(|r| SpiffeIdError::new(&text, r))?;
        if text.len() > MAX_LEN {
            return Err(SpiffeIdError::new(&text, format!("longer than {MAX_LEN} bytes")));
        }
        Ok(id)
    }

    /// The Istio principal: the SPIFFE ID without its scheme, as written in
    /// AuthorizationPolicy `principals`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }

    /// Reads the SPIFFE ID from a DER certificate's single URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, CertIdError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| CertIdError::NotACertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertIdError::NotACertificate(format!("subjectAltName: {e}")))?
            .ok_or(CertIdError::NoSubjectAltName)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [] => Err(CertIdError::NoUri),
            [uri] => Ok(uri.parse()?),
            many => Err(CertIdError::ManyUris(many.len())),
        }
    }
}

/// Checks a trust domain name against the SPIFFE ID spec's alphabet.
pub fn validate_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".into());
    }
    match td.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        Some(c) => Err(format!(
            "trust domain {td:?} contains {c:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
        )),
        None => Ok(()),
    }
}

fn validate_segment(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    // The spec forbids dot segments because URI normalisation would rewrite them.
    if value == "." || value == ".." {
        return Err(format!("{what} may not be {value:?}"));
    }
    match value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
        Some(c) => Err(format!("{what} {value:?} contains {c:?}; only letters, digits, '.', '-' and '_' are allowed")),
        None => Ok(()),
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.principal())
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::new(s, format!("longer than {MAX_LEN} bytes")));
        }
        let rest =
            s.strip_prefix(SCHEME).ok_or_else(|| SpiffeIdError::new(s, format!("must start with {SCHEME:?}")))?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::new(s, "query and fragment are not allowed"));
        }
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        validate_trust_domain(td).map_err(|r| SpiffeIdError::new(s, r))?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", ns, "sa", sa] => Self::new(td, *ns, *sa).map_err(|e| SpiffeIdError::new(s, e.reason)),
            _ => Err(SpiffeIdError::new(s, "path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-ratings".parse().unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "bookinfo-ratings").unwrap());
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo-ratings");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo-ratings");
    }

    #[test]
    fn rejects_malformed_ids_with_reasons() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "must start with"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "lowercase"),
            ("spiffe://td:8080/ns/a/sa/b", "contains ':'"),
            ("spiffe://td", "path must be"),
            ("spiffe://td/ns/a/sa/b/extra", "path must be"),
            ("spiffe://td/ns/a/sa/", "service account is empty"),
            ("spiffe://td/ns/../sa/b", "may not be"),
            ("spiffe://td/ns/a%20b/sa/b", "contains '%'"),
            ("spiffe://td/ns/a/sa/b?x=1", "query and fragment"),
            ("spiffe://td/sa/b/ns/a", "path must be"),
        ];
        for (input, want) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err();
            assert!(err.to_string().contains(want), "{input}: got {err}");
            assert!(err.to_string().contains(input), "{input}: error must quote the input: {err}");
        }
    }

    #[test]
    fn rejects_overlong_ids_without_echoing_them_whole() {
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(5000));
        let err = long.parse::<SpiffeId>().unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn new_validates_parts() {
        assert!(SpiffeId::new("td", "ns/x", "sa").is_err());
        assert!(SpiffeId::new("td", "ns", "").is_err());
    }

    #[test]
    fn garbage_certificate_is_an_error_not_a_panic() {
        assert!(matches!(SpiffeId::from_cert_der(b"not a certificate"), Err(CertIdError::NotACertificate(_))));
        assert!(matches!(SpiffeId::from_cert_der(&[]), Err(CertIdError::NotACertificate(_))));
    }
}
