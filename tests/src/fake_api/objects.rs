//! Builders for objects in the shapes the real API server returns them.

use serde_json::{json, Map, Value};
use std::net::IpAddr;

fn labels(l: &[(&str, &str)]) -> Value {
    Value::Object(l.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>())
}

pub fn namespace(name: &str, l: &[(&str, &str)]) -> Value {
    let mut all = vec![("kubernetes.io/metadata.name", name)];
    all.extend_from_slice(l);
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels(&all)},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

pub fn pod(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    ips: &[IpAddr],
    l: &[(&str, &str)],
) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let mut status = json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "podIPs": pod_ips,
    });
    if let Some(ip) = ips.first() {
        status["podIP"] = json!(ip.to_string());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels(l)},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "serviceAccount": service_account,
            "hostNetwork": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
        "status": status,
    })
}

pub fn service(ns: &str, name: &str, cluster_ips: &[IpAddr], ports: &[(&str, u16, Value)]) -> Value {
    let ips: Vec<String> = cluster_ips.iter().map(IpAddr::to_string).collect();
    let families: Vec<&str> = cluster_ips.iter().map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }).collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, port, target)| json!({"name": pname, "port": port, "protocol": "TCP", "targetPort": target}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips.first().cloned().unwrap_or_else(|| "None".into()),
            "clusterIPs": ips,
            "ipFamilies": families,
            "ipFamilyPolicy": if cluster_ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
            "ports": ports,
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    })
}

/// One endpoint of an [`endpoint_slice`].
#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub ip: IpAddr,
    pub ready: bool,
    pub node: Option<String>,
    /// (name, uid) of the backing pod.
    pub pod: Option<(String, String)>,
}

pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    address_type: &str,
    endpoints: &[EndpointSpec],
    ports: &[(&str, u16)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.ready, "terminating": false},
            });
            if let Some(node) = &e.node {
                v["nodeName"] = json!(node);
            }
            if let Some((pod, uid)) = &e.pod {
                v["targetRef"] = json!({"kind": "Pod", "namespace": ns, "name": pod, "uid": uid});
            }
            v
        })
        .collect();
    let ports: Vec<Value> = ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    })
}
