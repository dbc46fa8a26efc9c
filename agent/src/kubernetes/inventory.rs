//! Turns what the reflectors hold into the `Inventory` the rest of the agent
//! knows (the same one the local file yields). Pure: no I/O, so every rule
//! here is unit-tested, and a rebuild is only CPU.
//!
//! Objects come from the API server and are checked like any input: a pod
//! with an address that does not parse, or a name that is not a DNS label,
//! is left out with a [`Problem`] naming it, and never breaks the others.
//!
//! The stores list objects in no particular order; the inventory is the same
//! whatever the order (the builder publishes only when its fingerprint
//! changes, and which copy of a doubly-listed address wins must not flip).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::inpod::discover::FoundPod;

use crate::policy::istio::{authorization_policy_from_istio, peer_authentication_from_istio};
use crate::state::{self, names, Endpoint, Inventory, Protocol, TrafficPolicy, Workload};

use super::enroll;
use super::local::Hint;
use super::objects::{self, AuthorizationPolicy, EndpointSlice, Namespace, PeerAuthentication, Pod, Service};

/// A snapshot of every store.
#[derive(Default)]
pub struct Stores {
    /// This node's pods (fieldSelector `spec.nodeName`), with all labels.
    pub local_pods: Vec<Arc<Pod>>,
    /// Every pod of the cluster, with [`objects::REMOTE_POD_LABELS`] only.
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
}

/// Something wrong with one object, for the log (once per object version).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// `Pod shop/web-1`
    pub object: String,
    pub resource_version: String,
    pub message: String,
    /// The object was dropped or replaced (error), or kept with caveats.
    pub fatal: bool,
}

pub struct Built {
    pub inventory: Inventory,
    pub problems: Vec<Problem>,
}

/// The Kubernetes cluster domain service hostnames are built under.
const CLUSTER_DOMAIN: &str = "cluster.local";

fn object(kind: &str, meta: &ObjectMeta) -> String {
    match &meta.namespace {
        Some(ns) => format!("{kind} {ns}/{}", meta.name.as_deref().unwrap_or("?")),
        None => format!("{kind} {}", meta.name.as_deref().unwrap_or("?")),
    }
}

/// `Some` only for a non-empty string.
fn non_empty(s: &Option<String>) -> Option<&String> {
    s.as_ref().filter(|s| !s.is_empty())
}

fn problem(kind: &str, meta: &ObjectMeta, message: String, fatal: bool) -> Problem {
    Problem {
        object: object(kind, meta),
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        message,
        fatal,
    }
}

struct Build<'a> {
    stores: &'a Stores,
    node: &'a str,
    ns_labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
    problems: Vec<Problem>,
    cni: Cni<'a>,
}

/// What the CNI plugin reported about this node's pods.
#[derive(Clone, Copy, Default)]
pub struct Cni<'a> {
    /// At ADD, before the API server has the pod's addresses.
    pub hints: Option<&'a HashMap<String, Hint>>,
    /// Deleted (their sandbox is gone) while the API server still lists them.
    pub removed: Option<&'a HashSet<String>>,
}

