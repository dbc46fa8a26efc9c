//! The agent's local config file: trust domain, CA location, workloads and
//! policies, in the camelCase YAML shape of ztunnel's local config.
//!
//! Unknown fields are errors rather than ignored: a misspelt `selector` or
//! `action` in an authorization policy would otherwise widen access silently.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::authz::{AuthorizationPolicy, PeerAuthentication};
use super::duration;
use super::error::ConfigError;
use super::service::ServiceConfig;
use super::validate;
use super::workload::Protocol;

/// Leaf certificate lifetime when `ca.certTtl` is not given; Istio's default.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub trust_domain: String,
    pub ca: CaSection,
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Istio's root namespace: policies there apply to the whole mesh.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default)]
    pub policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Where the config came from, so that errors found after parsing (for
    /// example when building state for a node) still name the file.
    #[serde(skip)]
    pub(crate) origin: String,
}

/// The file's `ca:` section: where workload certificates come from. Either
/// `dir` (this agent holds the CA key and signs itself: the embedded default
/// and the demo) or `address` + `rootCert` + `tokenFile` (a CA service that
/// speaks Istio's certificate API: `sluice ca serve`, or istiod; the agent
/// holds no CA key). The two are mutually exclusive.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `https://host[:port]` of the CA service (port 15012 when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Trust for the CA service's TLS certificate and for the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cert: Option<PathBuf>,
    /// The service-account token sent with each CSR (a projected token with
    /// audience `istio-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(
        default = "default_cert_ttl",
        deserialize_with = "duration::deserialize",
        serialize_with = "duration::serialize"
    )]
    pub cert_ttl: Duration,
}

/// Where certificates come from, once the section is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    Local { dir: PathBuf },
    Remote { address: String, root_cert: PathBuf, token_file: PathBuf },
}

impl CaSection {
    /// The source this section names (`validate` has checked that it names
    /// exactly one, completely).
    pub fn source(&self) -> Option<CaSource> {
        match (&self.dir, &self.address, &self.root_cert, &self.token_file) {
            (Some(dir), None, None, None) => Some(CaSource::Local { dir: dir.clone() }),
            (None, Some(address), Some(root_cert), Some(token_file)) => Some(CaSource::Remote {
                address: address.clone(),
                root_cert: root_cert.clone(),
                token_file: token_file.clone(),
            }),
            _ => None,
        }
    }
}

/// The CA settings the state carries. With a CA service, `dir` is empty:
/// the agent has no CA directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaConfig {
    /// Holds `root-cert.pem` and `ca-key.pem`, and optionally `cert-chain.pem`
    /// when the root is an intermediate.
    pub dir: PathBuf,
    /// Lifetime of issued leaf certificates; they are rotated at half-life.
    #[serde(
        default = "default_cert_ttl",
        deserialize_with = "duration::deserialize",
        serialize_with = "duration::serialize"
    )]
    pub cert_ttl: Duration,
}

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.to_string()
}

fn default_cert_ttl() -> Duration {
    DEFAULT_CERT_TTL
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadConfig {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Required for HBONE workloads on the agent's own node, which the agent
    /// must enter to open listeners; ignored elsewhere.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Istio's workload name (e.g. the Deployment); defaults to `name`.
    #[serde(default)]
    pub workload_name: Option<String>,
    /// Services this workload is an endpoint of, in ztunnel's local-config
    /// shape: `"<namespace>/<hostname>": { <service port>: <target port> }`.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
}

impl Config {
    /// Reads, parses and validates the file. Node-specific rules (such as
    /// `netns` for local HBONE workloads) are checked by `State::from_config`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Config::from_bytes_named(&bytes, &file)
    }

    /// Parses and validates `text`; `name` stands in for the file path in
    /// error messages.
    pub fn from_str_named(text: &str, name: &str) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml::from_str(text).map_err(|err| parse_error(name, text, &err))?;
        config.origin = name.to_string();
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn from_bytes_named(bytes: &[u8], name: &str) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|err| ConfigError::Parse {
            file: name.to_string(),
            message: format!("not valid UTF-8 at byte {}", err.valid_up_to()),
            line: None,
            column: None,
        })?;
        Config::from_str_named(text, name)
    }

    /// Checks the rules that serde cannot express. Useful for configs built
    /// in code; `load` and `from_str_named` already call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(None)
    }

    /// The name errors are reported under: the file path, or the name given
    /// to `from_str_named`.
    pub fn origin(&self) -> &str {
        if self.origin.is_empty() {
            "<config>"
        } else {
            &self.origin
        }
    }

    /// The mesh-wide settings, whatever the workload source.
    pub fn mesh(&self) -> super::Mesh {
        super::Mesh {
            trust_domain: self.trust_domain.clone(),
            ca: CaConfig { dir: self.ca.dir.clone().unwrap_or_default(), cert_ttl: self.ca.cert_ttl },
            root_namespace: self.root_namespace.clone(),
        }
    }

    /// The inventory sections the file fills (`workloads`, `services`,
    /// `policies`, `peerAuthentications`): with a Kubernetes source these
    /// must be empty, since the API server is then the only source.
    pub fn inventory_sections(&self) -> Vec<&'static str> {
        [
            ("workloads", self.workloads.is_empty()),
            ("services", self.services.is_empty()),
            ("policies", self.policies.is_empty()),
            ("peerAuthentications", self.peer_authentications.is_empty()),
        ]
        .into_iter()
        .filter(|(_, empty)| !empty)
        .map(|(name, _)| name)
        .collect()
    }

    pub(crate) fn check(&self, node: Option<&str>) -> Result<(), ConfigError> {
        let errors = validate::check(self, node);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { file: self.origin().to_string(), errors })
        }
    }
}

fn parse_error(name: &str, text: &str, err: &serde_yaml::Error) -> ConfigError {
    // A file of only comments parses as null, which serde reports as a
    // missing `trustDomain`; say what actually happened. Checked only on
    // failure, so a good file is parsed once.
    if matches!(serde_yaml::from_str(text), Ok(serde_yaml::Value::Null)) {
        return ConfigError::Parse {
            file: name.to_string(),
            message: "the file is empty; expected a mapping with trustDomain, ca, workloads and policies".into(),
            line: None,
            column: None,
        };
    }
    let location = err.location();
    ConfigError::Parse {
        file: name.to_string(),
        message: err.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
    }
}
