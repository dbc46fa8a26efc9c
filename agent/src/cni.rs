//! The agent's end of the CNI plugin (`sluice-cni`): a Unix socket where
//! the plugin reports each pod the runtime sets up or tears down, so the pod
//! is captured before its containers start (the `/proc` scan only finds pods
//! that already run a process).
//!
//! The agent stays the one that decides: an ADD gives the pod's netns, IPs
//! and container id as *hints* to the Kubernetes source, which enrolls the
//! pod if its labels say so, through the same state and `Pods::sync` as
//! every other change; the answer waits until capture is in place (or the
//! pod is known not to be enrolled). With the local file as the source, an
//! ADD is answered from the file's workloads.
//!
//! Everything from the socket is checked (uid shape, names, netns path),
//! every read and write is bounded in size and time, and the socket is
//! created root-only.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sluice_cni::protocol::{Command, Outcome, PodRef, Request, Response, MAX_MESSAGE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::inpod::{discover, Pods};
use crate::kubernetes::{Hint, Hints};
use crate::state::{names, Protocol, State, Workload};

/// How long one plugin connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// An ADD waits at most this long for the pod to be enrolled, leaving the
/// plugin (which waits `ADD_TIMEOUT_SECS`) time to report why.
const ENROLL_WAIT: Duration = Duration::from_secs(25);
/// A DEL waits at most this long for capture to be gone.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

pub struct CniServer {
    pub pods: Arc<Pods>,
    /// Asks the agent's main loop for a `Pods::sync` now (it alone runs
    /// them, so two never race to enroll one pod).
    pub resync: Arc<tokio::sync::Notify>,
    pub states: watch::Receiver<Arc<State>>,
    /// `None` with the file source: it does not take hints.
    pub hints: Option<Arc<Hints>>,
    pub ready: Arc<AtomicBool>,
    pub cgroup_root: PathBuf,
}

/// The bound socket; removes its path on drop unless another agent (an
/// upgrade beside this one) has taken the path over since.
pub struct Socket {
    path: PathBuf,
    ino: u64,
}