impl<'a> Build<'a> {
    fn new(stores: &'a Stores, node: &'a str) -> Build<'a> {
        let ns_labels = stores
            .namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, objects::labels(&n.metadata))))
            .collect();
        Build { stores, node, ns_labels, problems: Vec::new(), cni: Cni::default() }
    }

    /// Every pod once: this node's from the local store (full labels), the
    /// others from the cluster-wide one. A pod moving between the two
    /// (scheduled, or the local watch lagging) is taken from whichever has it.
    fn pods(&self) -> impl Iterator<Item = &'a Arc<Pod>> + '_ {
        let local: HashSet<&str> = self.stores.local_pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
        let node = self.node;
        let remote = self.stores.pods.iter().filter(move |p| {
            let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
            !(on_node && p.metadata.uid.as_deref().is_some_and(|u| local.contains(u)))
        });
        self.stores.local_pods.iter().chain(remote)
    }

    /// The pod as a workload; `None` for pods the mesh does not route to:
    /// host-network pods (their address is the node's), finished or not yet
    /// scheduled pods, and pods with no address yet.
    fn workload(&mut self, pod: &Pod, local: &HashMap<String, FoundPod>) -> Option<Workload> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let node = non_empty(&spec.node_name)?.clone();
        let (Some(uid), Some(name), Some(namespace)) =
            (non_empty(&meta.uid), non_empty(&meta.name), non_empty(&meta.namespace))
        else {
            self.problems.push(problem("Pod", meta, "metadata: uid, name or namespace missing".into(), true));
            return None;
        };
        let on_node = node == self.node;
        if on_node && self.cni.removed.is_some_and(|r| r.contains(uid)) {
            return None;
        }
        let service_account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
        let checked =
            names::check_dns_label(namespace).map_err(|e| format!("metadata.namespace: {e}")).and_then(|()| {
                names::check_dns_subdomain(&service_account).map_err(|e| format!("spec.serviceAccountName: {e}"))
            });
        if let Err(e) = checked {
            self.problems.push(problem("Pod", meta, format!("{e}; the pod is left out of the mesh"), true));
            return None;
        }
        let mut ips = Vec::new();
        let listed: Vec<&str> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.as_deref()).collect();
        // podIP repeats podIPs[0] (on any real API server): read only when it says more.
        let primary = status.pod_ip.as_deref().filter(|ip| !listed.contains(ip));
        let written =
            listed.iter().copied().enumerate().map(|(i, ip)| (Some(i), ip)).chain(primary.map(|ip| (None, ip)));
        for (i, ip) in written {
            match ip.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip.to_canonical()) => ips.push(ip.to_canonical()),
                Ok(_) => {}
                Err(_) => {
                    let field = i.map_or("status.podIP".into(), |i| format!("status.podIPs[{i}].ip"));
                    self.problems.push(problem(
                        "Pod",
                        meta,
                        format!("{field}: {ip:?} is not an IP address; ignored"),
                        false,
                    ));
                }
            }
        }
        if ips.is_empty() && on_node {
            if let Some(hint) = self.cni.hints.and_then(|h| h.get(uid)) {
                ips = hint.ips.iter().map(IpAddr::to_canonical).collect();
            }
        }
        if ips.is_empty() {
            return None;
        }
        let labels = objects::labels(meta);
        let enrolled =
            !enroll::has_sidecar(meta) && enroll::is_enrolled(labels, self.ns_labels.get(namespace.as_str()).copied());
        let found = (enrolled && node == self.node).then(|| local.get(uid)).flatten();
        Some(Workload {
            uid: uid.clone(),
            name: name.clone(),
            namespace: namespace.clone(),
            service_account,
            ips,
            node: Some(node),
            protocol: if enrolled { Protocol::Hbone } else { Protocol::Tcp },
            netns: found.map(|f| f.netns.clone()),
            cgroup: found.map(|f| f.cgroup.clone()),
            labels: labels.clone(),
            workload_name: enroll::workload_name(meta),
        })
    }

    fn service(
        &mut self,
        svc: &Service,
        by_ip: &HashMap<IpAddr, &Workload>,
        slices: &HashMap<(&str, &str), Vec<&EndpointSlice>>,
    ) -> Option<state::Service> {
        let meta = &svc.metadata;
        let spec = svc.spec.as_ref()?;
        let (Some(name), Some(namespace)) = (&meta.name, &meta.namespace) else { return None };
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let listed: Vec<&str> = spec.cluster_ips.iter().flatten().map(String::as_str).collect();
        // clusterIP repeats clusterIPs[0]: read only when it says more.
        let primary = spec.cluster_ip.as_deref().filter(|ip| !listed.contains(ip));
        let written =
            listed.iter().copied().enumerate().map(|(i, ip)| (Some(i), ip)).chain(primary.map(|ip| (None, ip)));
        let mut vips = Vec::new();
        for (i, ip) in written {
            if ip.is_empty() || ip == "None" {
                continue;
            }
            match ip.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip.to_canonical()) => vips.push(ip.to_canonical()),
                Ok(_) => {}
                Err(_) => {
                    let field = i.map_or("spec.clusterIP".into(), |i| format!("spec.clusterIPs[{i}]"));
                    self.problems.push(problem(
                        "Service",
                        meta,
                        format!("{field}: {ip:?} is not an IP address; ignored"),
                        false,
                    ))
                }
            }
        }
        // Headless: clients resolve and reach the pods' own addresses.
        if vips.is_empty() {
            return None;
        }
        // (service port, its name) for the TCP ports.
        let mut ports: Vec<(u16, &str)> = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            if !matches!(p.protocol.as_deref(), None | Some("TCP")) {
                continue;
            }
            match p.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0) {
                Some(port) => ports.push((port, p.name.as_deref().unwrap_or(""))),
                None => self.problems.push(problem(
                    "Service",
                    meta,
                    match p.port {
                        Some(n) => format!("spec.ports[{i}].port: {n} is not a port; ignored"),
                        None => format!("spec.ports[{i}].port: missing; ignored"),
                    },
                    false,
                )),
            }
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut seen = HashSet::new();
        for slice in slices.get(&(namespace.as_str(), name.as_str())).into_iter().flatten() {
            let target_ports: BTreeMap<u16, u16> = ports
                .iter()
                .filter_map(|(port, pname)| {
                    let sp = slice.ports.iter().flatten().find(|sp| {
                        sp.name.as_deref().unwrap_or("") == *pname
                            && matches!(sp.protocol.as_deref(), None | Some("TCP"))
                    })?;
                    let target = sp.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0)?;
                    Some((*port, target))
                })
                .collect();
            for (i, e) in slice.endpoints.iter().flatten().enumerate() {
                // The API says: a missing `ready` means ready.
                let ready = e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
                // "No semantics are defined for additional addresses beyond
                // the first, and kube-proxy does not look at them."
                for addr in e.addresses.iter().flatten().take(1) {
                    let Ok(ip) = addr.parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
                        self.problems.push(problem(
                            "EndpointSlice",
                            &slice.metadata,
                            format!("endpoints[{i}].addresses[0]: {addr:?} is not an IP address; ignored"),
                            false,
                        ));
                        continue;
                    };
                    // During a rollout one address can be in two slices: the
                    // first slice by name has it.
                    if !seen.insert(ip) {
                        continue;
                    }
                    let workload = by_ip.get(&ip);
                    endpoints.push(Endpoint {
                        ip,
                        workload_uid: workload.map(|w| w.uid.clone()),
                        node: e.node_name.clone().or_else(|| workload.and_then(|w| w.node.clone())),
                        ready,
                        target_ports: target_ports.clone(),
                    });
                }
            }
        }
        Some(state::Service {
            name: name.clone(),
            namespace: namespace.clone(),
            hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            vips,
            ports: ports.iter().map(|(p, _)| *p).collect(),
            traffic_policy: match spec.internal_traffic_policy.as_deref() {
                Some("Local") => TrafficPolicy::Local,
                _ => TrafficPolicy::Cluster,
            },
            endpoints,
        })
    }
}

