//! Services on the data path: the endpoint a VIP:port goes to on the
//! outbound side, the service a connection belongs to on the destination
//! side (for telemetry), and the kernel's list of VIPs that may be spliced.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
};

use agent_common::{ServiceInfo, ServiceKey};
use tracing::warn;

use super::{canonical_ip, Ctx};
use crate::{
    bpf::ip_words,
    state::{NoEndpoint, Protocol, Service, State, Workload},
};

/// Picks the endpoint for a connection the app made to `dst` (a VIP of
/// `svc`): `Service::pick` chooses among ready endpoints (on this node only
/// for `internalTrafficPolicy: Local`); then, as ztunnel does, the address
/// of the chosen workload in the family the app dialled, when it has one,
/// so a dual-stack endpoint is reached over IPv4 for an IPv4 VIP.
pub fn resolve(svc: &Service, dst: SocketAddr, state: &State) -> Result<SocketAddr, NoEndpoint> {
    let picked = svc.pick(dst.port(), state.node())?;
    let v4 = canonical_ip(dst.ip()).is_ipv4();
    if canonical_ip(picked.ip()).is_ipv4() == v4 {
        return Ok(picked);
    }
    let chosen = svc.endpoints.iter().find(|e| e.ip == picked.ip()).and_then(|e| e.workload_uid.as_deref());
    let same_family = svc.endpoints.iter().find(|e| {
        e.ready && e.workload_uid.as_deref() == chosen && chosen.is_some() && canonical_ip(e.ip).is_ipv4() == v4
    });
    Ok(same_family.and_then(|e| Some(SocketAddr::new(e.ip, *e.target_ports.get(&dst.port())?))).unwrap_or(picked))
}

/// Whether `w` is an enrolled pod on this state's node: what an endpoint
/// must be for a connection to it to be spliced.
fn local_enrolled(w: &Workload, state: &State) -> bool {
    w.protocol == Protocol::Hbone && w.is_on_node(state.node())
}

/// SPLICE_SERVICES as it should be for `state`: every IPv4 VIP:port with
/// at least one ready IPv4 endpoint enrolled on this node (the splice is
/// IPv4 only, see agent-ebpf/src/sockops.rs).
fn splice_services(state: &State) -> HashMap<ServiceKey, ServiceInfo> {
    let mut want = HashMap::new();
    for svc in state.services() {
        for port in &svc.ports {
            let local = svc
                .endpoints
                .iter()
                .filter(|e| e.ready && e.ip.is_ipv4() && e.target_ports.contains_key(port))
                .filter(|e| {
                    let w = e.workload_uid.as_deref().and_then(|uid| state.workload_by_uid(uid));
                    w.or_else(|| state.workload_by_ip(e.ip)).is_some_and(|w| local_enrolled(&w, state))
                })
                .count();
            if local == 0 {
                continue;
            }
            for vip in svc.vips.iter().filter(|v| canonical_ip(**v).is_ipv4()) {
                let key = ServiceKey { ip: ip_words(canonical_ip(*vip)), port: u32::from(*port) };
                want.insert(key, ServiceInfo { local_endpoints: local as u32, _reserved: 0 });
            }
        }
    }
    want
}

/// Brings SPLICE_SERVICES in line with `state`, unless it already was for
/// this very state. Cheap when nothing changed (a pointer compare), so the
/// outbound path can call it per connection; `revalidate` calls it on every
/// change and each pod's outbound listener when it starts.
pub fn sync_splice(ctx: &Ctx, state: &Arc<State>) {
    let Some(maps) = &ctx.splice else { return };
    static SYNCED: Mutex<Weak<State>> = Mutex::new(Weak::new());
    let mut synced = SYNCED.lock().unwrap_or_else(|e| e.into_inner());
    // A Weak keeps the allocation, so the address cannot be reused by a
    // newer state while we compare against it.
    if Weak::as_ptr(&synced) == Arc::as_ptr(state) {
        return;
    }
    match maps.set_services(&splice_services(state)) {
        Ok(()) => *synced = Arc::downgrade(state),
        // Not remembered: the next connection tries again. Until then a
        // service connection to a local pod is copied by the agent instead
        // of spliced, or spliced although its endpoint is elsewhere (then
        // the agent takes its socket out of the sockmap again): correct
        // either way.
        Err(e) => warn!(error = format!("{e:#}"), "updating splice_services"),
    }
}

/// The services each workload (by uid) is an endpoint of, for one state.
type ByWorkload = HashMap<String, Vec<Arc<Service>>>;

/// The service a connection to `w` on `port` (the app's own port) most
/// likely belongs to, for the destination side's telemetry: the first
/// service that lists `w` as an endpoint serving that target port. This is
/// ztunnel's guess too when the client does not say which service it
/// dialled (HBONE carries only the endpoint address): exact when the pod
/// backs one service on that port, a guess among them otherwise.
pub fn inbound_service(state: &Arc<State>, w: &Workload, port: u16) -> Option<Arc<Service>> {
    static INDEX: Mutex<(Weak<State>, Option<Arc<ByWorkload>>)> = Mutex::new((Weak::new(), None));
    let index = {
        let mut cached = INDEX.lock().unwrap_or_else(|e| e.into_inner());
        match &cached.1 {
            Some(index) if Weak::as_ptr(&cached.0) == Arc::as_ptr(state) => index.clone(),
            _ => {
                let mut by: ByWorkload = HashMap::new();
                for svc in state.services() {
                    let mut uids: Vec<&String> = svc.endpoints.iter().filter_map(|e| e.workload_uid.as_ref()).collect();
                    uids.dedup();
                    for uid in uids {
                        let list = by.entry(uid.clone()).or_default();
                        if !list.iter().any(|s| Arc::ptr_eq(s, svc)) {
                            list.push(svc.clone());
                        }
                    }
                }
                let index = Arc::new(by);
                *cached = (Arc::downgrade(state), Some(index.clone()));
                index
            }
        }
    };
    index.get(&w.uid)?.iter().find(|svc| serves(svc, w, port)).cloned()
}

