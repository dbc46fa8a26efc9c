//! Enrolled pods on this node: for each, the netns handle, the three
//! listeners inside it, the capture rules, and the certificate.
//!
//! Order matters for "no broken connections": on enroll the listeners come
//! up before capture points traffic at them; on removal capture goes first,
//! then the HBONE server sends GOAWAY and open streams finish.

pub mod discover;

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    netns::Netns,
    proxy::{canonical_ip, inbound, inbound_plaintext, listen_both, outbound, Ctx, PodCtx},
    redirect::{PodCapture, Redirect, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT},
    state::{Protocol, State, Workload},
    tls,
};

struct Running {
    pod: Arc<PodCtx>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

pub struct Pods {
    ctx: Arc<Ctx>,
    redirect: Arc<dyn Redirect>,
    running: Mutex<BTreeMap<String, Running>>,
    /// Why a pod's last enrollment failed, until it succeeds or the pod
    /// goes: the CNI plugin's answer names it.
    failures: Mutex<BTreeMap<String, String>>,
}

#[derive(Serialize)]
pub struct PodDump {
    pub uid: String,
    pub identity: String,
    pub netns: String,
    pub ips: Vec<std::net::IpAddr>,
    pub cert_not_after: Option<String>,
}

/// Whether a pod enrolled as `old` can stay as it is when it now reads `new`:
/// what its listeners, capture and certificate were built from is the same.
/// Labels and names may change under an enrolled pod (the proxies read them
/// from the current state), and re-enrolling for them would cut its
/// connections.
fn same_enrollment(new: &Workload, old: &Workload) -> bool {
    new.uid == old.uid
        && new.namespace == old.namespace
        && new.service_account == old.service_account
        && new.ips == old.ips
        && new.netns == old.netns
        && new.cgroup == old.cgroup
        && new.protocol == old.protocol
}

impl Pods {
    pub fn new(ctx: Arc<Ctx>, redirect: Arc<dyn Redirect>) -> Arc<Pods> {
        Arc::new(Pods { ctx, redirect, running: Mutex::default(), failures: Mutex::default() })
    }

    /// Brings the running pods in line with `state`: every local HBONE
    /// workload enrolled with its current definition, nothing else. Also
    /// retries pods whose enrollment failed before (say, their netns was not
    /// there yet), so calling it again is how failures heal.
    pub async fn sync(&self, state: &State) {
        let wanted: BTreeMap<String, Arc<Workload>> = state
            .local_workloads(state.node())
            .into_iter()
            .filter(|w| w.protocol == Protocol::Hbone)
            .map(|w| (w.uid.clone(), w))
            .collect();
        let stale: Vec<String> = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running
                .iter()
                .filter(|(uid, r)| wanted.get(*uid).is_none_or(|w| !same_enrollment(w, &r.pod.workload)))
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        for uid in stale {
            self.remove(&uid).await;
        }
        for (uid, w) in &wanted {
            if self.is_enrolled(uid) {
                continue;
            }
            match self.enroll(w.clone()).await {
                Ok(()) => {
                    self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
                }
                Err(e) => {
                    // One bad pod must not keep the others from being served.
                    warn!(pod = %uid, error = format!("{e:#}"), "enrolling pod failed; will retry");
                    self.failures.lock().unwrap_or_else(|e| e.into_inner()).insert(uid.clone(), format!("{e:#}"));
                }
            }
        }
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).retain(|uid, _| wanted.contains_key(uid));
        self.ctx.metrics.enrolled_pods.set(self.running.lock().unwrap_or_else(|e| e.into_inner()).len() as i64);
    }