/// Each service's address slices (FQDN slices are not addresses), by name so
/// that an address listed twice is always taken from the same one.
fn slices_by_service(stores: &Stores) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in &stores.slices {
        if !matches!(s.address_type.as_deref(), Some("IPv4" | "IPv6")) {
            continue;
        }
        let (Some(namespace), Some(service)) =
            (s.metadata.namespace.as_deref(), objects::labels(&s.metadata).get("kubernetes.io/service-name"))
        else {
            continue;
        };
        by_service.entry((namespace, service.as_str())).or_default().push(s);
    }
    for slices in by_service.values_mut() {
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    by_service
}

/// When pods claim one address (a reused address, the old pod not gone yet;
/// or a node writing another's address into its pods' status), one keeps it,
/// always the same: a pod not being deleted, then one on this node (its
/// status was written by this node's kubelet), then the oldest, then by uid.
/// The others lose it, and are left out if it was their only one.
fn settle_addresses(found: Vec<(Workload, &Pod)>, node: &str, problems: &mut Vec<Problem>) -> Vec<Workload> {
    type Rank<'a> = (bool, bool, Option<&'a Time>, &'a str);
    fn rank<'a>((w, p): &'a (Workload, &Pod), node: &str) -> Rank<'a> {
        let meta = &p.metadata;
        (meta.deletion_timestamp.is_some(), !w.is_on_node(node), meta.creation_timestamp.as_ref(), &w.uid)
    }
    let mut owner: HashMap<IpAddr, usize> = HashMap::new();
    for (i, f) in found.iter().enumerate() {
        for ip in &f.0.ips {
            match owner.entry(*ip) {
                Entry::Vacant(e) => {
                    e.insert(i);
                }
                Entry::Occupied(mut e) => {
                    if rank(f, node) < rank(&found[*e.get()], node) {
                        e.insert(i);
                    }
                }
            }
        }
    }
    let mut lost: Vec<(usize, IpAddr)> = Vec::new();
    for (i, f) in found.iter().enumerate() {
        for ip in &f.0.ips {
            let keeper = owner[ip];
            if keeper != i {
                lost.push((i, *ip));
                let left = f.0.ips.iter().filter(|ip| owner[*ip] == i).count();
                let message = format!(
                    "status.podIPs: {ip} is also the address of {}, which keeps it; {}",
                    object("Pod", &found[keeper].1.metadata),
                    if left == 0 { "the pod is left out" } else { "ignored here" },
                );
                problems.push(problem("Pod", &f.1.metadata, message, left == 0));
            }
        }
    }
    let mut workloads: Vec<Workload> = found.into_iter().map(|(w, _)| w).collect();
    for (i, ip) in lost {
        workloads[i].ips.retain(|x| *x != ip);
    }
    workloads.retain(|w| !w.ips.is_empty());
    workloads
}

