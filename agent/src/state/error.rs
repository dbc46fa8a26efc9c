//! Errors from loading the local config file.
//!
//! Every message starts with the file it came from, because the agent may be
//! pointed at a mounted ConfigMap whose path the operator never typed, and a
//! reload failure is only ever seen in a log line.

use std::fmt;
use std::io;

/// One semantic problem, located by a field path such as
/// `workloads[1].workloadIps[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError { path: path.into(), reason: reason.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Why a config could not be turned into agent state.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config: {source}")]
    Read {
        file: String,
        #[source]
        source: io::Error,
    },

    /// The YAML is malformed or does not fit the schema. `message` comes from
    /// serde_yaml and already names the field path and the line.
    #[error("{file}: {message}")]
    Parse { file: String, message: String, line: Option<usize>, column: Option<usize> },

    /// The document parsed but breaks a rule the schema cannot express. All
    /// problems are reported at once so that an operator fixes them in one go.
    #[error("{file}: invalid config: {}", join(.errors))]
    Invalid { file: String, errors: Vec<FieldError> },

    /// A reload changed settings the running agent was built from (its
    /// certificates, TLS configs and CA client): applying them half-way
    /// would mix identities, so the running config stays until a restart.
    #[error(
        "{file}: {} changed; the agent applies these only at start, so it keeps the running config (restart the agent to apply)",
        .fields.join(", ")
    )]
    NeedsRestart { file: String, fields: Vec<String> },
}

impl ConfigError {
    /// The file (or name given to `Config::from_str_named`) the error is about.
    pub fn file(&self) -> &str {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Parse { file, .. }
            | ConfigError::Invalid { file, .. }
            | ConfigError::NeedsRestart { file, .. } => file,
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}
