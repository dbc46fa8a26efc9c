//! The three listeners every enrolled pod gets, inside its own netns:
//! - `outbound` (15001): the pod's own outgoing connections, captured.
//! - `inbound` (15008): HBONE from other pods' agents.
//! - `inbound_plaintext` (15006): plain TCP from clients outside the mesh.
//!
//! `Ctx` is what they share across pods; `PodCtx` what belongs to one pod.

mod accept;
mod copy;
pub mod inbound;
pub mod inbound_plaintext;
pub mod outbound;
mod own_ports;
mod registry;
mod services;
mod socket;
pub mod splice;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

use rustls::RootCertStore;
use tokio::sync::watch;

use crate::{
    bpf::SpliceMaps,
    identity::{CertCache, SpiffeId},
    metrics::{ConnLabels, Metrics},
    netns::Netns,
    state::{Service, State, Workload},
    tunnel::pool::Pool,
};

pub use inbound_plaintext::Arrival;
pub use registry::revalidate;
pub use socket::{connect_app, listen_both};

/// Node-wide: config state, certificates, the HBONE pool, metrics.
pub struct Ctx {
    pub state: watch::Receiver<Arc<State>>,
    pub certs: Arc<CertCache>,
    pub roots: Arc<RootCertStore>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// Connections being proxied now, so shutdown can wait for them.
    pub active: AtomicUsize,
    /// Of those, spliced connections the keeper holds: they outlive this
    /// process, so shutdown neither waits for them nor lets destructors
    /// half-close them (run.rs).
    pub kept: AtomicUsize,
    /// Same-node splice maps; `None` when capture is not eBPF or the
    /// operator turned the splice off.
    pub splice: Option<SpliceMaps>,
    /// Holds spliced connections' sockets beyond this process, if configured.
    pub keeper: Option<crate::keeper::Keeper>,
    /// Pods enrolled on this agent, by address, for the same-node path.
    pub local_pods: RwLock<HashMap<IpAddr, Arc<PodCtx>>>,
}

impl Ctx {
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    pub fn track(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(&self.active)
    }

    /// The enrolled pod on this node that owns `ip`, if any.
    pub fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodCtx>> {
        self.local_pods.read().unwrap_or_else(|e| e.into_inner()).get(&canonical_ip(ip)).cloned()
    }

    pub fn spiffe_id(&self, w: &Workload) -> anyhow::Result<SpiffeId> {
        let state = self.state();
        Ok(SpiffeId::new(state.trust_domain(), &w.namespace, &w.service_account)?)
    }
}

pub struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One enrolled pod: its workload, netns, identity and TLS server config.
pub struct PodCtx {
    pub workload: Arc<Workload>,
    pub netns: Arc<Netns>,
    pub id: SpiffeId,
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Mark for client-IP-preserving connections to the app (per capture mode).
    pub app_mark: u32,
    /// The netns cookie, which keys the pod's sockets in the kernel maps.
    pub netns_cookie: u64,
    /// The ports of the pod's sk_assign listeners (eBPF capture), which
    /// are the agent's own like 15001/15006/15008.
    pub assign_ports: Vec<u16>,
}

impl PodCtx {
    /// `port` is one the agent listens on in this pod: a connection to it
    /// must never be dialled (own_ports.rs).
    pub fn owns_port(&self, port: u16) -> bool {
        own_ports::is_agent_port(port) || self.assign_ports.contains(&port)
    }

    /// The pod as `state` knows it now. Labels (which policy selectors and
    /// metrics read) can change without the pod being re-enrolled; what the
    /// enrollment was built from (identity, addresses, netns) cannot, so the
    /// enrolled definition stands in when the state no longer has the pod.
    pub fn current(&self, state: &State) -> Arc<Workload> {
        state
            .workload_by_uid(&self.workload.uid)
            .filter(|w| w.namespace == self.workload.namespace && w.service_account == self.workload.service_account)
            .unwrap_or_else(|| self.workload.clone())
    }
}

/// What `source_cluster`/`destination_cluster` say for a known workload:
/// ztunnel's default cluster id (its `CLUSTER_ID`), which is also istiod's.
/// Sluice serves one cluster.
pub const CLUSTER_ID: &str = "Kubernetes";

/// `connection_security_policy`, as ztunnel writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// HBONE, and the same-node splice: there the agent holds both pods'
    /// identities itself and authorizes with the source's verified SPIFFE
    /// ID, and the bytes never leave the node, so the connection carries
    /// what mTLS guarantees (authenticated peers, identity-based policy)
    /// without a TLS layer to add; dashboards must not show it as plaintext.
    MutualTls,
    /// Plaintext: ztunnel reports "unknown" (not Envoy's "none") for both
    /// its passthrough directions.
    Unknown,
}

impl Security {
    fn label(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::Unknown => "unknown",
        }
    }
}