/// Istio breaks ties between policies by age, oldest first.
fn by_age<T>(items: &[Arc<T>], meta: impl Fn(&T) -> &ObjectMeta) -> Vec<&Arc<T>> {
    let mut sorted: Vec<&Arc<T>> = items.iter().collect();
    sorted.sort_by(|a, b| {
        let (a, b) = (meta(a), meta(b));
        (a.creation_timestamp.as_ref().map(|t| t.0), &a.namespace, &a.name).cmp(&(
            b.creation_timestamp.as_ref().map(|t| t.0),
            &b.namespace,
            &b.name,
        ))
    });
    sorted
}

/// The uids of this node's pods that are enrolled: those whose netns and
/// cgroup must be found before they can be captured.
pub fn local_enrolled(stores: &Stores, node: &str) -> Vec<String> {
    let b = Build::new(stores, node);
    stores
        .local_pods
        .iter()
        .filter(|p| {
            p.spec.as_ref().is_some_and(|s| s.host_network != Some(true) && s.node_name.as_deref() == Some(node))
        })
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .filter(|p| {
            let ns = p.metadata.namespace.as_deref().and_then(|n| b.ns_labels.get(n)).copied();
            !enroll::has_sidecar(&p.metadata) && enroll::is_enrolled(objects::labels(&p.metadata), ns)
        })
        .filter_map(|p| p.metadata.uid.clone())
        .collect()
}

