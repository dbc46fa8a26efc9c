//! Open connections that a policy change can take away.
//!
//! Authorization is decided at setup, but Istio's (and ztunnel's) contract
//! is that a new policy also applies to connections already open: one the
//! new state denies must not keep running. Every connection this agent
//! authorized as the destination registers here while it runs: inbound
//! HBONE streams, plaintext inbound, and same-node spliced connections (the
//! agent holds both sockets of those). Outbound connections are not here:
//! their destination's agent enforces policy on them.
//!
//! [`revalidate`] runs each one through `policy::authorize` again against
//! a new state; those now denied are told to close, and each closes itself
//! with a reset on its sockets (see the `closed()` callers).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        LazyLock, Mutex,
    },
};

use tokio::sync::oneshot;
use tracing::info;

use super::Ctx;
use crate::{
    metrics::DenyLabels,
    policy::{authorize_conn, plaintext_allowed, Conn, Decision, Source},
    state::State,
};

/// Which path a registered connection took, for the log line.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Hbone,
    Plaintext,
    Spliced,
}

struct Entry {
    kind: Kind,
    source: Source,
    dst_uid: String,
    /// The app's address: what the policy's port is checked against.
    dst: SocketAddr,
    close: Option<oneshot::Sender<String>>,
}

#[derive(Default)]
struct Conns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// Process-wide: one agent runs per process, and `Ctx` is built elsewhere.
static CONNS: LazyLock<Conns> = LazyLock::new(Conns::default);

/// A registered connection; dropping it (however the connection ends)
/// removes it from the registry.
pub struct Registered {
    id: u64,
    closed: Option<oneshot::Receiver<String>>,
}

/// Registers a connection the agent authorized for the workload `dst_uid`
/// at `dst`, from `source`.
pub fn register(kind: Kind, source: Source, dst_uid: &str, dst: SocketAddr) -> Registered {
    let (tx, rx) = oneshot::channel();
    let id = CONNS.next.fetch_add(1, Ordering::Relaxed);
    let entry = Entry { kind, source, dst_uid: dst_uid.to_owned(), dst, close: Some(tx) };
    CONNS.open.lock().unwrap_or_else(|e| e.into_inner()).insert(id, entry);
    Registered { id, closed: Some(rx) }
}

impl Registered {
    /// Resolves, with the policy's name, once a new policy denies this
    /// connection; never otherwise.
    pub async fn closed(&mut self) -> String {
        if let Some(rx) = &mut self.closed {
            let got = rx.await;
            self.closed = None;
            if let Ok(policy) = got {
                return policy;
            }
        }
        std::future::pending().await
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        CONNS.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl crate::tunnel::server::StreamGuard for Registered {
    async fn closed(&mut self) {
        Registered::closed(self).await;
    }
}

/// Connections registered now.
#[cfg(test)]
fn open_connections() -> usize {
    CONNS.open.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Re-authorizes every open connection against `state` and closes (with a
/// reset) those it now denies; each is counted in
/// `sluice_auth_denials_total` under the denying policy and logged once.
/// Also brings the kernel's list of spliceable service VIPs up to date.
/// Call on every state change.
pub fn revalidate(ctx: &Ctx, state: &State) {
    super::services::sync_splice(ctx, &ctx.state());
    let mut open = CONNS.open.lock().unwrap_or_else(|e| e.into_inner());
    for entry in open.values_mut().filter(|e| e.close.is_some()) {
        // A workload that left the state is not judged here: its pod's
        // removal ends its connections.
        let Some(w) = state.workload_by_uid(&entry.dst_uid) else { continue };
        let conn = Conn { src: &entry.source, dst: &w, dst_addr: entry.dst };
        let strict = match entry.kind {
            Kind::Plaintext => plaintext_allowed(state, &w, entry.dst.port()).err(),
            _ => None,
        };
        let decision = match strict {
            Some(why) => Decision::Deny { policy: why },
            None => authorize_conn(state, &conn),
        };
        let Decision::Deny { policy } = decision else { continue };
        ctx.metrics.auth_denials.get_or_create(&DenyLabels { reporter: "destination", policy: policy.clone() }).inc();
        info!(
            kind = ?entry.kind,
            src = %entry.source.ip,
            principal = entry.source.principal.as_deref().unwrap_or("-"),
            dst = %entry.dst,
            workload = %entry.dst_uid,
            %policy,
            "closing an open connection the new policy denies"
        );
        if let Some(tx) = entry.close.take() {
            let _ = tx.send(policy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_resolves_only_when_told_and_drop_unregisters() {
        let before = open_connections();
        let mut a = register(
            Kind::Plaintext,
            Source::plaintext("10.0.0.1".parse().unwrap()),
            "ns/a",
            "10.0.0.2:80".parse().unwrap(),
        );
        assert_eq!(open_connections(), before + 1);
        let tx = CONNS.open.lock().unwrap().get_mut(&a.id).unwrap().close.take().unwrap();
        tx.send("deny-all".into()).unwrap();
        assert_eq!(a.closed().await, "deny-all");
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), a.closed()).await;
        assert!(pending.is_err(), "closed() must not resolve twice");
        drop(a);
        assert_eq!(open_connections(), before);
    }
}
