//! Workloads, services and policies the agent acts on, from a local file
//! or from the Kubernetes API (`crate::kube`).
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
mod service;
mod snapshot;
mod validate;
mod watch;
mod workload;

pub use authz::{Action, AuthorizationPolicy, MtlsMode, Operation, PeerAuthentication, Rule, RuleSource, Selector};
pub use config::{CaConfig, CaSection, CaSource, Config, WorkloadConfig, DEFAULT_CERT_TTL, DEFAULT_ROOT_NAMESPACE};
pub use diff::StateDiff;
pub use error::{ConfigError, FieldError};
pub use service::{Endpoint, NoEndpoint, Service, ServiceConfig, TrafficPolicy};
pub use snapshot::{Inventory, Mesh, State};
pub use watch::{ConfigWatcher, POLL_INTERVAL};
pub use workload::{Protocol, Workload};

#[cfg(test)]
mod config_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod watch_tests;
