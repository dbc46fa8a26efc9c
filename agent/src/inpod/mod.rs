//! Enrolled pods on this node: for each, the netns handle, the three
//! listeners inside it, the capture rules, and the certificate.
//!
//! Order matters, because the agent's transparent connections to a pod's
//! app (inbound HBONE streams and captured plaintext) need the pod's return
//! path (the capture's mark rules), which `Redirect::enroll` installs and
//! `Redirect::unenroll` removes; an app reply that misses it leaves the pod
//! for the wire and the connection hangs instead of failing.
//!
//! - Enroll: the listeners are bound (so the kernel queues connections),
//!   then capture and the return path go in, and only then are the
//!   listeners served. A peer agent that learns of the enrollment first
//!   and dials 15008 early waits in the backlog for a few milliseconds
//!   instead of being answered without a return path.
//! - Remove: the inbound listeners (HBONE, plaintext) are closed and GOAWAY
//!   sent first, so a peer agent that has not yet learnt of the removal, or
//!   a plaintext connection captured in the meantime, is refused at once
//!   (in eBPF mode a SYN with no listener to assign to goes to the app, as
//!   un-enrolled) instead of being served without a return path; 50 ms
//!   later (for connections they had just accepted to reach the app),
//!   capture and the return path go; then the outbound listener closes
//!   (until then the app's captured connections still find it, and they
//!   need no return path). Connections the agent carries for the pod at
//!   that moment lose their return path: un-enrolling does not drain them.

pub mod discover;

use std::{
    collections::BTreeMap,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::MetadataExt,
    },
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    netns::Netns,
    proxy::{canonical_ip, inbound, inbound_plaintext, listen_both, outbound, Arrival, Ctx, PodCtx},
    redirect::{PodCapture, Redirect, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT},
    state::{Protocol, State, Workload},
    tls,
};

