//! `State`: an immutable, indexed view of one config for one node. The data
//! path holds an `Arc<State>` per connection, so a reload never changes the
//! answers a connection already got.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::authz::AuthorizationPolicy;
use super::config::{CaConfig, Config};
use super::diff::StateDiff;
use super::error::ConfigError;
use super::workload::Workload;

#[derive(Debug, Clone)]
pub struct State {
    trust_domain: String,
    node: String,
    ca: CaConfig,
    generation: u64,
    // BTreeMap so that listings and diffs come out in a stable order.
    by_uid: BTreeMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    policies_by_namespace: HashMap<String, Vec<Arc<AuthorizationPolicy>>>,
}

impl State {
    /// Indexes `config` for `node`. Validates it again, including the rules
    /// that depend on the node, so a `State` always satisfies them even when
    /// the config was built in code.
    pub fn from_config(config: &Config, node: &str) -> Result<State, ConfigError> {
        config.check(Some(node))?;

        let mut by_uid = BTreeMap::new();
        let mut by_ip = HashMap::new();
        for w in &config.workloads {
            let workload = Arc::new(Workload {
                uid: w.uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                ips: w.workload_ips.iter().map(IpAddr::to_canonical).collect(),
                node: w.node.clone(),
                protocol: w.protocol,
                netns: w.netns.clone(),
                cgroup: w.cgroup.clone(),
            });
            for ip in &workload.ips {
                by_ip.insert(*ip, Arc::clone(&workload));
            }
            by_uid.insert(workload.uid.clone(), workload);
        }

        let mut policies_by_namespace: HashMap<String, Vec<Arc<AuthorizationPolicy>>> = HashMap::new();
        for p in &config.policies {
            policies_by_namespace.entry(p.namespace.clone()).or_default().push(Arc::new(p.clone()));
        }

        Ok(State {
            trust_domain: config.trust_domain.clone(),
            node: node.to_string(),
            ca: config.ca.clone(),
            generation: 0,
            by_uid,
            by_ip,
            policies_by_namespace,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The node this state was validated for.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn ca(&self) -> &CaConfig {
        &self.ca
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

    /// What changed for `node`'s workloads between two states.
    pub fn diff(old: &State, new: &State, node: &str) -> StateDiff {
        StateDiff::between(old, new, node)
    }
}
