//! `inventory::build` from objects decoded from JSON in the shapes the API
//! server sends (so the serde field names are under test too), trimmed as the
//! watchers trim them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::inventory::{build, local_enrolled, Built, Problem, Stores};
use super::objects::{self, AuthorizationPolicy, EndpointSlice, Namespace, PeerAuthentication, Pod, Service};
use super::{ISTIO_MODE, SLUICE_MODE};
use crate::inpod::discover::FoundPod;
use crate::policy::{authorize_conn, plaintext_allowed, Conn, Decision, Source};
use crate::state::{
    self, Action, CaConfig, Endpoint, Inventory, Mesh, MtlsMode, Protocol, State, TrafficPolicy, Workload,
};

const NODE: &str = "node-a";
const OTHER: &str = "node-b";

fn decode<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("decoding {v}: {e}"))
}

/// Decodes and trims as `spawn_watch` does.
fn watched<T: DeserializeOwned + Resource>(v: Value, keep: Option<&[&str]>) -> Arc<T> {
    let mut o: T = decode(v);
    objects::trim(o.meta_mut(), keep);
    Arc::new(o)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(l: &[(&str, &str)]) -> Value {
    Value::Object(l.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A Deployment's pod as the API server returns it, with the fields the agent
/// does not read (containers, managedFields, annotations, conditions...).
fn pod(ns: &str, name: &str, n: u32, node: &str, ips: &[&str], l: &[(&str, &str)]) -> Value {
    let mut status = json!({
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-01-01T00:00:05Z"},
        ],
        "hostIP": "192.168.0.10",
        "hostIPs": [{"ip": "192.168.0.10"}],
        "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
        "startTime": "2026-01-01T00:00:00Z",
        "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.invalid/app:1",
            "imageID": "", "containerID": "containerd://0123", "started": true,
            "state": {"running": {"startedAt": "2026-01-01T00:00:03Z"}}, "lastState": {}}],
        "qosClass": "BestEffort",
    });
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": "web-5d9c-",
            "namespace": ns,
            "uid": uid(n),
            "resourceVersion": format!("{}", 1000 + n),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": labels(l),
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c",
                "uid": "11111111-0000-4000-8000-000000000000", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "hostNetwork": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {}, "terminationMessagePath": "/dev/termination-log", "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": status,
    })
}

fn namespace(name: &str, l: &[(&str, &str)]) -> Value {
    let mut all = vec![("kubernetes.io/metadata.name", name)];
    all.extend_from_slice(l);
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "uid": "22222222-0000-4000-8000-000000000000", "resourceVersion": "7",
            "creationTimestamp": "2026-01-01T00:00:00Z", "labels": labels(&all)},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A ClusterIP service; `ports` are full port objects.
fn service(ns: &str, name: &str, cluster_ips: &[&str], ports: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": "33333333-0000-4000-8000-000000000000",
            "resourceVersion": "42", "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ips.first().copied().unwrap_or("None"),
            "clusterIPs": cluster_ips,
            "ipFamilies": cluster_ips.iter().map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" }).collect::<Vec<_>>(),
            "ipFamilyPolicy": if cluster_ips.len() > 1 { "PreferDualStack" } else { "SingleStack" },
            "ports": ports,
            "selector": {"app": name},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    })
}

fn http_port(target: Value) -> Value {
    json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": target}])
}

/// An EndpointSlice as the EndpointSlice controller writes it; `endpoints`
/// are full endpoint objects.
fn slice(ns: &str, name: &str, service: &str, address_type: &str, endpoints: Value, ports: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": ns,
            "resourceVersion": "99",
            "labels": {"kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                "uid": "33333333-0000-4000-8000-000000000000", "controller": true, "blockOwnerDeletion": true}],
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn endpoint(addr: &str, ready: bool, node: Option<&str>, pod: Option<(&str, u32)>) -> Value {
    let mut e = json!({
        "addresses": [addr],
        "conditions": {"ready": ready, "serving": ready, "terminating": false},
        "zone": "zone-1",
    });
    if let Some(node) = node {
        e["nodeName"] = json!(node);
    }
    if let Some((name, n)) = pod {
        e["targetRef"] = json!({"kind": "Pod", "namespace": "shop", "name": name, "uid": uid(n)});
    }
    e
}

fn policy(kind: &str, ns: &str, name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "uid": "44444444-0000-4000-8000-000000000000",
            "resourceVersion": "5", "generation": 1, "creationTimestamp": created},
        "spec": spec,
    })
}

/// The stores, filled as the watchers fill them: every pod in the
/// cluster-wide store with the remote labels, this node's also in the local
/// one with all of theirs.
#[derive(Default)]
struct Cluster {
    stores: Stores,
    local: HashMap<String, FoundPod>,
}

impl Cluster {
    fn pod(&mut self, v: Value) -> &mut Self {
        if v["spec"]["nodeName"] == json!(NODE) {
            self.stores.local_pods.push(watched(v.clone(), None));
        }
        self.stores.pods.push(watched(v, Some(objects::REMOTE_POD_LABELS)));
        self
    }

    fn namespace(&mut self, v: Value) -> &mut Self {
        self.stores.namespaces.push(watched(v, Some(&[ISTIO_MODE, SLUICE_MODE])));
        self
    }

    fn service(&mut self, v: Value) -> &mut Self {
        self.stores.services.push(watched(v, Some(&[])));
        self
    }

    fn slice(&mut self, v: Value) -> &mut Self {
        self.stores.slices.push(watched(v, Some(&["kubernetes.io/service-name"])));
        self
    }

    fn authz(&mut self, v: Value) -> &mut Self {
        self.stores.authorization_policies.push(watched(v, Some(&[])));
        self
    }

    fn peer_authn(&mut self, v: Value) -> &mut Self {
        self.stores.peer_authentications.push(watched(v, Some(&[])));
        self
    }

    /// As `LocalPods` would report pod `n` found in `/proc`.
    fn found(&mut self, n: u32) -> &mut Self {
        let uid = uid(n);
        let found = FoundPod {
            uid: uid.clone(),
            pid: 100 + n,
            netns: PathBuf::from(format!("/proc/{}/ns/net", 100 + n)),
            cgroup: PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{uid}")),
        };
        self.local.insert(uid, found);
        self
    }

