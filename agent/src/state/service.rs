//! Services: a virtual IP and port that stand for a set of endpoints.
//!
//! Apps dial a Service's ClusterIP, and capture sees that address before
//! kube-proxy could rewrite it, so the agent resolves it itself: VIP:port →
//! one ready endpoint → its target port, then the same choice as for a pod
//! address (HBONE, splice, or plaintext to a pod outside the mesh).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};

/// A service as written in the local config file, in the shape of
/// ztunnel's local config. Its endpoints are the workloads that list it in
/// their own `services` map.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub namespace: String,
    /// e.g. `httpbin.default.svc.cluster.local`; workloads refer to the
    /// service as `<namespace>/<hostname>`.
    pub hostname: String,
    /// ClusterIPs, written `10.96.0.10` or, as ztunnel writes them,
    /// `<network>/10.96.0.10`.
    #[serde(deserialize_with = "deserialize_vips")]
    pub vips: Vec<IpAddr>,
    /// Service port → the target port endpoints use unless they say otherwise.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// `Local`: only endpoints on the client's node (Kubernetes'
    /// `internalTrafficPolicy`); `Cluster` (the default): any.
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl ServiceConfig {
    /// How workloads name this service in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

fn deserialize_vips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    let raw: Vec<String> = Vec::deserialize(d)?;
    raw.iter()
        .map(|v| {
            let ip = v.rsplit_once('/').map_or(v.as_str(), |(_network, ip)| ip);
            ip.parse::<IpAddr>().map(|ip| ip.to_canonical()).map_err(|e| {
                serde::de::Error::custom(format!("vip {v:?}: {e}; expected an IP address or <network>/<ip>"))
            })
        })
        .collect()
}

/// A service as the data path sees it, whatever the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub traffic_policy: TrafficPolicy,
    pub endpoints: Vec<Endpoint>,
}

/// One address behind a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The pod's uid, when the endpoint is a known workload.
    pub workload_uid: Option<String>,
    pub node: Option<String>,
    pub ready: bool,
    /// Service port → the port this endpoint serves it on. A port missing
    /// here is one this endpoint does not serve (a named targetPort the pod
    /// does not declare).
    pub target_ports: BTreeMap<u16, u16>,
}

/// Why a service address has no endpoint to go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoEndpoint {
    /// The service does not expose this port.
    UnknownPort,
    /// No endpoint is ready for this port (on this node, for `Local`).
    NoneReady,
}

impl fmt::Display for NoEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoEndpoint::UnknownPort => "the service has no such port",
            NoEndpoint::NoneReady => "no ready endpoint",
        })
    }
}

impl Service {
    /// `namespace/name`, for logs and metrics.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Picks one ready endpoint for `port` at random, from those on `node`
    /// only when the service says `Local`; returns its address and port.
    pub fn pick(&self, port: u16, node: &str) -> Result<SocketAddr, NoEndpoint> {
        if !self.ports.contains(&port) {
            return Err(NoEndpoint::UnknownPort);
        }
        let local_only = self.traffic_policy == TrafficPolicy::Local;
        let candidates: Vec<(IpAddr, u16)> = self
            .endpoints
            .iter()
            .filter(|e| e.ready && (!local_only || e.node.as_deref() == Some(node)))
            .filter_map(|e| e.target_ports.get(&port).map(|t| (e.ip, *t)))
            .collect();
        if candidates.is_empty() {
            return Err(NoEndpoint::NoneReady);
        }
        let (ip, target) = candidates[fastrand::usize(..candidates.len())];
        Ok(SocketAddr::new(ip, target))
    }
}
