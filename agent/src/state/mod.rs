//! Workloads and policies the agent acts on, loaded from a local file.
//!
//! `Config` is the file as written, `State` the validated and indexed
//! snapshot for one node, and `ConfigWatcher` keeps a `State` current as the
//! file changes. A Kubernetes-fed source can later produce the same `State`.

mod authz;
mod config;
mod diff;
pub mod duration;
mod error;
pub mod names;
mod snapshot;
mod validate;
mod watch;
mod workload;

pub use authz::{Action, AuthorizationPolicy, Operation, Rule, RuleSource, Selector};
pub use config::{CaConfig, Config, WorkloadConfig, DEFAULT_CERT_TTL};
pub use diff::StateDiff;
pub use error::{ConfigError, FieldError};
pub use snapshot::State;
pub use watch::{ConfigWatcher, POLL_INTERVAL};
pub use workload::{Protocol, Workload};

#[cfg(test)]
mod config_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod watch_tests;