    fn build(&self) -> Built {
        build(&self.stores, NODE, &self.local)
    }
}

fn workload(built: &Built, n: u32) -> Option<&Workload> {
    built.inventory.workloads.iter().find(|w| w.uid == uid(n))
}

fn service_named<'a>(built: &'a Built, name: &str) -> Option<&'a state::Service> {
    built.inventory.services.iter().find(|s| s.name == name)
}

fn endpoint_at(svc: &state::Service, addr: &str) -> Endpoint {
    svc.endpoints.iter().find(|e| e.ip == ip(addr)).unwrap_or_else(|| panic!("no endpoint {addr} in {svc:?}")).clone()
}

fn problems_of<'a>(built: &'a Built, object: &str) -> Vec<&'a Problem> {
    built.problems.iter().filter(|p| p.object == object).collect()
}

fn ports(p: &[(u16, u16)]) -> BTreeMap<u16, u16> {
    p.iter().copied().collect()
}

fn mesh() -> Mesh {
    Mesh {
        trust_domain: "cluster.local".into(),
        ca: CaConfig { dir: PathBuf::from("/etc/sluice/ca"), cert_ttl: std::time::Duration::from_secs(3600) },
        root_namespace: "istio-system".into(),
    }
}

fn state_of(inventory: Inventory) -> State {
    State::from_inventory(mesh(), NODE, inventory)
}

// --- objects: serde names and trim -----------------------------------------

#[test]
fn real_objects_decode_into_the_read_fields() {
    let mut v = pod("shop", "web-1", 1, NODE, &["10.1.0.1", "fd00::1"], &[("app", "web")]);
    v["spec"]["hostNetwork"] = json!(true);
    let p: Pod = decode(v);
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(NODE));
    assert_eq!(spec.service_account_name.as_deref(), Some("web"));
    assert_eq!(spec.host_network, Some(true));
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.1.0.1"));
    let ips: Vec<_> = status.pod_ips.iter().flatten().map(|p| p.ip.clone().unwrap()).collect();
    assert_eq!(ips, ["10.1.0.1", "fd00::1"]);

    let mut v = service("shop", "web", &["10.96.0.10", "fd00:96::10"], http_port(json!("http")));
    v["spec"]["internalTrafficPolicy"] = json!("Local");
    let s: Service = decode(v);
    let spec = s.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.cluster_ips.unwrap(), ["10.96.0.10", "fd00:96::10"]);
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
    let port = &spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port, port.protocol.as_deref()), (Some("http"), Some(80), Some("TCP")));
    assert_eq!(port.target_port, Some(json!("http")));

    let e = endpoint("10.1.0.1", false, Some(NODE), Some(("web-1", 1)));
    let s: EndpointSlice = decode(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        json!([e]),
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
    ));
    assert_eq!(s.address_type.as_deref(), Some("IPv4"));
    let e = &s.endpoints.as_ref().unwrap()[0];
    assert_eq!(e.addresses.as_deref(), Some(&["10.1.0.1".to_string()][..]));
    assert_eq!(e.conditions.as_ref().unwrap().ready, Some(false));
    assert_eq!(e.node_name.as_deref(), Some(NODE));
    let target = e.target_ref.as_ref().unwrap();
    assert_eq!((target.kind.as_deref(), target.uid.clone()), (Some("Pod"), Some(uid(1))));
    let p = &s.ports.as_ref().unwrap()[0];
    assert_eq!((p.name.as_deref(), p.port, p.protocol.as_deref()), (Some("http"), Some(8080), Some("TCP")));
}

#[test]
fn missing_and_null_fields_decode() {
    let p: Pod = decode(json!({"metadata": {"name": "p"}, "spec": null, "status": null}));
    assert!(p.spec.is_none() && p.status.is_none());
    let p: Pod = decode(json!({"metadata": {"name": "p", "labels": null},
        "spec": {"nodeName": null, "hostNetwork": null}, "status": {"podIPs": null, "podIP": null, "phase": null}}));
    assert!(p.status.unwrap().pod_ips.is_none());
    let _: Pod = decode(json!({}));
    let _: Service =
        decode(json!({"metadata": {}, "spec": {"ports": [{"port": 80, "targetPort": null}], "clusterIPs": null}}));
    let _: EndpointSlice = decode(
        json!({"metadata": {}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {}}], "ports": null}),
    );
    let ap: AuthorizationPolicy = decode(json!({"metadata": {"name": "a", "namespace": "shop"}}));
    assert_eq!(ap.spec, Value::Null);
    let pa: PeerAuthentication = decode(json!({"metadata": {"name": "a", "namespace": "shop"}, "spec": null}));
    assert_eq!(pa.spec, Value::Null);
    let _: Namespace = decode(json!({"metadata": {"name": "shop"}}));
}

#[test]
fn trim_drops_what_nothing_reads() {
    let mut v = pod(
        "shop",
        "web-5d9c-abcde",
        1,
        NODE,
        &["10.1.0.1"],
        &[("app", "web"), ("pod-template-hash", "5d9c"), ("team", "payments"), (ISTIO_MODE, "ambient")],
    );
    v["metadata"]["finalizers"] = json!(["example.com/hold"]);
    v["metadata"]["ownerReferences"]
        .as_array_mut()
        .unwrap()
        .push(json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "extra", "uid": "x"}));
    v["metadata"]["ownerReferences"].as_array_mut().unwrap().push(
        json!({"apiVersion": "example.com/v1", "kind": "Thing", "name": "not-ctl", "uid": "y", "controller": false}),
    );
    let full: Pod = decode(v.clone());
    assert!(full.metadata.managed_fields.is_some() && full.metadata.annotations.is_some());

    let p: Arc<Pod> = watched(v.clone(), Some(objects::REMOTE_POD_LABELS));
    let m = &p.metadata;
    assert!(m.managed_fields.is_none(), "managedFields dropped");
    assert!(m.annotations.is_none(), "annotations dropped");
    assert!(m.finalizers.is_none());
    let kept: Vec<&str> = objects::labels(m).keys().map(String::as_str).collect();
    assert_eq!(kept, ["app", ISTIO_MODE, "pod-template-hash"], "only the requested labels");
    let owners = m.owner_references.as_ref().unwrap();
    assert_eq!(owners.len(), 1, "only the controller: {owners:?}");
    assert_eq!((owners[0].kind.as_str(), owners[0].name.as_str()), ("ReplicaSet", "web-5d9c"));
    assert!(owners[0].uid.is_empty() && owners[0].api_version.is_empty() && owners[0].block_owner_deletion.is_none());
    // What is read stays.
    assert_eq!(m.uid.as_deref(), Some(uid(1).as_str()));
    assert_eq!((m.name.as_deref(), m.namespace.as_deref()), (Some("web-5d9c-abcde"), Some("shop")));
    assert_eq!(m.resource_version.as_deref(), Some("1001"));
    assert!(m.creation_timestamp.is_some());
    assert_eq!(m.generate_name.as_deref(), Some("web-5d9c-"), "the workload name needs it");
    assert_eq!(super::workload_name(m), "web");

    let local: Arc<Pod> = watched(v, None);
    assert_eq!(objects::labels(&local.metadata).len(), 4, "None keeps every label");
    assert!(local.metadata.annotations.is_none());

    let s: Arc<Service> = watched(service("shop", "web", &["10.96.0.10"], http_port(json!(8080))), Some(&[]));
    assert!(objects::labels(&s.metadata).is_empty() && s.metadata.annotations.is_none());
}