/// Whether `w` is an endpoint of `svc` with `port` as a target port.
fn serves(svc: &Service, w: &Workload, port: u16) -> bool {
    svc.endpoints
        .iter()
        .filter(|e| e.workload_uid.as_deref() == Some(w.uid.as_str()))
        .any(|e| e.target_ports.values().any(|t| *t == port))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::state::Config;

    /// node1 runs `l` (enrolled) and `p` (not enrolled); `a` and `r` are
    /// enrolled on node2. Built from the file format, as the agent does.
    const CONFIG: &str = r#"
trustDomain: cluster.local
ca: { dir: /ca }
workloads:
  - { uid: default/l, name: l, namespace: default, serviceAccount: web, workloadIps: [10.10.1.1, "fd10:1::1"],
      node: node1, netns: /run/netns/l, services: { default/both.default.svc.cluster.local: {} } }
  - { uid: default/p, name: p, namespace: default, serviceAccount: web, workloadIps: [10.10.1.2], node: node1,
      protocol: TCP, services: { default/remote.default.svc.cluster.local: {} } }
  - { uid: default/a, name: a, namespace: default, serviceAccount: web, workloadIps: [10.10.2.1, "fd10:2::1"],
      node: node2, services: { default/dual.default.svc.cluster.local: {},
                               default/v6only.default.svc.cluster.local: {} } }
  - { uid: default/r, name: r, namespace: default, serviceAccount: web, workloadIps: [10.10.2.2], node: node2,
      services: { default/both.default.svc.cluster.local: {}, default/remote.default.svc.cluster.local: {},
                  default/v6only.default.svc.cluster.local: {} } }
services:
  - { name: dual, namespace: default, hostname: dual.default.svc.cluster.local, vips: [10.96.0.10, "fd96::10"],
      ports: { 80: 8080 } }
  - { name: both, namespace: default, hostname: both.default.svc.cluster.local, vips: [10.96.0.11, "fd96::11"],
      ports: { 80: 8080 } }
  - { name: remote, namespace: default, hostname: remote.default.svc.cluster.local, vips: [10.96.0.12],
      ports: { 80: 8080 } }
  - { name: v6only, namespace: default, hostname: v6only.default.svc.cluster.local, vips: ["fd96::13"],
      ports: { 80: 9090 } }
"#;

    fn state() -> Arc<State> {
        let config = Config::from_str_named(CONFIG, "test.yaml").unwrap();
        Arc::new(State::from_config(&config, "node1").unwrap())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn resolve_keeps_the_family_the_app_dialled() {
        let st = state();
        let svc = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        for _ in 0..50 {
            assert_eq!(resolve(&svc, addr("10.96.0.10:80"), &st), Ok(addr("10.10.2.1:8080")));
            assert_eq!(resolve(&svc, addr("[fd96::10]:80"), &st), Ok(addr("[fd10:2::1]:8080")));
        }
        assert_eq!(resolve(&svc, addr("10.96.0.10:81"), &st), Err(NoEndpoint::UnknownPort));
    }

    #[test]
    fn resolve_falls_back_to_the_other_family() {
        let st = state();
        let svc = st.service_by_vip("fd96::13".parse().unwrap()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            seen.insert(resolve(&svc, addr("[fd96::13]:80"), &st).unwrap());
        }
        // a has IPv6 and is reached over it; r only has IPv4.
        assert_eq!(seen, [addr("[fd10:2::1]:9090"), addr("10.10.2.2:9090")].into());
    }

    #[test]
    fn splice_list_holds_ipv4_vips_with_a_local_enrolled_endpoint() {
        let want = splice_services(&state());
        let key = |ip: &str| ServiceKey { ip: ip_words(ip.parse::<IpAddr>().unwrap()), port: 80 };
        // Only `both` (l is enrolled on node1), and only its IPv4 VIP;
        // `remote`'s local endpoint p is not enrolled.
        assert_eq!(want.keys().copied().collect::<Vec<_>>(), vec![key("10.96.0.11")]);
        assert_eq!(want[&key("10.96.0.11")].local_endpoints, 1);
    }

    #[test]
    fn inbound_service_matches_the_target_port() {
        let st = state();
        let r = st.workload_by_uid("default/r").unwrap();
        let found = inbound_service(&st, &r, 8080).map(|s| s.hostname.clone());
        assert_eq!(found.as_deref(), Some("both.default.svc.cluster.local"), "the first service r serves on 8080");
        assert_eq!(inbound_service(&st, &r, 9090).map(|s| s.name.clone()).as_deref(), Some("v6only"));
        assert!(inbound_service(&st, &r, 7070).is_none());
        let p = st.workload_by_uid("default/p").unwrap();
        assert!(inbound_service(&st, &p, 9090).is_none());
    }
}