impl Drop for Socket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` (taking it over from a previous agent: a new agent starts
/// beside the old one during an upgrade, and the plugin must reach the new
/// one from then on) and serves it until the runtime ends.
pub fn serve(path: &Path, server: Arc<CniServer>) -> Result<Socket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("replacing the old socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket; refusing to replace it", path.display()),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding the CNI socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", path.display()))?;
    let ino = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?.ino();
    info!(socket = %path.display(), "serving the CNI plugin");
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let server = server.clone();
            tokio::spawn(async move {
                if let Err(e) = server.connection(stream).await {
                    debug!(error = format!("{e:#}"), "CNI plugin connection");
                }
            });
        }
    });
    Ok(Socket { path: path.to_owned(), ino })
}

impl CniServer {
    async fn connection(&self, stream: UnixStream) -> Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = Vec::new();
        let mut reader = BufReader::new(read).take(MAX_MESSAGE as u64 + 1);
        tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line))
            .await
            .context("the plugin sent no request in time")?
            .context("reading the plugin's request")?;
        let response = match parse(&line) {
            Ok(req) => {
                let span = tracing::info_span!("cni", command = ?req.command, pod = %format!("{}/{}", req.pod.namespace, req.pod.name), uid = %req.pod.uid);
                self.handle(req).instrument(span).await
            }
            Err(e) => Response { result: Err(e), detail: String::new() },
        };
        let mut out = serde_json::to_vec(&response).context("encoding the response")?;
        out.push(b'\n');
        tokio::time::timeout(READ_TIMEOUT, write.write_all(&out))
            .await
            .context("the plugin did not read in time")??;
        Ok(())
    }

    async fn handle(&self, req: Request) -> Response {
        let result = match req.command {
            Command::Status if self.ready.load(Ordering::Relaxed) => Ok((Outcome::Ready, "agent ready".into())),
            Command::Status => Err("the agent is starting or shutting down".into()),
            Command::Add => self.add(&req.pod).await,
            Command::Check => self.check(&req.pod),
            Command::Del => self.del(&req.pod).await,
            Command::Gc => self.gc(&req).await,
        };
        match result {
            Ok((outcome, detail)) => {
                info!(?outcome, %detail, "CNI request done");
                Response { result: Ok(outcome), detail }
            }
            Err(e) => {
                warn!(error = %e, "CNI request failed");
                Response { result: Err(e), detail: String::new() }
            }
        }
    }

    /// The workload `pod` is, in `state`: by uid (the Kubernetes source keys
    /// workloads by it), else by namespace and name (the file's own uids).
    fn find(state: &State, pod: &PodRef) -> Option<Arc<Workload>> {
        state.workload_by_uid(&pod.uid).or_else(|| {
            state.local_workloads(state.node()).into_iter().find(|w| w.namespace == pod.namespace && w.name == pod.name)
        })
    }

    async fn add(&self, pod: &PodRef) -> Result<(Outcome, String), String> {
        check_pod(pod, true)?;
        let who = format!("pod {}/{} ({})", pod.namespace, pod.name, pod.uid);
        if let Some(hints) = &self.hints {
            let root = self.cgroup_root.clone();
            let uid = pod.uid.clone();
            let cgroup =
                tokio::task::spawn_blocking(move || discover::find_pod_cgroup(&root, &uid)).await.ok().flatten();
            if cgroup.is_none() {
                warn!(root = %self.cgroup_root.display(), "the pod's cgroup was not found; eBPF capture will wait for it");
            }
            hints.add(
                pod.uid.clone(),
                Hint {
                    netns: PathBuf::from(&pod.netns),
                    cgroup,
                    ips: pod.ips.clone(),
                    container_id: pod.container_id.clone(),
                },
            );
        }
        // The file source already lists the pod; what was missing is its
        // netns, which the runtime has just made.
        self.resync.notify_one();
        let deadline = Instant::now() + ENROLL_WAIT;
        let mut states = self.states.clone();
        loop {
            let state = states.borrow_and_update().clone();
            match Self::find(&state, pod) {
                Some(w)
                    if w.protocol == Protocol::Hbone && w.is_on_node(state.node()) && self.pods.is_enrolled(&w.uid) =>
                {
                    let id = w.principal(state.trust_domain());
                    return Ok((Outcome::Captured, format!("{who} is enrolled as {id}; capture in place")));
                }
                // Enrolled, capture not in place yet: wait for Pods::sync.
                Some(w) if w.protocol == Protocol::Hbone && w.is_on_node(state.node()) => {}
                Some(w) => {
                    let why = if w.protocol == Protocol::Tcp { "not enrolled (labels)" } else { "on another node" };
                    return Ok((Outcome::NotEnrolled, format!("{who}: {why}")));
                }
                None if self.hints.is_none() => {
                    return Ok((Outcome::NotEnrolled, format!("{who}: not listed in the config file")));
                }
                None => {}
            }
            if Instant::now() >= deadline {
                let why = match Self::find(&state, pod) {
                    Some(w) => self.pods.enroll_failure(&w.uid).unwrap_or_else(|| "enrollment is still pending".into()),
                    None => "the API server has not shown this agent the pod yet".into(),
                };
                return Err(format!("{who} was not captured within {} s: {why}", ENROLL_WAIT.as_secs()));
            }
            // Woken by a new state, or every 20 ms for the enrollment itself
            // (Pods::sync runs after the state is published).
            let _ = tokio::time::timeout(Duration::from_millis(20), states.changed()).await;
        }
    }

    fn check(&self, pod: &PodRef) -> Result<(Outcome, String), String> {
        check_pod(pod, false)?;
        let state = self.states.borrow().clone();
        let who = format!("pod {}/{}", pod.namespace, pod.name);
        match Self::find(&state, pod) {
            Some(w) if w.protocol == Protocol::Hbone && w.is_on_node(state.node()) => {
                if self.pods.is_enrolled(&w.uid) {
                    Ok((Outcome::Captured, format!("{who}: capture in place")))
                } else {
                    Err(format!("{who} should be enrolled but its capture is not in place"))
                }
            }
            _ => Ok((Outcome::NotEnrolled, format!("{who}: not enrolled"))),
        }
    }

    async fn del(&self, pod: &PodRef) -> Result<(Outcome, String), String> {
        // DEL may come with little more than the container id: nothing to
        // check, and nothing to refuse.
        let Some(hints) = &self.hints else {
            return Ok((Outcome::Removed, "file source: capture follows the config file".into()));
        };
        let uid = match (pod.uid.is_empty(), hints.uid_of_container(&pod.container_id)) {
            (false, _) => pod.uid.clone(),
            (true, Some(uid)) => uid,
            (true, None) => return Ok((Outcome::Removed, "unknown pod; nothing to remove".into())),
        };
        hints.remove(&uid);
        let deadline = Instant::now() + REMOVE_WAIT;
        while self.pods.is_enrolled(&uid) {
            if Instant::now() >= deadline {
                return Err(format!("pod {uid}: capture was still in place after {} s", REMOVE_WAIT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((Outcome::Removed, format!("pod {uid}: capture removed")))
    }

    async fn gc(&self, req: &Request) -> Result<(Outcome, String), String> {
        let Some(hints) = &self.hints else {
            return Ok((Outcome::Removed, "file source: nothing to collect".into()));
        };
        let valid: HashSet<&str> = req.valid_attachments.iter().map(|a| a.container_id.as_str()).collect();
        let stale = hints.retain_containers(&valid);
        for uid in &stale {
            let deadline = Instant::now() + REMOVE_WAIT;
            while self.pods.is_enrolled(uid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok((Outcome::Removed, format!("{} stale attachment(s) removed", stale.len())))
    }
}

fn parse(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_MESSAGE {
        return Err(format!("request longer than {MAX_MESSAGE} bytes"));
    }
    serde_json::from_slice(line).map_err(|e| format!("unreadable request: {e}"))
}

/// What an ADD (`full`) or CHECK must carry, checked.
fn check_pod(pod: &PodRef, full: bool) -> Result<(), String> {
    discover::canonical_pod_uid(&pod.uid)
        .filter(|u| *u == pod.uid)
        .ok_or_else(|| format!("K8S_POD_UID {:?} is not a pod UID (lowercase 8-4-4-4-12 hex)", pod.uid))?;
    names::check_dns_label(&pod.namespace).map_err(|e| format!("K8S_POD_NAMESPACE {:?}: {e}", pod.namespace))?;
    names::check_dns_subdomain(&pod.name).map_err(|e| format!("K8S_POD_NAME {:?}: {e}", pod.name))?;
    if !full {
        return Ok(());
    }
    let netns = Path::new(&pod.netns);
    if !netns.is_absolute() || !netns.exists() {
        return Err(format!("CNI_NETNS {:?} is not an existing absolute path", pod.netns));
    }
    if pod.ips.iter().any(|ip: &IpAddr| ip.is_unspecified() || ip.is_loopback() || ip.is_multicast()) {
        return Err(format!("prevResult IPs {:?}: not a pod address", pod.ips));
    }
    Ok(())
}