// --- pods -------------------------------------------------------------------

#[test]
fn enrollment_by_namespace_or_pod_label_and_opt_out() {
    let mut c = Cluster::default();
    c.namespace(namespace("amb", &[(ISTIO_MODE, "ambient")]))
        .namespace(namespace("plain", &[]))
        .namespace(namespace("sl", &[(SLUICE_MODE, "enabled")]))
        .pod(pod("amb", "a", 1, NODE, &["10.1.0.1"], &[]))
        .pod(pod("amb", "out", 2, NODE, &["10.1.0.2"], &[(ISTIO_MODE, "none")]))
        .pod(pod("amb", "out-sl", 3, OTHER, &["10.2.0.3"], &[(SLUICE_MODE, "disabled")]))
        .pod(pod("plain", "in", 4, OTHER, &["10.2.0.4"], &[(ISTIO_MODE, "ambient")]))
        .pod(pod("plain", "no", 5, NODE, &["10.1.0.5"], &[]))
        .pod(pod("sl", "s", 6, OTHER, &["10.2.0.6"], &[]))
        .pod(pod("unknown-ns", "u", 7, NODE, &["10.1.0.7"], &[(SLUICE_MODE, "enabled")]));
    let b = c.build();
    assert!(b.problems.is_empty(), "{:?}", b.problems);
    let protocol = |n| workload(&b, n).unwrap().protocol;
    assert_eq!(protocol(1), Protocol::Hbone, "namespace label enrolls");
    assert_eq!(protocol(2), Protocol::Tcp, "pod opt-out wins over the namespace");
    assert_eq!(protocol(3), Protocol::Tcp, "sluice opt-out, on a remote pod (label kept)");
    assert_eq!(protocol(4), Protocol::Hbone, "pod label enrolls a remote pod");
    assert_eq!(protocol(5), Protocol::Tcp, "not enrolled: plaintext");
    assert_eq!(protocol(6), Protocol::Hbone, "sluice namespace label");
    assert_eq!(protocol(7), Protocol::Hbone, "pod label, namespace not listed");
    assert_eq!(b.inventory.workloads.len(), 7);
}

