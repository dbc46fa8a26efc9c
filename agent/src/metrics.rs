//! Prometheus metrics, named and labelled the way Istio's are, so existing
//! dashboards keep working after moving from sidecars; plus Sluice's own.

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Istio's standard TCP labels, with the names, order and value conventions
/// ztunnel uses (`src/proxy/metrics.rs` there), so Kiali, Grafana's Istio
/// dashboards and recording rules read them unchanged:
/// - `reporter` is "source" (the client's agent) or "destination";
/// - anything not known is "unknown" (ztunnel's `DefaultedUnknown`);
/// - principals are full SPIFFE IDs, `spiffe://<td>/ns/<ns>/sa/<sa>`;
/// - `*_app`/`*_version` carry the canonical service and revision, as
///   ztunnel fills them;
/// - `destination_service` is the service hostname, with its name and
///   namespace beside it, when the connection went to a service;
/// - `response_flags` is "-" for a connection that was set up;
/// - `connection_security_policy` is "mutual_tls" or "unknown".
///
/// Built by `proxy::conn_labels`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenyLabels {
    pub reporter: &'static str,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub direction: &'static str,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent_bytes: Family<ConnLabels, Counter>,
    pub received_bytes: Family<ConnLabels, Counter>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub auth_denials: Family<DenyLabels, Counter>,
    pub hbone_errors: Family<StatusLabels, Counter>,
    pub redirect_mode: Family<ModeLabel, Gauge>,
    pub enrolled_pods: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Default::default(),
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            config_reloads: Family::default(),
            auth_denials: Family::default(),
            hbone_errors: Family::default(),
            redirect_mode: Family::default(),
            enrolled_pods: Gauge::default(),
        };
        // prometheus-client appends `_total` to counters.
        let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.register("istio_tcp_connections_opened", "TCP connections opened", m.opened.clone());
        r.register("istio_tcp_connections_closed", "TCP connections closed", m.closed.clone());
        r.register("istio_tcp_sent_bytes", "Bytes sent from server to client", m.sent_bytes.clone());
        r.register("istio_tcp_received_bytes", "Bytes received from client by server", m.received_bytes.clone());
        r.register(
            "sluice_config_reloads",
            "Config file reloads by result (ok, invalid, needs_restart)",
            m.config_reloads.clone(),
        );
        r.register(
            "sluice_auth_denials",
            "Connections denied by L4 policy, at setup or when a new policy closed them",
            m.auth_denials.clone(),
        );
        r.register(
            "sluice_hbone_errors",
            "HBONE streams that did not get 200, and outbound connections refused (e.g. no_healthy_upstream), by status",
            m.hbone_errors.clone(),
        );
        r.register("sluice_redirect_mode", "Capture mode in use (1 for the active mode)", m.redirect_mode.clone());
        r.register("sluice_enrolled_pods", "Pods enrolled on this node", m.enrolled_pods.clone());
        drop(r);
        m
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry.lock().unwrap_or_else(|e| e.into_inner()));
        out
    }

    /// Adds metrics computed at scrape time (the kernel counters).
    pub fn register_collector(&self, c: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).register_collector(c);
    }

    /// Records a connection as open; the guard records it closed with its
    /// byte counts when dropped, so every exit path is counted once.
    pub fn connection(&self, labels: ConnLabels) -> ConnGuard<'_> {
        self.opened.get_or_create(&labels).inc();
        ConnGuard { metrics: self, labels, client_to_server: 0, server_to_client: 0 }
    }
}

pub struct ConnGuard<'a> {
    metrics: &'a Metrics,
    labels: ConnLabels,
    pub client_to_server: u64,
    pub server_to_client: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        m.closed.get_or_create(&self.labels).inc();
        m.received_bytes.get_or_create(&self.labels).inc_by(self.client_to_server);
        m.sent_bytes.get_or_create(&self.labels).inc_by(self.server_to_client);
    }
}