    pub async fn enroll(&self, w: Arc<Workload>) -> Result<()> {
        let netns_path = w.netns.as_ref().with_context(|| format!("pod {} has no netns", w.uid))?;
        let netns = Arc::new(Netns::open(netns_path).with_context(|| format!("enrolling pod {}", w.uid))?);
        let id = self.ctx.spiffe_id(&w)?;
        let server_tls = tls::server_config(
            self.ctx.certs.clone(),
            id.clone(),
            self.ctx.roots.clone(),
            self.ctx.state().trust_domain().to_owned(),
        )
        .with_context(|| format!("TLS config for pod {}", w.uid))?;
        let pod = Arc::new(PodCtx {
            workload: w.clone(),
            netns: netns.clone(),
            id,
            server_tls,
            app_mark: self.redirect.app_mark(),
            // Only the eBPF datapath keys sockets by it (and it needs 5.14);
            // iptables capture must work without it.
            netns_cookie: netns.cookie().unwrap_or(0),
        });

        let out =
            listen_both(&netns, OUTBOUND_PORT, &w.ips).with_context(|| format!("pod {}: outbound listener", w.uid))?;
        let plain = listen_both(&netns, INBOUND_PLAINTEXT_PORT, &w.ips)
            .with_context(|| format!("pod {}: inbound listener", w.uid))?;
        let hbone =
            listen_both(&netns, HBONE_PORT, &w.ips).with_context(|| format!("pod {}: HBONE listener", w.uid))?;
        let assigned = if self.redirect.assigns_inbound() {
            listen_both(&netns, 0, &w.ips).with_context(|| format!("pod {}: inbound assign listener", w.uid))?
        } else {
            Vec::new()
        };
        let plain_fds: Vec<RawFd> =
            if assigned.is_empty() { &plain } else { &assigned }.iter().map(|l| l.as_raw_fd()).collect();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for l in out {
            tasks.push(tokio::spawn(outbound::serve(l, pod.clone(), self.ctx.clone())));
        }
        for l in plain.into_iter().chain(assigned) {
            tasks.push(tokio::spawn(inbound_plaintext::serve(l, pod.clone(), self.ctx.clone())));
        }
        for l in hbone {
            tasks.push(tokio::spawn(inbound::serve(l, pod.clone(), self.ctx.clone(), shutdown_rx.clone())));
        }

        let redirect = self.redirect.clone();
        let (uid, ips, cgroup, identity) = (w.uid.clone(), w.ips.clone(), w.cgroup.clone(), pod.id.to_string());
        let capture_ns = netns.clone();
        let enrolled = tokio::task::spawn_blocking(move || {
            let pod = PodCapture {
                uid: &uid,
                netns: &capture_ns,
                ips: &ips,
                identity: &identity,
                cgroup: cgroup.as_deref(),
                inbound_listeners: &plain_fds,
            };
            redirect.enroll(&pod)
        })
        .await?;
        if let Err(e) = enrolled {
            tasks.iter().for_each(JoinHandle::abort);
            return Err(e);
        }
        info!(pod = %w.uid, identity = %pod.id, mode = %self.redirect.mode(), "pod enrolled");
        let mut local = self.ctx.local_pods.write().unwrap_or_else(|e| e.into_inner());
        for ip in &w.ips {
            local.insert(canonical_ip(*ip), pod.clone());
        }
        drop(local);
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(w.uid.clone(), Running { pod, tasks, shutdown });
        Ok(())
    }

    /// Removes capture, closes the listeners, sends GOAWAY on HBONE
    /// connections and drops the pod's certificate.
    pub async fn remove(&self, uid: &str) {
        let Some(running) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(uid) else {
            return;
        };
        let pod = running.pod.clone();
        self.ctx.local_pods.write().unwrap_or_else(|e| e.into_inner()).retain(|_, p| !Arc::ptr_eq(p, &pod));
        let redirect = self.redirect.clone();
        let unenrolled = tokio::task::spawn_blocking(move || {
            let w = &pod.workload;
            let capture = PodCapture {
                uid: &w.uid,
                netns: &pod.netns,
                ips: &w.ips,
                identity: "",
                cgroup: w.cgroup.as_deref(),
                inbound_listeners: &[],
            };
            redirect.unenroll(&capture)
        })
        .await;
        if let Ok(Err(e)) | Err(e) = unenrolled.map_err(anyhow::Error::from) {
            warn!(pod = %uid, error = format!("{e:#}"), "removing capture failed");
        }
        let _ = running.shutdown.send(true);
        running.tasks.iter().for_each(JoinHandle::abort);
        self.ctx.certs.forget(&running.pod.id);
        info!(pod = %uid, "pod removed");
    }

    /// Agent shutdown: GOAWAY to every HBONE client and stop accepting.
    /// Capture stays unless `cleanup`, so an upgraded agent takes over.
    pub async fn shutdown(&self, cleanup: bool) {
        let uids: Vec<String> = self.running.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        if cleanup {
            for uid in uids {
                self.remove(&uid).await;
            }
            return;
        }
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, r) in running {
            let _ = r.shutdown.send(true);
            r.tasks.iter().for_each(JoinHandle::abort);
        }
    }

    pub fn dump(&self) -> Vec<PodDump> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .values()
            .map(|r| PodDump {
                uid: r.pod.workload.uid.clone(),
                identity: r.pod.id.to_string(),
                netns: r.pod.netns.path().display().to_string(),
                ips: r.pod.workload.ips.clone(),
                cert_not_after: self.ctx.certs.peek(&r.pod.id).map(|c| humantime(c.not_after)),
            })
            .collect()
    }

    /// Renews every enrolled pod's certificate that is past its half-life,
    /// so a pod that sees no new handshakes for a while still never holds an
    /// expired certificate.
    pub fn refresh_certs(&self) {
        let ids: Vec<_> =
            self.running.lock().unwrap_or_else(|e| e.into_inner()).values().map(|r| r.pod.id.clone()).collect();
        for id in ids {
            if let Err(e) = self.ctx.certs.get(&id) {
                warn!(%id, error = %e, "renewing the workload certificate failed");
            }
        }
    }

    /// Why enrolling `uid` failed last, if it did and is still failing.
    pub fn enroll_failure(&self, uid: &str) -> Option<String> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).get(uid).cloned()
    }

    pub fn is_enrolled(&self, uid: &str) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(uid)
    }
}

fn humantime(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs} (unix)")
}