/// Istio's labels for one connection (see `metrics::ConnLabels` for the
/// conventions). `src`/`dst` are the workloads when known; the principals
/// are the identities actually in play (the source's verified certificate
/// on the destination side), rendered `spiffe://...`; `service` is the
/// service the client dialled, or the one the destination side found for
/// the address it was asked for.
pub fn conn_labels(
    reporter: &'static str,
    src: Option<&Workload>,
    src_principal: Option<&SpiffeId>,
    dst: Option<&Workload>,
    dst_principal: Option<&SpiffeId>,
    service: Option<&Service>,
    security: Security,
) -> ConnLabels {
    let unknown = || "unknown".to_string();
    let of = |w: Option<&Workload>, f: fn(&Workload) -> &str| w.map(|w| f(w).to_string()).unwrap_or_else(unknown);
    let cluster = |w: Option<&Workload>| w.map(|_| CLUSTER_ID.to_string()).unwrap_or_else(unknown);
    let principal = |id: Option<&SpiffeId>| id.map(ToString::to_string).unwrap_or_else(unknown);
    ConnLabels {
        reporter,
        source_workload: of(src, |w| &w.workload_name),
        source_canonical_service: of(src, Workload::canonical_service),
        source_canonical_revision: of(src, Workload::canonical_revision),
        source_workload_namespace: of(src, |w| &w.namespace),
        source_principal: principal(src_principal),
        source_app: of(src, Workload::canonical_service),
        source_version: of(src, Workload::canonical_revision),
        source_cluster: cluster(src),
        destination_service: service.map(|s| s.hostname.clone()).unwrap_or_else(unknown),
        destination_service_namespace: service.map(|s| s.namespace.clone()).unwrap_or_else(unknown),
        destination_service_name: service.map(|s| s.name.clone()).unwrap_or_else(unknown),
        destination_workload: of(dst, |w| &w.workload_name),
        destination_canonical_service: of(dst, Workload::canonical_service),
        destination_canonical_revision: of(dst, Workload::canonical_revision),
        destination_workload_namespace: of(dst, |w| &w.namespace),
        destination_principal: principal(dst_principal),
        destination_app: of(dst, Workload::canonical_service),
        destination_version: of(dst, Workload::canonical_revision),
        destination_cluster: cluster(dst),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: security.label(),
    }
}

/// Resets `stream` when it is dropped: the peer must see a failed
/// connection, not an EOF it could take for a complete (empty) answer.
pub fn reset(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Pod addresses compare equal whether written v4 or v4-mapped v6.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Config;

    #[test]
    fn labels_follow_ztunnel() {
        let config = Config::from_str_named(
            r#"
trustDomain: cluster.local
ca: { dir: /ca }
workloads:
  - { uid: default/c-1, name: c-1, namespace: default, serviceAccount: sleep, workloadIps: [10.0.0.1], node: n1,
      netns: /run/netns/c, workloadName: sleep, labels: { app: sleep, version: v1 },
      services: { default/web.default.svc.cluster.local: {} } }
services:
  - { name: web, namespace: default, hostname: web.default.svc.cluster.local, vips: [10.96.0.1], ports: { 80: 80 } }
"#,
            "t.yaml",
        )
        .unwrap();
        let state = State::from_config(&config, "n1").unwrap();
        let w = state.workload_by_uid("default/c-1").unwrap();
        let svc = state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap();
        let id = SpiffeId::new("cluster.local", "default", "sleep").unwrap();
        let l = conn_labels("source", Some(&w), Some(&id), None, None, Some(&svc), Security::MutualTls);
        assert_eq!(l.source_principal, "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(
            (l.source_workload.as_str(), l.source_app.as_str(), l.source_version.as_str()),
            ("sleep", "sleep", "v1")
        );
        assert_eq!((l.source_canonical_service.as_str(), l.source_canonical_revision.as_str()), ("sleep", "v1"));
        assert_eq!(l.source_cluster, CLUSTER_ID);
        assert_eq!(
            (
                l.destination_service.as_str(),
                l.destination_service_name.as_str(),
                l.destination_service_namespace.as_str()
            ),
            ("web.default.svc.cluster.local", "web", "default")
        );
        assert_eq!((l.destination_workload.as_str(), l.destination_principal.as_str()), ("unknown", "unknown"));
        assert_eq!((l.destination_cluster.as_str(), l.destination_app.as_str()), ("unknown", "unknown"));
        assert_eq!((l.response_flags, l.request_protocol, l.connection_security_policy), ("-", "tcp", "mutual_tls"));
        let plain = conn_labels("destination", None, None, Some(&w), Some(&id), None, Security::Unknown);
        assert_eq!((plain.connection_security_policy, plain.destination_service.as_str()), ("unknown", "unknown"));
    }
}