struct Running {
    pod: Arc<PodCtx>,
    /// Accept loops of the listeners whose connections the agent passes to
    /// the app transparently: HBONE (15008) and plaintext inbound (15006,
    /// and the eBPF assign listener).
    inbound_tasks: Vec<JoinHandle<()>>,
    /// Accept loops of the outbound listener (15001).
    outbound_tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

/// How long a removed pod keeps its return path after its inbound
/// listeners closed (see [`Pods::remove`]).
const RETURN_PATH_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Stops accept loops and waits until they are gone, so their listening
/// sockets are closed when this returns (connections still in a closed
/// listener's backlog are reset by the kernel).
async fn stop(tasks: Vec<JoinHandle<()>>) {
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
}

pub struct Pods {
    ctx: Arc<Ctx>,
    redirect: Arc<dyn Redirect>,
    running: Mutex<BTreeMap<String, Running>>,
    /// Why a pod's last enrollment failed, until it succeeds or the pod
    /// goes: the CNI plugin's answer names it.
    failures: Mutex<BTreeMap<String, String>>,
    /// The netns file each pod was enrolled with (device and inode of its
    /// path when opened), to notice it vanish or be replaced while the
    /// agent still holds it open (see [`netns_gone`]).
    netns_ids: Mutex<BTreeMap<String, NetnsId>>,
}

/// A netns file's device and inode: what its path must still name.
type NetnsId = (u64, u64);

fn netns_id(path: &std::path::Path) -> Option<NetnsId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Why a pod's netns, enrolled as `enrolled`, is no longer there at `path`:
/// deleted (`ip netns del`, the runtime tearing the sandbox down while the
/// config still lists the pod), or replaced by another netns under the
/// same name. Holding the old one open keeps it alive (listeners, the
/// netns fd, pooled connections dialled from it): the agent must let go.
fn netns_gone(path: &std::path::Path, enrolled: NetnsId) -> Option<&'static str> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("deleted"),
        Ok(m) if (m.dev(), m.ino()) != enrolled => Some("replaced by another netns"),
        _ => None,
    }
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
        Arc::new(Pods {
            ctx,
            redirect,
            running: Mutex::default(),
            failures: Mutex::default(),
            netns_ids: Mutex::default(),
        })
    }

    /// Brings the running pods in line with `state`: every local HBONE
    /// workload enrolled with its current definition, nothing else. Also
    /// retries pods whose enrollment failed before (say, their netns was not
    /// there yet), so calling it again is how failures heal.
    ///
    /// A pod whose netns vanished under the agent (its path deleted or
    /// naming another netns) is removed even while the state still lists
    /// it: its listeners and the netns fd would otherwise keep a dead pod's
    /// network alive for good. It is enrolled again once its path names a
    /// netns again.
    pub async fn sync(&self, state: &State) {
        let wanted: BTreeMap<String, Arc<Workload>> = state
            .local_workloads(state.node())
            .into_iter()
            .filter(|w| w.protocol == Protocol::Hbone)
            .map(|w| (w.uid.clone(), w))
            .collect();
        let stale: Vec<String> = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let ids = self.netns_ids.lock().unwrap_or_else(|e| e.into_inner());
            running
                .iter()
                .filter(|(uid, r)| {
                    if wanted.get(*uid).is_none_or(|w| !same_enrollment(w, &r.pod.workload)) {
                        return true;
                    }
                    let path = r.pod.netns.path();
                    let Some(why) = ids.get(*uid).and_then(|id| netns_gone(path, *id)) else { return false };
                    warn!(pod = %uid, netns = %path.display(), "the pod's netns was {why} under the agent; removing the pod");
                    true
                })
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
                    // Logged when the reason changes, not at every resync.
                    let why = format!("{e:#}");
                    let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                    if failures.get(uid) != Some(&why) {
                        warn!(pod = %uid, error = %why, "enrolling pod failed; will retry");
                    }
                    failures.insert(uid.clone(), why);
                }
            }
        }
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).retain(|uid, _| wanted.contains_key(uid));
        {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let mut ids = self.netns_ids.lock().unwrap_or_else(|e| e.into_inner());
            ids.retain(|uid, _| running.contains_key(uid) || wanted.contains_key(uid));
        }
        self.ctx.metrics.enrolled_pods.set(self.running.lock().unwrap_or_else(|e| e.into_inner()).len() as i64);
    }

    pub async fn enroll(&self, w: Arc<Workload>) -> Result<()> {
        let started = Instant::now();
        let netns_path = w.netns.as_ref().with_context(|| format!("pod {} has no netns", w.uid))?;
        let netns = Arc::new(Netns::open(netns_path).with_context(|| format!("enrolling pod {}", w.uid))?);
        // What the path names now, to tell later whether it still does.
        match netns_id(netns_path) {
            Some(id) => self.netns_ids.lock().unwrap_or_else(|e| e.into_inner()).insert(w.uid.clone(), id),
            None => self.netns_ids.lock().unwrap_or_else(|e| e.into_inner()).remove(&w.uid),
        };
        let id = self.ctx.spiffe_id(&w)?;
        let server_tls = tls::server_config(
            self.ctx.certs.clone(),
            id.clone(),
            self.ctx.roots.clone(),
            self.ctx.state().trust_domain().to_owned(),
        )
        .with_context(|| format!("TLS config for pod {}", w.uid))?;
        let assigned = if self.redirect.assigns_inbound() {
            listen_both(&netns, 0, &w.ips).with_context(|| format!("pod {}: inbound assign listener", w.uid))?
        } else {
            Vec::new()
        };
        let assign_ports = assigned.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect();
        let pod = Arc::new(PodCtx {
            workload: w.clone(),
            netns: netns.clone(),
            id,
            server_tls,
            app_mark: self.redirect.app_mark(),
            // Only the eBPF datapath keys sockets by it (and it needs 5.14);
            // iptables capture must work without it.
            netns_cookie: netns.cookie().unwrap_or(0),
            assign_ports,
        });

        let out =
            listen_both(&netns, OUTBOUND_PORT, &w.ips).with_context(|| format!("pod {}: outbound listener", w.uid))?;
        let plain = listen_both(&netns, INBOUND_PLAINTEXT_PORT, &w.ips)
            .with_context(|| format!("pod {}: inbound listener", w.uid))?;
        let hbone =
            listen_both(&netns, HBONE_PORT, &w.ips).with_context(|| format!("pod {}: HBONE listener", w.uid))?;
        let plain_fds: Vec<RawFd> =
            if assigned.is_empty() { &plain } else { &assigned }.iter().map(|l| l.as_raw_fd()).collect();
        let listening = started.elapsed();

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
        // On failure the listeners are dropped here, unserved.
        enrolled?;
        // Served only now that the return path is in place (see the module doc).
        let (shutdown, shutdown_rx) = watch::channel(false);
        let outbound_tasks =
            out.into_iter().map(|l| tokio::spawn(outbound::serve(l, pod.clone(), self.ctx.clone()))).collect();
        let mut inbound_tasks = Vec::new();
        // 15006 takes iptables' REDIRECTs; in eBPF mode it only ever sees
        // direct connections (refused as the agent's own port), while tc
        // assigns the pod's inbound SYNs to the port-0 listeners.
        for l in plain {
            inbound_tasks.push(tokio::spawn(inbound_plaintext::serve(
                l,
                pod.clone(),
                self.ctx.clone(),
                Arrival::Redirected,
            )));
        }
        for l in assigned {
            inbound_tasks.push(tokio::spawn(inbound_plaintext::serve(
                l,
                pod.clone(),
                self.ctx.clone(),
                Arrival::Assigned,
            )));
        }
        for l in hbone {
            inbound_tasks.push(tokio::spawn(inbound::serve(l, pod.clone(), self.ctx.clone(), shutdown_rx.clone())));
        }
        info!(
            pod = %w.uid,
            identity = %pod.id,
            mode = %self.redirect.mode(),
            listen_ms = ms(listening),
            capture_ms = ms(started.elapsed() - listening),
            "pod enrolled"
        );
        let mut local = self.ctx.local_pods.write().unwrap_or_else(|e| e.into_inner());
        for ip in &w.ips {
            local.insert(canonical_ip(*ip), pod.clone());
        }
        drop(local);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.uid.clone(), Running { pod, inbound_tasks, outbound_tasks, shutdown });
        Ok(())
    }

    /// Closes the inbound listeners and sends GOAWAY on HBONE connections,
    /// removes capture, closes the outbound listener and drops the pod's
    /// certificate (see the module doc for the order).
    pub async fn remove(&self, uid: &str) {
        let started = Instant::now();
        let Some(running) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(uid) else {
            return;
        };
        stop(running.inbound_tasks).await;
        let _ = running.shutdown.send(true);
        let pod = running.pod.clone();
        self.ctx.local_pods.write().unwrap_or_else(|e| e.into_inner()).retain(|_, p| !Arc::ptr_eq(p, &pod));
        // Connections those listeners accepted last may not have reached
        // the app yet (their tasks wait for a worker): let them, while the
        // return path is still there.
        tokio::time::sleep(RETURN_PATH_GRACE).await;
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
        stop(running.outbound_tasks).await;
        // Its pooled HBONE connections were dialled from its netns: nobody
        // else may ride them, and they must not outlive it.
        let dropped = self.ctx.pool.remove_source(uid);
        self.ctx.certs.forget(&running.pod.id);
        info!(pod = %uid, ms = ms(started.elapsed()), pooled_connections_closed = dropped, "pod removed");
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
            r.inbound_tasks.iter().chain(&r.outbound_tasks).for_each(JoinHandle::abort);
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
    ///
    /// With `ca.dir`, the CA directory is looked at first, so that a CA
    /// rotated there signs the renewals (`CertCache::check_dir`).
    pub fn refresh_certs(&self) {
        let dir = self.ctx.state().ca().dir.clone();
        if !dir.as_os_str().is_empty() {
            self.ctx.certs.check_dir(&dir);
        }
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

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

fn humantime(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs} (unix)")
}
