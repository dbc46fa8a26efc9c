//! The resource types the fake server knows, and the `Status` objects it answers errors with.

use serde_json::{json, Value};

/// One REST resource: where it lives in the URL space and what its objects are called.
#[derive(Debug)]
pub struct ResourceType {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Served only while [`super::FakeApiServer::set_crds_installed`] says so.
    pub crd: bool,
    /// `fieldSelector` keys beyond `metadata.name`/`metadata.namespace`, with their JSON pointers.
    pub fields: &'static [(&'static str, &'static str)],
}

const POD_FIELDS: &[(&str, &str)] = &[
    ("spec.nodeName", "/spec/nodeName"),
    ("spec.serviceAccountName", "/spec/serviceAccountName"),
    ("spec.hostNetwork", "/spec/hostNetwork"),
    ("spec.restartPolicy", "/spec/restartPolicy"),
    ("spec.schedulerName", "/spec/schedulerName"),
    ("status.phase", "/status/phase"),
    ("status.podIP", "/status/podIP"),
    ("status.nominatedNodeName", "/status/nominatedNodeName"),
];

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const TYPES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        crd: false,
        fields: POD_FIELDS,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        crd: false,
        fields: &[("spec.clusterIP", "/spec/clusterIP"), ("spec.type", "/spec/type")],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        crd: false,
        fields: &[("status.phase", "/status/phase")],
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        crd: false,
        fields: &[],
    },
    ResourceType {
        group: "security.istio.io",
        version: "v1",
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        namespaced: true,
        crd: true,
        fields: &[],
    },
    ResourceType {
        group: "security.istio.io",
        version: "v1",
        plural: "peerauthentications",
        kind: "PeerAuthentication",
        namespaced: true,
        crd: true,
        fields: &[],
    },
];

/// Index into [`TYPES`] by URL parts.
pub fn by_path(group: &str, version: &str, plural: &str) -> Option<usize> {
    TYPES.iter().position(|t| t.group == group && t.version == version && t.plural == plural)
}

/// Index into [`TYPES`] by an object's `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<usize> {
    TYPES.iter().position(|t| t.api_version() == api_version && t.kind == kind)
}

/// A `Status` object as the API server sends with a failed request.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    })
}

/// The reason string Kubernetes uses for an HTTP status code.
pub fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "AlreadyExists",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        _ => "InternalError",
    }
}