/// Builds the inventory. `local` maps this node's pod uids to where their
/// netns and cgroup were found; an enrolled local pod not in it is listed
/// without them (and enrolling it waits until it is found).
pub fn build(stores: &Stores, node: &str, local: &HashMap<String, FoundPod>) -> Built {
    build_with(stores, node, local, Cni::default())
}

/// [`build`], with what the CNI plugin reported: addresses for pods the API
/// server has none for yet, and pods whose sandbox is gone.
pub fn build_with(stores: &Stores, node: &str, local: &HashMap<String, FoundPod>, cni: Cni<'_>) -> Built {
    let mut b = Build::new(stores, node);
    b.cni = cni;
    let pods: Vec<&Arc<Pod>> = b.pods().collect();
    let mut found: Vec<(Workload, &Pod)> = Vec::with_capacity(pods.len());
    let mut seen = HashSet::new();
    for pod in pods {
        if let Some(w) = b.workload(pod, local) {
            if seen.insert(w.uid.clone()) {
                found.push((w, pod));
            }
        }
    }
    // The stores list in no particular order: sort what is built, so that a
    // rebuild from the same objects is the same inventory.
    found.sort_by(|a, b| a.0.uid.cmp(&b.0.uid));
    let workloads = settle_addresses(found, node, &mut b.problems);
    let by_ip: HashMap<IpAddr, &Workload> =
        workloads.iter().flat_map(|w| w.ips.iter().map(move |ip| (*ip, w))).collect();
    let slices = slices_by_service(stores);
    let mut services: Vec<state::Service> =
        stores.services.iter().filter_map(|s| b.service(s, &by_ip, &slices)).collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut policies = Vec::new();
    for ap in by_age(&stores.authorization_policies, |p| &p.metadata) {
        let meta = &ap.metadata;
        let (ns, name) = (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""));
        match authorization_policy_from_istio(ns, name, &ap.spec) {
            Ok(t) => {
                for w in t.warnings {
                    b.problems.push(problem("AuthorizationPolicy", meta, w, false));
                }
                policies.extend(t.value);
            }
            Err(e) if names::check_dns_label(ns).is_ok() => {
                // No safe reading: deny its whole scope rather than guess.
                b.problems.push(problem(
                    "AuthorizationPolicy",
                    meta,
                    format!("{e}; enforced as a DENY of every connection in its scope until fixed"),
                    true,
                ));
                policies.push(state::AuthorizationPolicy {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    selector: None,
                    action: state::Action::Deny,
                    rules: vec![state::Rule::default()],
                });
            }
            Err(e) => b.problems.push(problem("AuthorizationPolicy", meta, format!("{e}; ignored"), true)),
        }
    }
    let mut peer_authentications = Vec::new();
    // The stand-ins for unreadable ones go first: of two namespace-wide
    // policies the first wins, and an older PERMISSIVE one must not win over
    // the STRICT that stands for one that cannot be read.
    let mut fail_closed = Vec::new();
    for pa in by_age(&stores.peer_authentications, |p| &p.metadata) {
        let meta = &pa.metadata;
        let (ns, name) = (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""));
        match peer_authentication_from_istio(ns, name, &pa.spec) {
            Ok(p) => peer_authentications.push(p),
            Err(e) if names::check_dns_label(ns).is_ok() => {
                b.problems.push(problem(
                    "PeerAuthentication",
                    meta,
                    format!("{e}; enforced as STRICT for its namespace until fixed"),
                    true,
                ));
                fail_closed.push(state::PeerAuthentication {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    selector: None,
                    mode: state::MtlsMode::Strict,
                    port_level_mtls: BTreeMap::new(),
                });
            }
            Err(e) => b.problems.push(problem("PeerAuthentication", meta, format!("{e}; ignored"), true)),
        }
    }
    fail_closed.extend(peer_authentications);
    let peer_authentications = fail_closed;
    Built { inventory: Inventory { workloads, services, policies, peer_authentications }, problems: b.problems }
}
