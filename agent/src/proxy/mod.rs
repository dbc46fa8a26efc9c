//! The three listeners every enrolled pod gets, inside its own netns:
//! - `outbound` (15001): the pod's own outgoing connections, captured.
//! - `inbound` (15008): HBONE from other pods' agents.
//! - `inbound_plaintext` (15006): plain TCP from clients outside the mesh.
//!
//! `Ctx` is what they share across pods; `PodCtx` what belongs to one pod.

pub mod inbound;
pub mod inbound_plaintext;
pub mod outbound;
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
    state::{State, Workload},
    tunnel::pool::Pool,
};

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
}

/// Istio's labels for one connection. `src`/`dst` are the workloads when
/// known; principals are SPIFFE principals, or "unknown".
pub fn conn_labels(
    reporter: &'static str,
    src: Option<&Workload>,
    src_principal: Option<String>,
    dst: Option<&Workload>,
    dst_principal: Option<String>,
    mtls: bool,
) -> ConnLabels {
    let unknown = || "unknown".to_string();
    ConnLabels {
        reporter,
        source_workload: src.map(|w| w.name.clone()).unwrap_or_else(unknown),
        source_workload_namespace: src.map(|w| w.namespace.clone()).unwrap_or_else(unknown),
        source_principal: src_principal.unwrap_or_else(unknown),
        destination_workload: dst.map(|w| w.name.clone()).unwrap_or_else(unknown),
        destination_workload_namespace: dst.map(|w| w.namespace.clone()).unwrap_or_else(unknown),
        destination_principal: dst_principal.unwrap_or_else(unknown),
        connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        request_protocol: "tcp",
    }
}

/// Pod addresses compare equal whether written v4 or v4-mapped v6.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