#[test]
fn pods_the_mesh_does_not_route_to_are_left_out_quietly() {
    let mut c = Cluster::default();
    c.namespace(namespace("shop", &[(ISTIO_MODE, "ambient")]));
    let mut host = pod("shop", "host", 1, NODE, &["192.168.0.10"], &[]);
    host["spec"]["hostNetwork"] = json!(true);
    let mut done = pod("shop", "done", 2, NODE, &["10.1.0.2"], &[]);
    done["status"]["phase"] = json!("Succeeded");
    let mut failed = pod("shop", "failed", 3, OTHER, &["10.2.0.3"], &[]);
    failed["status"]["phase"] = json!("Failed");
    let mut unscheduled = pod("shop", "unscheduled", 4, NODE, &[], &[]);
    unscheduled["spec"].as_object_mut().unwrap().remove("nodeName");
    unscheduled["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]});
    let mut empty_node = pod("shop", "empty-node", 5, NODE, &["10.1.0.5"], &[]);
    empty_node["spec"]["nodeName"] = json!("");
    let mut no_ip = pod("shop", "starting", 6, NODE, &[], &[]);
    no_ip["status"]["phase"] = json!("Pending");
    let mut pending = pod("shop", "init", 7, NODE, &["10.1.0.7"], &[]);
    pending["status"]["phase"] = json!("Pending");
    let no_spec = json!({"metadata": {"name": "x", "namespace": "shop", "uid": uid(8)}});
    for v in [host, done, failed, unscheduled, empty_node, no_ip, pending, no_spec] {
        c.pod(v);
    }
    let b = c.build();
    assert!(b.problems.is_empty(), "{:?}", b.problems);
    let uids: Vec<&str> = b.inventory.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(uids, [uid(7)], "only the pending pod that has an address");
}

#[test]
fn dual_stack_pod_addresses() {
    let mut c = Cluster::default();
    c.pod(pod("shop", "web-1", 1, NODE, &["10.1.0.1", "fd00::1"], &[]));
    // IPv4-mapped IPv6 is stored as IPv4; a repeat is taken once.
    c.pod(pod("shop", "web-2", 2, OTHER, &["::ffff:10.2.0.2", "10.2.0.2", "fd00::2"], &[]));
    let b = c.build();
    assert!(b.problems.is_empty(), "{:?}", b.problems);
    assert_eq!(workload(&b, 1).unwrap().ips, [ip("10.1.0.1"), ip("fd00::1")]);
    assert_eq!(workload(&b, 2).unwrap().ips, [ip("10.2.0.2"), ip("fd00::2")]);
}

#[test]
fn a_bad_address_is_a_problem_naming_pod_and_field() {
    let mut c = Cluster::default();
    c.pod(pod("shop", "half", 1, NODE, &["10.1.0.1", "fd00::zz"], &[]))
        .pod(pod("shop", "none-good", 2, OTHER, &["10.2.0.300"], &[]))
        .pod(pod("shop", "fine", 3, OTHER, &["10.2.0.3"], &[]));
    let mut primary = pod("shop", "primary", 4, OTHER, &[], &[]);
    primary["status"]["podIP"] = json!("not-an-ip");
    c.pod(primary);
    let b = c.build();
    assert_eq!(workload(&b, 1).unwrap().ips, [ip("10.1.0.1")], "the good address is kept");
    assert!(workload(&b, 2).is_none() && workload(&b, 4).is_none());
    assert_eq!(workload(&b, 3).unwrap().ips, [ip("10.2.0.3")], "other pods are untouched");

    let half = problems_of(&b, "Pod shop/half");
    assert_eq!(half.len(), 1, "{half:?}");
    assert!(half[0].message.contains("status.podIPs[1].ip") && half[0].message.contains("fd00::zz"), "{half:?}");
    assert_eq!(half[0].resource_version, "1001");
    assert!(!half[0].fatal);
    let none_good = problems_of(&b, "Pod shop/none-good");
    assert_eq!(none_good.len(), 1, "podIP repeats podIPs[0] and is not reported twice: {none_good:?}");
    assert!(none_good[0].message.contains("status.podIPs[0].ip"), "{none_good:?}");
    let p = problems_of(&b, "Pod shop/primary");
    assert!(p.len() == 1 && p[0].message.starts_with("status.podIP:"), "{p:?}");
    assert!(problems_of(&b, "Pod shop/fine").is_empty());
}

#[test]
fn invalid_names_leave_the_pod_out_with_a_problem() {
    let mut c = Cluster::default();
    let mut bad_sa = pod("shop", "bad-sa", 1, NODE, &["10.1.0.1"], &[]);
    bad_sa["spec"]["serviceAccountName"] = json!("Web_Admin");
    let mut slashed = pod("shop", "slashed", 2, OTHER, &["10.2.0.2"], &[]);
    slashed["spec"]["serviceAccountName"] = json!("web/../admin");
    let mut no_sa = pod("shop", "no-sa", 3, OTHER, &["10.2.0.3"], &[]);
    no_sa["spec"].as_object_mut().unwrap().remove("serviceAccountName");
    let mut no_uid = pod("shop", "no-uid", 4, OTHER, &["10.2.0.4"], &[]);
    no_uid["metadata"].as_object_mut().unwrap().remove("uid");
    let mut bad_ns = pod("Shop", "bad-ns", 5, OTHER, &["10.2.0.5"], &[]);
    bad_ns["metadata"]["namespace"] = json!("Shop");
    for v in [bad_sa, slashed, no_sa, no_uid, bad_ns] {
        c.pod(v);
    }
    c.pod(pod("shop", "fine", 6, NODE, &["10.1.0.6"], &[]));
    let b = c.build();
    let uids: Vec<&str> = b.inventory.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(uids, [uid(3), uid(6)]);
    assert_eq!(workload(&b, 3).unwrap().service_account, "default");
    assert_eq!(workload(&b, 6).unwrap().service_account, "web");

    for (object, field) in [
        ("Pod shop/bad-sa", "spec.serviceAccountName"),
        ("Pod shop/slashed", "spec.serviceAccountName"),
        ("Pod shop/no-uid", "metadata"),
        ("Pod Shop/bad-ns", "metadata.namespace"),
    ] {
        // Once, though a local pod is in both stores.
        let p = problems_of(&b, object);
        assert!(p.len() == 1 && p[0].fatal && p[0].message.starts_with(field), "{object}: {:?}", b.problems);
    }
}

#[test]
fn local_pods_keep_all_labels_remote_ones_the_kept_ones() {
    let l = [("app", "web"), ("version", "v2"), ("team", "payments"), ("pod-template-hash", "5d9c")];
    let mut c = Cluster::default();
    c.pod(pod("shop", "web-5d9c-aaaaa", 1, NODE, &["10.1.0.1"], &l)).pod(pod(
        "shop",
        "web-5d9c-bbbbb",
        2,
        OTHER,
        &["10.2.0.2"],
        &l,
    ));
    // On this node but not (yet) in the local store: taken from the cluster-wide one.
    c.stores.pods.push(watched(pod("shop", "lagging", 3, NODE, &["10.1.0.3"], &l), Some(objects::REMOTE_POD_LABELS)));
    assert_eq!((c.stores.local_pods.len(), c.stores.pods.len()), (1, 3));
    let b = c.build();
    assert_eq!(b.inventory.workloads.len(), 3, "the local pod, in both stores, appears once");
    assert_eq!(b.inventory.workloads.iter().filter(|w| w.uid == uid(1)).count(), 1);
    let full: BTreeMap<String, String> = l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(workload(&b, 1).unwrap().labels, full);
    let mut kept = full.clone();
    kept.remove("team");
    assert_eq!(workload(&b, 2).unwrap().labels, kept);
    assert_eq!(workload(&b, 3).unwrap().labels, kept);
    let w = workload(&b, 2).unwrap();
    assert_eq!((w.name.as_str(), w.namespace.as_str(), w.node.as_deref()), ("web-5d9c-bbbbb", "shop", Some(OTHER)));
    assert_eq!(w.workload_name, "web");
}

#[test]
fn netns_and_cgroup_only_for_enrolled_local_pods_found() {
    let mut c = Cluster::default();
    c.namespace(namespace("amb", &[(ISTIO_MODE, "ambient")]))
        .pod(pod("amb", "found", 1, NODE, &["10.1.0.1"], &[]))
        .pod(pod("amb", "not-found", 2, NODE, &["10.1.0.2"], &[]))
        .pod(pod("amb", "opted-out", 3, NODE, &["10.1.0.3"], &[(ISTIO_MODE, "none")]))
        .pod(pod("amb", "remote", 4, OTHER, &["10.2.0.4"], &[]))
        .pod(pod("other", "plain", 5, NODE, &["10.1.0.5"], &[]))
        .found(1)
        .found(3)
        .found(4)
        .found(5);
    let b = c.build();
    let w = workload(&b, 1).unwrap();
    assert_eq!(w.netns, Some(PathBuf::from("/proc/101/ns/net")));
    assert_eq!(w.cgroup, Some(PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{}", uid(1)))));
    for n in 2..=5 {
        let w = workload(&b, n).unwrap();
        assert!(w.netns.is_none() && w.cgroup.is_none(), "{w:?}");
    }
}

#[test]
fn local_enrolled_lists_exactly_the_enrolled_local_pods() {
    let mut c = Cluster::default();
    c.namespace(namespace("amb", &[(ISTIO_MODE, "ambient")]))
        .pod(pod("amb", "a", 1, NODE, &["10.1.0.1"], &[]))
        .pod(pod("amb", "starting", 2, NODE, &[], &[]))
        .pod(pod("amb", "out", 3, NODE, &["10.1.0.3"], &[(ISTIO_MODE, "none")]))
        .pod(pod("amb", "remote", 4, OTHER, &["10.2.0.4"], &[]))
        .pod(pod("plain", "in", 5, NODE, &["10.1.0.5"], &[(SLUICE_MODE, "enabled")]))
        .pod(pod("plain", "no", 6, NODE, &["10.1.0.6"], &[]));
    let mut host = pod("amb", "host", 7, NODE, &["192.168.0.10"], &[]);
    host["spec"]["hostNetwork"] = json!(true);
    let mut done = pod("amb", "done", 8, NODE, &["10.1.0.8"], &[]);
    done["status"]["phase"] = json!("Failed");
    c.pod(host).pod(done);
    let mut wanted = local_enrolled(&c.stores, NODE);
    wanted.sort();
    assert_eq!(wanted, [uid(1), uid(2), uid(5)]);
}

#[test]
fn an_address_claimed_twice_stays_with_one_pod() {
    let mut c = Cluster::default();
    // A node writes a local pod's address into its own pod's status.
    let mut thief = pod("evil", "thief", 1, OTHER, &["10.1.0.2", "10.2.0.1"], &[]);
    thief["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    c.pod(thief).pod(pod("shop", "victim", 2, NODE, &["10.1.0.2"], &[]));
    // A reused address: the old pod is being deleted.
    let mut old = pod("shop", "old", 3, OTHER, &["10.2.0.9"], &[]);
    old["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
    old["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
    c.pod(old).pod(pod("shop", "new", 4, OTHER, &["10.2.0.9"], &[]));
    // Two remote pods, neither being deleted: the older keeps it.
    let mut first = pod("shop", "first", 5, OTHER, &["10.2.0.5"], &[]);
    first["metadata"]["creationTimestamp"] = json!("2025-06-01T00:00:00Z");
    c.pod(pod("shop", "second", 6, OTHER, &["10.2.0.5"], &[])).pod(first);
    let b = c.build();

    assert_eq!(workload(&b, 2).unwrap().ips, [ip("10.1.0.2")]);
    assert_eq!(workload(&b, 1).unwrap().ips, [ip("10.2.0.1")]);
    let p = problems_of(&b, "Pod evil/thief");
    assert!(p.len() == 1 && !p[0].fatal && p[0].message.contains("Pod shop/victim"), "{p:?}");
    assert_eq!(workload(&b, 4).unwrap().ips, [ip("10.2.0.9")]);
    assert!(workload(&b, 3).is_none(), "left out: it had no other address");
    let p = problems_of(&b, "Pod shop/old");
    assert!(p.len() == 1 && p[0].fatal, "{p:?}");
    assert!(workload(&b, 5).is_some() && workload(&b, 6).is_none());

    let state = state_of(b.inventory);
    assert_eq!(state.workload_by_ip(ip("10.1.0.2")).unwrap().uid, uid(2));
}

#[test]
fn the_same_objects_in_any_order_build_the_same_inventory() {
    let mut c = Cluster::default();
    c.namespace(namespace("shop", &[(ISTIO_MODE, "ambient")]));
    for n in 1..=6 {
        let node = if n % 2 == 0 { NODE } else { OTHER };
        c.pod(pod("shop", &format!("web-{n}"), n, node, &[&format!("10.1.0.{n}")], &[]));
    }
    c.pod(pod("shop", "dup", 9, OTHER, &["10.1.0.1"], &[]));
    for s in ["a", "b", "c"] {
        c.service(service(
            "shop",
            s,
            &[&format!("10.96.0.{}", s.len() + s.as_bytes()[0] as usize)],
            http_port(json!(8080)),
        ));
    }
    let port = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let ready = |a: &str, r: bool| endpoint(a, r, None, None);
    c.slice(slice("shop", "a-1", "a", "IPv4", json!([ready("10.1.0.1", true), ready("10.1.0.2", true)]), port.clone()))
        .slice(slice("shop", "a-2", "a", "IPv4", json!([ready("10.1.0.1", false), ready("10.1.0.3", true)]), port));
    let forward = c.build();
    let mut reversed = Cluster::default();
    let s = &c.stores;
    reversed.stores = Stores {
        local_pods: s.local_pods.iter().rev().cloned().collect(),
        pods: s.pods.iter().rev().cloned().collect(),
        namespaces: s.namespaces.clone(),
        services: s.services.iter().rev().cloned().collect(),
        slices: s.slices.iter().rev().cloned().collect(),
        ..Default::default()
    };
    let backward = reversed.build();
    assert_eq!(forward.inventory, backward.inventory);
    let a = service_named(&forward, "a").unwrap();
    assert!(endpoint_at(a, "10.1.0.1").ready, "an address in two slices is taken from the first by name");
}

// --- services ---------------------------------------------------------------

#[test]
fn headless_and_external_name_services_are_skipped() {
    let mut c = Cluster::default();
    c.service(service("shop", "headless", &[], http_port(json!(8080))));
    let mut external = service("shop", "ext", &[], http_port(json!(443)));
    external["spec"] = json!({"type": "ExternalName", "externalName": "example.com", "sessionAffinity": "None"});
    c.service(external);
    c.service(service("shop", "web", &["10.96.0.10"], http_port(json!(8080))));
    let b = c.build();
    let names: Vec<&str> = b.inventory.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    assert!(b.problems.is_empty(), "{:?}", b.problems);
}

#[test]
fn dual_stack_vips_tcp_ports_and_hostname() {
    let mut c = Cluster::default();
    c.service(service(
        "shop",
        "dns",
        &["10.96.0.10", "fd00:96::a"],
        json!([
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            {"name": "sctp", "port": 9, "protocol": "SCTP", "targetPort": 9},
            {"name": "metrics", "port": 9153, "targetPort": 9153},
        ]),
    ));
    let b = c.build();
    let s = service_named(&b, "dns").unwrap();
    assert_eq!(s.vips, [ip("10.96.0.10"), ip("fd00:96::a")]);
    assert_eq!(s.ports, [53, 9153], "UDP and SCTP left out; a missing protocol is TCP");
    assert_eq!(s.hostname, "dns.shop.svc.cluster.local");
    assert_eq!(s.traffic_policy, TrafficPolicy::Cluster);
    assert_eq!(s.namespace, "shop");
}

#[test]
fn bad_vips_and_ports_are_problems_naming_the_field() {
    let mut c = Cluster::default();
    c.service(service(
        "shop",
        "web",
        &["10.96.0.10", "fd00::gg"],
        json!([{"name": "http", "port": 80}, {"name": "big", "port": 70000}, {"name": "none"}]),
    ));
    let mut only_bad = service("shop", "bad", &["10.96.0.999"], http_port(json!(80)));
    only_bad["spec"]["clusterIP"] = json!("10.96.0.999");
    c.service(only_bad);
    let b = c.build();
    let web = service_named(&b, "web").unwrap();
    assert_eq!((web.vips.clone(), web.ports.clone()), (vec![ip("10.96.0.10")], vec![80]));
    let p = problems_of(&b, "Service shop/web");
    let messages: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("spec.clusterIPs[1]:")), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("spec.ports[1].port: 70000")), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("spec.ports[2].port: missing")), "{messages:?}");
    assert!(service_named(&b, "bad").is_none(), "no VIP left: skipped");
    assert_eq!(problems_of(&b, "Service shop/bad").len(), 1, "clusterIP repeats clusterIPs[0]");
}

#[test]
fn named_target_ports_resolve_per_slice() {
    let mut c = Cluster::default();
    c.service(service(
        "shop",
        "web",
        &["10.96.0.10"],
        json!([
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"},
            {"name": "admin", "port": 9000, "protocol": "TCP", "targetPort": "admin"},
        ]),
    ));
    // v1 pods call their port "web" 8080, v2 pods 9090; v2 has no "admin".
    c.slice(slice(
        "shop",
        "web-v1",
        "web",
        "IPv4",
        json!([endpoint("10.1.0.1", true, Some(NODE), None)]),
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "admin", "port": 9001, "protocol": "TCP"}]),
    ))
    .slice(slice(
        "shop",
        "web-v2",
        "web",
        "IPv4",
        json!([endpoint("10.2.0.2", true, Some(OTHER), None)]),
        json!([{"name": "http", "port": 9090, "protocol": "TCP"}]),
    ));
    let b = c.build();
    let s = service_named(&b, "web").unwrap();
    assert_eq!(s.ports, [80, 9000]);
    assert_eq!(endpoint_at(s, "10.1.0.1").target_ports, ports(&[(80, 8080), (9000, 9001)]));
    assert_eq!(endpoint_at(s, "10.2.0.2").target_ports, ports(&[(80, 9090)]), "admin is not served there");
    let state = state_of(b.inventory);
    let svc = state.service_by_vip(ip("10.96.0.10")).unwrap();
    assert_eq!(svc.pick(9000, NODE), Ok(SocketAddr::new(ip("10.1.0.1"), 9001)));
}

