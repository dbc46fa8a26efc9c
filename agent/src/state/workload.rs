//! A workload as the data path sees it: one pod (or VM) with its identity
//! and addresses.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::names;

/// How peers reach the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Enrolled: traffic to it is tunnelled over mTLS to port 15008.
    #[default]
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not enrolled: reached in plaintext at its own address.
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Canonical form: IPv4-mapped IPv6 addresses are stored as IPv4, so a
    /// lookup by an address seen on a dual-stack socket still finds them.
    pub ips: Vec<IpAddr>,
    /// `None` for workloads that run on no node known to the mesh.
    pub node: Option<String>,
    pub protocol: Protocol,
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    /// The pod's labels: policy and peer-authentication selectors match on
    /// them, and the canonical service and revision come from them.
    pub labels: BTreeMap<String, String>,
    /// Istio's workload name (a Deployment's pods share it); the pod name
    /// when nothing better is known.
    pub workload_name: String,
}

impl Workload {
    /// The Istio-style principal, `<td>/ns/<ns>/sa/<sa>`; prefix it with
    /// `spiffe://` for the certificate's URI SAN.
    pub fn principal(&self, trust_domain: &str) -> String {
        names::principal(trust_domain, &self.namespace, &self.service_account)
    }

    /// `(trust domain, namespace, service account)`, for callers that build
    /// SPIFFE IDs or metric labels without re-parsing the principal.
    pub fn spiffe_id_parts<'a>(&'a self, trust_domain: &'a str) -> (&'a str, &'a str, &'a str) {
        (trust_domain, &self.namespace, &self.service_account)
    }

    pub fn is_on_node(&self, node: &str) -> bool {
        self.node.as_deref() == Some(node)
    }

    fn label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.labels.get(*k)).map(String::as_str)
    }

    /// Istio's canonical service: the `service.istio.io/canonical-name`
    /// label, then `app.kubernetes.io/name`, then `app`, then the workload
    /// name, in that order (as istiod and ztunnel derive it).
    pub fn canonical_service(&self) -> &str {
        self.label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]).unwrap_or(&self.workload_name)
    }

    /// Istio's canonical revision, "latest" when no label gives one.
    pub fn canonical_revision(&self) -> &str {
        self.label(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]).unwrap_or("latest")
    }
}
