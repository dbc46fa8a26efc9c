//! The Kubernetes objects the agent watches, declared with only the fields
//! it reads.
//!
//! Why not k8s-openapi's types: a cluster-wide reflector keeps one object per
//! pod and per service, and a full `Pod` (every container, env var, volume
//! and managed field) costs kilobytes. serde drops unknown fields while
//! decoding, so these types never hold them, and [`trim`] clears what is
//! left in the metadata that nothing reads. `cargo xtask bench discovery`
//! measures the result.
//!
//! Every field is optional: a field the API server leaves out (or a hostile
//! one sends as `null`) must not fail the decoding of a whole list.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::Resource;
use serde::Deserialize;
use serde_json::Value;

/// Implements `kube::Resource` for a type with a `metadata` field.
macro_rules! resource {
    ($ty:ident, $group:literal, $version:literal, $kind:literal, $plural:literal, $scope:ty) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}
resource!(Pod, "", "v1", "Pod", "pods", NamespaceResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}
resource!(Namespace, "", "v1", "Namespace", "namespaces", ClusterResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
}
resource!(Service, "", "v1", "Service", "services", NamespaceResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    pub internal_traffic_policy: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub protocol: Option<String>,
    /// A number or a port name (resolved per endpoint, by the EndpointSlice
    /// controller, into the slice's ports).
    pub target_port: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub address_type: Option<String>,
    pub endpoints: Option<Vec<SliceEndpoint>>,
    pub ports: Option<Vec<SlicePort>>,
}
resource!(EndpointSlice, "discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", NamespaceResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Option<Vec<String>>,
    pub conditions: Option<SliceConditions>,
    pub node_name: Option<String>,
    pub target_ref: Option<TargetRef>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SliceConditions {
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct TargetRef {
    pub kind: Option<String>,
    pub uid: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub protocol: Option<String>,
}

/// `security.istio.io/v1` AuthorizationPolicy; the spec is translated by
/// `crate::policy::istio`, which reads it as JSON.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}
resource!(
    AuthorizationPolicy,
    "security.istio.io",
    "v1",
    "AuthorizationPolicy",
    "authorizationpolicies",
    NamespaceResourceScope
);

/// `security.istio.io/v1` PeerAuthentication.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}
resource!(
    PeerAuthentication,
    "security.istio.io",
    "v1",
    "PeerAuthentication",
    "peerauthentications",
    NamespaceResourceScope
);

/// The labels a pod on another node is kept with: those that enroll it
/// and those Istio's metrics name it by. Selectors are only evaluated
/// against pods on this node (policy is enforced at the destination), so
/// those keep all their labels.
pub const REMOTE_POD_LABELS: &[&str] = &[
    "app",
    "version",
    "app.kubernetes.io/name",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
    "pod-template-hash",
    super::enroll::ISTIO_MODE,
    super::enroll::SLUICE_MODE,
];

/// Drops the metadata nothing reads. `keep_labels`: `None` keeps all.
pub fn trim(meta: &mut ObjectMeta, keep_labels: Option<&[&str]>) {
    // Only the sidecar injector's mark is read: a pod that already has a
    // sidecar is not captured again (see `enroll::has_sidecar`).
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k == super::enroll::SIDECAR_STATUS);
    }
    if meta.annotations.as_ref().is_some_and(|a| a.is_empty()) {
        meta.annotations = None;
    }
    meta.managed_fields = None;
    meta.finalizers = None;
    // generateName stays: a pod is named after its controller only when its
    // own name was generated (`enroll::workload_name`).
    meta.self_link = None;
    meta.deletion_grace_period_seconds = None;
    meta.generation = None;
    // The workload name comes from the controlling owner: keep that one.
    if let Some(owners) = meta.owner_references.as_mut() {
        owners.retain(|o| o.controller == Some(true));
        for o in owners.iter_mut() {
            o.api_version = String::new();
            o.uid = String::new();
            o.block_owner_deletion = None;
        }
    }
    if let (Some(keep), Some(labels)) = (keep_labels, meta.labels.as_mut()) {
        labels.retain(|k, _| keep.contains(&k.as_str()));
    }
}

/// An object's labels, or none.
pub fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    meta.labels.as_ref().unwrap_or(&EMPTY)
}