#[test]
fn an_unnamed_single_port_matches_the_slices_unnamed_port() {
    let mut c = Cluster::default();
    c.service(service("shop", "web", &["10.96.0.10"], json!([{"port": 80, "protocol": "TCP", "targetPort": 8080}])));
    c.slice(slice(
        "shop",
        "web-1",
        "web",
        "IPv4",
        json!([endpoint("10.1.0.1", true, None, None)]),
        json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
    ));
    // A slice written by another controller may leave the name out.
    c.slice(slice(
        "shop",
        "web-2",
        "web",
        "IPv4",
        json!([endpoint("10.1.0.2", true, None, None)]),
        json!([{"port": 8081}]),
    ));
    let b = c.build();
    let s = service_named(&b, "web").unwrap();
    assert_eq!(endpoint_at(s, "10.1.0.1").target_ports, ports(&[(80, 8080)]));
    assert_eq!(endpoint_at(s, "10.1.0.2").target_ports, ports(&[(80, 8081)]));
}

#[test]
fn readiness_of_endpoints() {
    let mut c = Cluster::default();
    c.service(service("shop", "web", &["10.96.0.10"], http_port(json!(8080))));
    let mut no_ready = endpoint("10.1.0.3", true, None, None);
    no_ready["conditions"] = json!({"serving": true});
    let mut no_conditions = endpoint("10.1.0.4", true, None, None);
    no_conditions.as_object_mut().unwrap().remove("conditions");
    let mut terminating = endpoint("10.1.0.5", false, None, None);
    terminating["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    c.slice(slice(
        "shop",
        "web-1",
        "web",
        "IPv4",
        json!([
            endpoint("10.1.0.1", true, None, None),
            endpoint("10.1.0.2", false, None, None),
            no_ready,
            no_conditions,
            terminating
        ]),
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
    ));
    let b = c.build();
    let s = service_named(&b, "web").unwrap();
    let ready: Vec<(IpAddr, bool)> = s.endpoints.iter().map(|e| (e.ip, e.ready)).collect();
    assert_eq!(
        ready,
        [
            (ip("10.1.0.1"), true),
            (ip("10.1.0.2"), false),
            (ip("10.1.0.3"), true),
            (ip("10.1.0.4"), true),
            (ip("10.1.0.5"), false)
        ]
    );
}

