//! `State`: an immutable, indexed view of one config for one node. The data
//! path holds an `Arc<State>` per connection, so a reload never changes the
//! answers a connection already got.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::authz::{AuthorizationPolicy, PeerAuthentication};
use super::config::{CaConfig, Config};
use super::diff::StateDiff;
use super::error::ConfigError;
use super::service::{Endpoint, Service};
use super::workload::Workload;

#[derive(Debug, Clone)]
pub struct State {
    mesh: Mesh,
    node: String,
    generation: u64,
    // BTreeMap so that listings and diffs come out in a stable order.
    by_uid: BTreeMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: Vec<Arc<Service>>,
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    policies_by_namespace: HashMap<String, Vec<Arc<AuthorizationPolicy>>>,
    peer_authns_by_namespace: HashMap<String, Vec<Arc<PeerAuthentication>>>,
}

/// Mesh-wide settings, from the config file whatever the workload source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub trust_domain: String,
    pub ca: CaConfig,
    pub root_namespace: String,
}

/// Everything a source (the file, or the Kubernetes API) knows, before
/// indexing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inventory {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
}

impl State {
    /// Indexes `config` for `node`. Validates it again, including the rules
    /// that depend on the node, so a `State` always satisfies them even when
    /// the config was built in code.
    pub fn from_config(config: &Config, node: &str) -> Result<State, ConfigError> {
        config.check(Some(node))?;
        let workloads: Vec<Workload> = config
            .workloads
            .iter()
            .map(|w| Workload {
                uid: w.uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                ips: w.workload_ips.iter().map(IpAddr::to_canonical).collect(),
                node: w.node.clone(),
                protocol: w.protocol,
                netns: w.netns.clone(),
                cgroup: w.cgroup.clone(),
                labels: w.labels.clone(),
                workload_name: w.workload_name.clone().unwrap_or_else(|| w.name.clone()),
            })
            .collect();
        let services = config
            .services
            .iter()
            .map(|s| {
                let key = s.key();
                let endpoints = config
                    .workloads
                    .iter()
                    .filter_map(|w| w.services.get(&key).map(|ports| (w, ports)))
                    .flat_map(|(w, ports)| {
                        let target_ports: BTreeMap<u16, u16> =
                            s.ports.iter().map(|(port, target)| (*port, *ports.get(port).unwrap_or(target))).collect();
                        w.workload_ips.iter().map(move |ip| Endpoint {
                            ip: ip.to_canonical(),
                            workload_uid: Some(w.uid.clone()),
                            node: w.node.clone(),
                            ready: true,
                            target_ports: target_ports.clone(),
                        })
                    })
                    .collect();
                Service {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    hostname: s.hostname.clone(),
                    vips: s.vips.clone(),
                    ports: s.ports.keys().copied().collect(),
                    traffic_policy: s.internal_traffic_policy,
                    endpoints,
                }
            })
            .collect();
        let mesh = config.mesh();
        let inventory = Inventory {
            workloads,
            services,
            policies: config.policies.clone(),
            peer_authentications: config.peer_authentications.clone(),
        };
        Ok(State::from_inventory(mesh, node, inventory))
    }

    /// Indexes what a source knows. The source has validated it.
    pub fn from_inventory(mesh: Mesh, node: &str, inventory: Inventory) -> State {
        let mut by_uid = BTreeMap::new();
        let mut by_ip = HashMap::new();
        for w in inventory.workloads {
            let workload = Arc::new(w);
            for ip in &workload.ips {
                by_ip.insert(ip.to_canonical(), Arc::clone(&workload));
            }
            by_uid.insert(workload.uid.clone(), workload);
        }
        let services: Vec<Arc<Service>> = inventory.services.into_iter().map(Arc::new).collect();
        let mut services_by_vip = HashMap::new();
        for s in &services {
            for vip in &s.vips {
                services_by_vip.insert(vip.to_canonical(), Arc::clone(s));
            }
        }
        let mut policies_by_namespace: HashMap<String, Vec<Arc<AuthorizationPolicy>>> = HashMap::new();
        for p in inventory.policies {
            policies_by_namespace.entry(p.namespace.clone()).or_default().push(Arc::new(p));
        }
        let mut peer_authns_by_namespace: HashMap<String, Vec<Arc<PeerAuthentication>>> = HashMap::new();
        for p in inventory.peer_authentications {
            peer_authns_by_namespace.entry(p.namespace.clone()).or_default().push(Arc::new(p));
        }
        State {
            mesh,
            node: node.to_string(),
            generation: 0,
            by_uid,
            by_ip,
            services,
            services_by_vip,
            policies_by_namespace,
            peer_authns_by_namespace,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.mesh.trust_domain
    }

    /// Istio's root namespace: policies there apply mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.mesh.root_namespace
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// The node this state was validated for.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn ca(&self) -> &CaConfig {
        &self.mesh.ca
    }

    /// 0 for the state loaded at start, then +1 for each reload the watcher
    /// publishes; the agent exports it as its reload count.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn with_generation(mut self, generation: u64) -> State {
        self.generation = generation;
        self
    }

    /// IPv4-mapped IPv6 addresses find the IPv4 workload, since that is how
    /// IPv4 peers appear on dual-stack sockets.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical()).cloned()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.by_uid.get(uid).cloned()
    }

    /// All workloads, ordered by uid.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_uid.values()
    }

    /// The workloads on `node`, ordered by uid.
    pub fn local_workloads(&self, node: &str) -> Vec<Arc<Workload>> {
        self.by_uid.values().filter(|w| w.is_on_node(node)).cloned().collect()
    }

    /// Policies declared in `namespace`, in file order.
    pub fn policies_in(&self, namespace: &str) -> &[Arc<AuthorizationPolicy>] {
        self.policies_by_namespace.get(namespace).map(Vec::as_slice).unwrap_or(&[])
    }

    /// PeerAuthentications declared in `namespace`.
    pub fn peer_authentications_in(&self, namespace: &str) -> &[Arc<PeerAuthentication>] {
        self.peer_authns_by_namespace.get(namespace).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The service whose virtual IP is `ip`, if any.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.services_by_vip.get(&ip.to_canonical()).cloned()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter()
    }

    /// What changed for `node`'s workloads between two states.
    pub fn diff(old: &State, new: &State, node: &str) -> StateDiff {
        StateDiff::between(old, new, node)
    }
}