#[test]
fn slices_are_read_once_per_address_and_only_for_addresses() {
    let mut c = Cluster::default();
    c.service(service("shop", "web", &["10.96.0.10", "fd00:96::10"], http_port(json!(8080))));
    let port = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    c.slice(slice("shop", "web-a", "web", "IPv4", json!([endpoint("10.1.0.1", true, Some(NODE), None)]), port.clone()))
        // Moving between slices: listed in both.
        .slice(slice(
            "shop",
            "web-b",
            "web",
            "IPv4",
            json!([endpoint("10.1.0.1", false, Some(NODE), None), endpoint("10.1.0.2", true, None, None)]),
            port.clone(),
        ))
        .slice(slice("shop", "web-v6", "web", "IPv6", json!([endpoint("fd00::1", true, None, None)]), port.clone()))
        .slice(slice(
            "shop",
            "web-fqdn",
            "web",
            "FQDN",
            json!([endpoint("db.example.com", true, None, None)]),
            port.clone(),
        ))
        // Same service name, other namespace; and another service.
        .slice(slice("other", "web-x", "web", "IPv4", json!([endpoint("10.9.0.1", true, None, None)]), port.clone()))
        .slice(slice("shop", "api-x", "api", "IPv4", json!([endpoint("10.9.0.2", true, None, None)]), port.clone()));
    // Only the first address of an endpoint has a meaning.
    let mut multi = endpoint("10.1.0.7", true, None, None);
    multi["addresses"] = json!(["10.1.0.7", "10.1.0.8"]);
    c.slice(slice("shop", "web-c", "web", "IPv4", json!([multi, endpoint("10.1.0.999", true, None, None)]), port));
    let b = c.build();
    let s = service_named(&b, "web").unwrap();
    let ips: Vec<IpAddr> = s.endpoints.iter().map(|e| e.ip).collect();
    assert_eq!(ips, [ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.7"), ip("fd00::1")]);
    assert!(endpoint_at(s, "10.1.0.1").ready, "taken from web-a, the first slice by name");
    let p = problems_of(&b, "EndpointSlice shop/web-c");
    assert!(p.len() == 1 && p[0].message.starts_with("endpoints[1].addresses[0]:") && !p[0].fatal, "{p:?}");
    assert!(problems_of(&b, "EndpointSlice shop/web-fqdn").is_empty(), "FQDN slices are not read");
}

#[test]
fn endpoints_know_their_workload_and_node() {
    let mut c = Cluster::default();
    c.namespace(namespace("shop", &[(ISTIO_MODE, "ambient")]))
        .pod(pod("shop", "web-1", 1, NODE, &["10.1.0.1", "fd00::1"], &[]))
        .pod(pod("shop", "web-2", 2, OTHER, &["10.2.0.2"], &[]));
    let mut host = pod("shop", "host", 3, OTHER, &["192.168.0.11"], &[]);
    host["spec"]["hostNetwork"] = json!(true);
    c.pod(host);
    c.service(service("shop", "web", &["10.96.0.10"], http_port(json!(8080))));
    let port = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    c.slice(slice(
        "shop",
        "web-4",
        "web",
        "IPv4",
        json!([
            endpoint("10.1.0.1", true, Some(NODE), Some(("web-1", 1))),
            endpoint("10.2.0.2", true, None, Some(("web-2", 2))),
            endpoint("192.168.0.11", true, Some(OTHER), Some(("host", 3))),
            endpoint("10.3.0.3", true, None, None),
        ]),
        port.clone(),
    ))
    .slice(slice("shop", "web-6", "web", "IPv6", json!([endpoint("fd00::1", true, Some(NODE), None)]), port));
    let b = c.build();
    let s = service_named(&b, "web").unwrap();
    let e = endpoint_at(s, "10.1.0.1");
    assert_eq!((e.workload_uid, e.node.as_deref()), (Some(uid(1)), Some(NODE)));
    assert_eq!(endpoint_at(s, "fd00::1").workload_uid, Some(uid(1)), "by any of the pod's addresses");
    let e = endpoint_at(s, "10.2.0.2");
    assert_eq!((e.workload_uid, e.node.as_deref()), (Some(uid(2)), Some(OTHER)), "node from the workload");
    let e = endpoint_at(s, "192.168.0.11");
    assert_eq!((e.workload_uid, e.node.as_deref()), (None, Some(OTHER)), "host-network pods are no workload");
    let e = endpoint_at(s, "10.3.0.3");
    assert_eq!((e.workload_uid, e.node), (None, None));
}

#[test]
fn internal_traffic_policy_local() {
    let mut c = Cluster::default();
    let mut v = service("shop", "web", &["10.96.0.10"], http_port(json!(8080)));
    v["spec"]["internalTrafficPolicy"] = json!("Local");
    c.service(v);
    c.slice(slice(
        "shop",
        "web-1",
        "web",
        "IPv4",
        json!([endpoint("10.2.0.2", true, Some(OTHER), None), endpoint("10.1.0.1", true, Some(NODE), None)]),
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
    ));
    let b = c.build();
    assert_eq!(service_named(&b, "web").unwrap().traffic_policy, TrafficPolicy::Local);
    let state = state_of(b.inventory);
    let svc = state.service_by_vip(ip("10.96.0.10")).unwrap();
    for _ in 0..20 {
        assert_eq!(svc.pick(80, NODE), Ok(SocketAddr::new(ip("10.1.0.1"), 8080)));
    }
}

// --- policies ---------------------------------------------------------------

#[test]
fn authorization_policies_translate_and_fail_closed() {
    let mut c = Cluster::default();
    c.namespace(namespace("shop", &[(ISTIO_MODE, "ambient")]))
        .pod(pod("shop", "web-1", 1, NODE, &["10.1.0.1"], &[("app", "web")]))
        .pod(pod("other", "x", 2, NODE, &["10.1.0.2"], &[]));
    let t = "2026-01-01T00:00:00Z";
    c.authz(policy(
        "AuthorizationPolicy",
        "shop",
        "allow-ns",
        t,
        json!({"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
    ))
    .authz(policy("AuthorizationPolicy", "shop", "broken", t, json!({"action": "ALOW"})))
    .authz(policy("AuthorizationPolicy", "shop", "not-object", t, json!(["rules"])))
    .authz(policy(
        "AuthorizationPolicy",
        "shop",
        "ext-authz",
        t,
        json!({"action": "CUSTOM", "provider": {"name": "opa"}}),
    ))
    .authz(policy("AuthorizationPolicy", "shop", "audit", t, json!({"action": "AUDIT"})));
    let b = c.build();
    let names: Vec<&str> = b.inventory.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["allow-ns", "broken", "not-object"], "CUSTOM and AUDIT skipped");
    for name in ["broken", "not-object"] {
        let p = b.inventory.policies.iter().find(|p| p.name == name).unwrap();
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.action, Action::Deny);
        assert_eq!(p.selector, None);
        assert_eq!(p.rules, [state::Rule::default()], "one empty rule: matches everything");
        let problems = problems_of(&b, &format!("AuthorizationPolicy shop/{name}"));
        assert!(problems.len() == 1 && problems[0].fatal, "{problems:?}");
        assert!(problems[0].message.contains("spec") && problems[0].message.contains("DENY"), "{problems:?}");
    }
    for name in ["ext-authz", "audit"] {
        let problems = problems_of(&b, &format!("AuthorizationPolicy shop/{name}"));
        assert!(problems.len() == 1 && !problems[0].fatal, "{problems:?}");
        assert!(problems[0].message.contains("spec.action"), "{problems:?}");
    }

    let state = state_of(b.inventory);
    let from_shop = Source::authenticated("cluster.local/ns/shop/sa/web", ip("10.1.0.9"));
    fn conn<'a>(src: &'a Source, dst: &'a Workload) -> Conn<'a> {
        Conn { src, dst, dst_addr: SocketAddr::new(dst.ips[0], 8080) }
    }
    let web = state.workload_by_uid(&uid(1)).unwrap();
    assert!(
        matches!(authorize_conn(&state, &conn(&from_shop, &web)), Decision::Deny { policy } if policy == "shop/broken")
    );
    let other = state.workload_by_uid(&uid(2)).unwrap();
    assert_eq!(authorize_conn(&state, &conn(&from_shop, &other)), Decision::Allow, "the deny stays in its namespace");
}

#[test]
fn peer_authentications_fail_closed_to_namespace_strict() {
    let mut c = Cluster::default();
    c.pod(pod("shop", "web-1", 1, NODE, &["10.1.0.1"], &[("app", "web")])).pod(pod(
        "other",
        "x",
        2,
        NODE,
        &["10.1.0.2"],
        &[],
    ));
    // The older, readable namespace-wide PERMISSIVE must not win over the
    // STRICT that stands for the unreadable one.
    c.peer_authn(policy(
        "PeerAuthentication",
        "shop",
        "permissive",
        "2025-01-01T00:00:00Z",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    ))
    .peer_authn(policy(
        "PeerAuthentication",
        "shop",
        "broken",
        "2026-01-01T00:00:00Z",
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICTER"}}),
    ))
    .peer_authn(policy(
        "PeerAuthentication",
        "other",
        "ok",
        "2026-01-01T00:00:00Z",
        json!({"mtls": {"mode": "DISABLE"}}),
    ));
    let b = c.build();
    let broken = b.inventory.peer_authentications.iter().find(|p| p.name == "broken").unwrap();
    assert_eq!((broken.namespace.as_str(), broken.mode, &broken.selector), ("shop", MtlsMode::Strict, &None));
    assert!(broken.port_level_mtls.is_empty());
    let problems = problems_of(&b, "PeerAuthentication shop/broken");
    assert!(problems.len() == 1 && problems[0].fatal && problems[0].message.contains("spec.mtls"), "{problems:?}");
    assert_eq!(b.inventory.peer_authentications.len(), 3);

    let state = state_of(b.inventory);
    let web = state.workload_by_uid(&uid(1)).unwrap();
    assert!(plaintext_allowed(&state, &web, 8080).is_err(), "namespace STRICT");
    let other = state.workload_by_uid(&uid(2)).unwrap();
    assert!(plaintext_allowed(&state, &other, 8080).is_ok());
}

#[test]
fn policies_are_ordered_oldest_first() {
    let mut c = Cluster::default();
    let allow = json!({"action": "ALLOW"});
    c.authz(policy("AuthorizationPolicy", "shop", "newest", "2026-03-01T00:00:00Z", allow.clone()))
        .authz(policy("AuthorizationPolicy", "shop", "oldest", "2024-01-01T00:00:00Z", allow.clone()))
        .authz(policy("AuthorizationPolicy", "shop", "b-tie", "2025-01-01T00:00:00Z", allow.clone()))
        .authz(policy("AuthorizationPolicy", "shop", "a-tie", "2025-01-01T00:00:00Z", allow));
    let mtls = |mode: &str| json!({"mtls": {"mode": mode}});
    c.peer_authn(policy("PeerAuthentication", "shop", "later", "2026-01-01T00:00:00Z", mtls("DISABLE")))
        .peer_authn(policy("PeerAuthentication", "shop", "earlier", "2025-01-01T00:00:00Z", mtls("STRICT")));
    let b = c.build();
    let names: Vec<&str> = b.inventory.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["oldest", "a-tie", "b-tie", "newest"]);
    let names: Vec<&str> = b.inventory.peer_authentications.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["earlier", "later"]);
    assert!(b.problems.is_empty(), "{:?}", b.problems);
}

#[test]
fn pods_with_an_istio_sidecar_are_not_captured_again() {
    let mut pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "legacy", "namespace": "shop", "uid": "3f2e3d4c-5b6a-4789-8abc-def012345678",
            "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}", "other": "x"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "legacy"},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.1.0.9"}]},
    }))
    .unwrap();
    super::objects::trim(&mut pod.metadata, None);
    assert_eq!(pod.metadata.annotations.as_ref().map(|a| a.len()), Some(1), "only the sidecar mark is kept");
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}))
    .unwrap();
    let stores = Stores { local_pods: vec![Arc::new(pod)], namespaces: vec![Arc::new(ns)], ..Default::default() };
    let built = super::build(&stores, "node-a", &Default::default());
    let w = built.inventory.workloads.iter().find(|w| w.name == "legacy").expect("the pod is known");
    assert_eq!(w.protocol, crate::state::Protocol::Tcp, "a sidecar pod in an ambient namespace is not enrolled");
    assert!(super::local_enrolled(&stores, "node-a").is_empty());
}
