//! Discovery from the Kubernetes API, as kube-rs controllers do it: one
//! `watcher` + `reflector` per resource (with kube-runtime's default
//! backoff) feeds a store, and a builder turns a snapshot of the stores into
//! a [`State`] published on the same `watch` channel the file source uses.
//! The data path reads that snapshot and never calls the API server.
//!
//! - `objects`: the watched types, declared with only the fields read.
//! - `enroll`: which pods are in the mesh, by Istio's labels.
//! - `inventory`: stores to `Inventory` (pure).
//! - `local`: where this node's pods are (netns, cgroup), from `/proc`.
//!
//! Watches: this node's pods (fieldSelector `spec.nodeName`, all labels),
//! every pod (only the labels enrollment and metrics read), namespaces,
//! services, EndpointSlices, and Istio's AuthorizationPolicy and
//! PeerAuthentication. When Istio's CRDs are not installed (the list answers
//! 404) the agent says so once and carries on without them; the watcher
//! keeps retrying, so installing them later takes effect.
//!
//! Changes are coalesced: a rebuild starts [`SETTLE`] after the first change
//! (one API change reaches up to three watches within a few milliseconds),
//! and at least [`DEBOUNCE`] after the previous rebuild ended, so a rollout
//! that touches a hundred objects costs a few rebuilds, not a hundred, and
//! a lone change (a label that enrolls a pod) is not held back. A rebuild
//! that changes nothing publishes nothing.

mod enroll;
mod inventory;
#[cfg(test)]
mod inventory_tests;
mod local;
pub mod objects;

pub use enroll::{is_enrolled, workload_name, ISTIO_MODE, SLUICE_MODE};
pub use inventory::{build, build_with, local_enrolled, Built, Cni, Problem, Stores};
pub use local::{Hint, Hints};

use std::collections::HashSet;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::state::{Inventory, Mesh, State};
use local::LocalPods;

/// How long after the first change of a burst its rebuild starts.
pub const SETTLE: Duration = Duration::from_millis(10);
/// The least time between the end of one rebuild and the start of the
/// next: under a stream of changes, rebuilding takes at most
/// rebuild / (rebuild + 50 ms) of a core.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// While an enrolled pod on this node has not been found in `/proc`, look
/// again this often (its sandbox may still be starting).
const RESCAN: Duration = Duration::from_millis(250);
/// How long after the last state published the memory of the replaced
/// ones is handed back to the kernel.
const TRIM_AFTER: Duration = Duration::from_millis(500);
/// While the initial lists are not all in, say which every so often.
const WAITING_LOG: Duration = Duration::from_secs(10);

/// Where discovery stands, per resource; shown by `/config_dump`.
#[derive(Default)]
pub struct ResourceStatus {
    pub resource: &'static str,
    pub ready: AtomicBool,
    /// Only for Istio's CRDs: the API server answered 404 to the list.
    pub absent: AtomicBool,
    pub events: AtomicU64,
    pub errors: AtomicU64,
    last_error: Mutex<Option<(String, Instant)>>,
    crd: bool,
}

/// A watch error is logged when it differs from the last one, or when the
/// last one was logged this long ago: a dead API server must not flood the
/// log at the backoff's pace.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

impl ResourceStatus {
    fn new(resource: &'static str, crd: bool) -> Arc<ResourceStatus> {
        Arc::new(ResourceStatus { resource, crd, ..Default::default() })
    }

    fn listed(&self) {
        if self.absent.swap(false, Ordering::Relaxed) {
            info!(resource = self.resource, "Istio CRD is installed now; its objects apply");
        }
        if !self.ready.swap(true, Ordering::Relaxed) {
            info!(resource = self.resource, "initial list done");
        }
    }

    fn failed(&self, e: &watcher::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let not_found = matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
        if self.crd && not_found {
            if !self.absent.swap(true, Ordering::Relaxed) {
                warn!(
                    resource = self.resource,
                    "Istio's CRD is not installed; carrying on without these policies (retrying in the background)"
                );
            }
            self.ready.store(true, Ordering::Relaxed);
            return;
        }
        let message = e.to_string();
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        let repeat = last.as_ref().is_some_and(|(m, at)| *m == message && at.elapsed() < ERROR_LOG_EVERY);
        if !repeat {
            warn!(resource = self.resource, error = %message, "watch failed; retrying with backoff");
            *last = Some((message, Instant::now()));
        }
    }
}

/// What `/config_dump` shows about the Kubernetes source.
pub struct Status {
    pub resources: Vec<Arc<ResourceStatus>>,
    pub rebuilds: AtomicU64,
    pub proc_scans: AtomicU64,
    /// Enrolled pods on this node not found in `/proc` yet.
    pub unresolved: Mutex<Vec<String>>,
    /// The objects left out or changed, as last logged.
    pub problems: Mutex<Vec<String>>,
}

impl Status {
    pub fn dump(&self) -> serde_json::Value {
        let lock = |m: &Mutex<Vec<String>>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        serde_json::json!({
            "resources": self.resources.iter().map(|r| serde_json::json!({
                "resource": r.resource,
                "ready": r.ready.load(Ordering::Relaxed),
                "crdAbsent": r.absent.load(Ordering::Relaxed),
                "events": r.events.load(Ordering::Relaxed),
                "errors": r.errors.load(Ordering::Relaxed),
                "lastError": r.last_error.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(m, _)| m.clone()),
            })).collect::<Vec<_>>(),
            "rebuilds": self.rebuilds.load(Ordering::Relaxed),
            "procScans": self.proc_scans.load(Ordering::Relaxed),
            "unresolvedPods": lock(&self.unresolved),
            "problems": lock(&self.problems),
        })
    }
}

/// Everything the Kubernetes source needs besides the client.
pub struct Options {
    pub mesh: Mesh,
    pub node: String,
    pub proc_root: PathBuf,
    pub cgroup_mount: PathBuf,
}

struct Watched {
    local_pods: Store<objects::Pod>,
    pods: Store<objects::Pod>,
    namespaces: Store<objects::Namespace>,
    services: Store<objects::Service>,
    slices: Store<objects::EndpointSlice>,
    authorization_policies: Store<objects::AuthorizationPolicy>,
    peer_authentications: Store<objects::PeerAuthentication>,
}

impl Watched {
    fn snapshot(&self) -> Stores {
        Stores {
            local_pods: self.local_pods.state(),
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            authorization_policies: self.authorization_policies.state(),
            peer_authentications: self.peer_authentications.state(),
        }
    }
}

/// Starts the watches and returns once every initial list is in (or, for
/// Istio's CRDs, found absent), with the first state. Waits as long as it
/// takes, saying what it waits for every [`WAITING_LOG`]; the caller races
/// it against shutdown signals.
/// A running Kubernetes source.
pub struct Started {
    pub states: watch::Receiver<Arc<State>>,
    pub status: Arc<Status>,
    /// Where the CNI server reports pods.
    pub hints: Arc<Hints>,
}

pub async fn start(client: Client, opts: Options) -> Result<Started> {
    let notify = Arc::new(Notify::new());
    let hints = Arc::new(Hints::new(notify.clone()));
    let mut resources = Vec::new();
    let node_selector = format!("spec.nodeName={}", opts.node);
    let watched = Watched {
        local_pods: spawn_watch(
            Api::all(client.clone()),
            watcher::Config::default().fields(&node_selector),
            None,
            status(&mut resources, "pods (this node)", false),
            &notify,
        ),
        pods: spawn_watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            Some(objects::REMOTE_POD_LABELS),
            status(&mut resources, "pods", false),
            &notify,
        ),
        namespaces: spawn_watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            Some(&[ISTIO_MODE, SLUICE_MODE]),
            status(&mut resources, "namespaces", false),
            &notify,
        ),
        services: spawn_watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            Some(&[]),
            status(&mut resources, "services", false),
            &notify,
        ),
        slices: spawn_watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            Some(&["kubernetes.io/service-name"]),
            status(&mut resources, "endpointslices", false),
            &notify,
        ),
        authorization_policies: spawn_watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            Some(&[]),
            status(&mut resources, "authorizationpolicies.security.istio.io", true),
            &notify,
        ),
        peer_authentications: spawn_watch(
            Api::all(client),
            watcher::Config::default(),
            Some(&[]),
            status(&mut resources, "peerauthentications.security.istio.io", true),
            &notify,
        ),
    };
    let status = Arc::new(Status {
        resources,
        rebuilds: AtomicU64::new(0),
        proc_scans: AtomicU64::new(0),
        unresolved: Mutex::default(),
        problems: Mutex::default(),
    });

    let started = Instant::now();
    let mut last_log = Instant::now();
    loop {
        let pending: Vec<&str> =
            status.resources.iter().filter(|r| !r.ready.load(Ordering::Relaxed)).map(|r| r.resource).collect();
        if pending.is_empty() {
            break;
        }
        if last_log.elapsed() >= WAITING_LOG {
            warn!(waiting_for = ?pending, seconds = started.elapsed().as_secs(), "waiting for the API server's initial lists");
            last_log = Instant::now();
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), notify.notified()).await;
    }
    info!(ms = started.elapsed().as_millis() as u64, "Kubernetes discovery ready");

    let mut builder = Builder {
        watched,
        opts,
        local: None,
        status: status.clone(),
        logged: HashSet::new(),
        published: None,
        generation: 0,
        hints: hints.clone(),
    };
    let state = builder
        .rebuild()
        .context("building the first state from the API server's objects")?
        .context("the first build always yields a state")?;
    release_freed_memory();
    let (tx, rx) = watch::channel(Arc::new(state));
    tokio::spawn(builder.run(tx, notify));
    Ok(Started { states: rx, status, hints })
}

fn status(all: &mut Vec<Arc<ResourceStatus>>, resource: &'static str, crd: bool) -> Arc<ResourceStatus> {
    let s = ResourceStatus::new(resource, crd);
    all.push(s.clone());
    s
}

/// One reflector: its store, fed by a task that also wakes the builder.
fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    keep_labels: Option<&'static [&'static str]>,
    status: Arc<ResourceStatus>,
    notify: &Arc<Notify>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let notify = notify.clone();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(move |o: &mut K| objects::trim(o.meta_mut(), keep_labels))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::InitDone) => {
                    status.listed();
                    notify.notify_one();
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => {
                    status.events.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(resource = status.resource, "watch event");
                    notify.notify_one();
                }
                Ok(Event::Init | Event::InitApply(_)) => {}
                Err(e) => {
                    status.failed(&e);
                    // An absent CRD counts as listed: let the builder go on.
                    notify.notify_one();
                }
            }
        }
    });
    reader
}

struct Builder {
    watched: Watched,
    opts: Options,
    /// Created on first use: the first rebuild runs on the caller's task.
    local: Option<LocalPods>,
    status: Arc<Status>,
    /// Problems already logged (they are logged again once they go away
    /// and come back).
    logged: HashSet<Problem>,
    /// [`fingerprint`] of the last inventory published.
    published: Option<u64>,
    generation: u64,
    hints: Arc<Hints>,
}

/// Hands freed memory back to the kernel: after the initial lists (their
/// page buffers, decoded pages and the reflectors' init buffers are freed
/// once the stores hold the trimmed objects) and after a state is replaced.
/// glibc keeps such memory in its arenas, where it would count as the
/// agent's RSS for the rest of its life.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A hash of everything in `inventory`, to tell a rebuild that changed
/// nothing (a pod's status heartbeat, a resourceVersion bump) from one that
/// did, without keeping a second copy of a 10,000-pod inventory around. A
/// 64-bit SipHash collision would hold back one update until the next
/// change; at one rebuild per change that is not a practical risk.
fn fingerprint(inventory: &Inventory) -> u64 {
    use std::hash::Hasher;
    struct HashWriter(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Default::default());
    // Serializing plain data into a hasher cannot fail.
    let _ = serde_json::to_writer(&mut w, inventory);
    w.0.finish()
}

impl Builder {
    async fn run(mut self, tx: watch::Sender<Arc<State>>, notify: Arc<Notify>) {
        // The first state was built just before.
        let mut built = Instant::now();
        // When to hand the memory of replaced states back (see below).
        let mut trim_at: Option<Instant> = None;
        loop {
            let unresolved = !self.status.unresolved.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
            let woken = tokio::select! {
                _ = notify.notified() => {
                    let woken = Instant::now();
                    tokio::time::sleep_until((woken + SETTLE).max(built + DEBOUNCE).into()).await;
                    woken
                }
                _ = tokio::time::sleep(RESCAN), if unresolved => Instant::now(),
                _ = tokio::time::sleep_until(trim_at.unwrap_or_else(Instant::now).into()), if trim_at.is_some() => {
                    release_freed_memory();
                    trim_at = None;
                    continue;
                }
                _ = tx.closed() => return,
            };
            let building = Instant::now();
            // block_in_place: the /proc scan is blocking file I/O.
            match tokio::task::block_in_place(|| self.rebuild()) {
                Ok(Some(state)) => {
                    info!(
                        generation = state.generation(),
                        workloads = state.workloads().count(),
                        services = state.services().count(),
                        // From the first change of the batch: the wait, then the rebuild.
                        since_change_ms = woken.elapsed().as_millis() as u64,
                        rebuild_ms = building.elapsed().as_millis() as u64,
                        "state rebuilt from the API server"
                    );
                    tx.send_replace(Arc::new(state));
                    // The state just replaced is freed once its readers
                    // have moved on; each rebuild may run on another
                    // worker, so its memory stays in that thread's malloc
                    // arena. Without this, RSS grew by about four states
                    // over five changes at 10,000 pods. Only once changes
                    // pause: a trim takes a while at that size and would
                    // hold up the next rebuild.
                    trim_at = Some(Instant::now() + TRIM_AFTER);
                }
                Ok(None) => {}
                Err(e) => error!(error = format!("{e:#}"), "rebuilding state failed; keeping the last one"),
            }
            built = Instant::now();
        }
    }

    /// A state from the stores as they are now, or `None` when it would be
    /// the same as the last one built.
    fn rebuild(&mut self) -> Result<Option<State>> {
        let stores = self.watched.snapshot();
        let node = &self.opts.node;
        let (hints, removed) = self.hints.snapshot();
        let listed: HashSet<&str> = stores.local_pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
        self.hints.forget_removed(&listed);
        let mut wanted = local_enrolled(&stores, node);
        wanted.retain(|uid| !removed.contains(uid));
        let local = self
            .local
            .get_or_insert_with(|| LocalPods::new(self.opts.proc_root.clone(), self.opts.cgroup_mount.clone()));
        let unresolved = local.resolve(&wanted, &hints);
        self.status.proc_scans.store(local.scans(), Ordering::Relaxed);
        let cni = Cni { hints: Some(&hints), removed: Some(&removed) };
        let built = build_with(&stores, node, local.found(), cni);
        self.status.rebuilds.fetch_add(1, Ordering::Relaxed);

        let current: HashSet<Problem> = built.problems.into_iter().collect();
        for p in current.difference(&self.logged) {
            if p.fatal {
                error!(object = %p.object, resource_version = %p.resource_version, problem = %p.message, "Kubernetes object rejected");
            } else {
                warn!(object = %p.object, resource_version = %p.resource_version, problem = %p.message, "Kubernetes object");
            }
        }
        *self.status.problems.lock().unwrap_or_else(|p| p.into_inner()) =
            current.iter().map(|p| format!("{}: {}", p.object, p.message)).collect();
        self.logged = current;
        if !unresolved.is_empty() {
            tracing::debug!(pods = ?unresolved, "enrolled pods on this node not found in /proc yet");
        }
        *self.status.unresolved.lock().unwrap_or_else(|p| p.into_inner()) = unresolved;

        let print = fingerprint(&built.inventory);
        if self.published == Some(print) {
            return Ok(None);
        }
        if self.published.is_some() {
            self.generation += 1;
        }
        self.published = Some(print);
        Ok(Some(State::from_inventory(self.opts.mesh.clone(), node, built.inventory).with_generation(self.generation)))
    }
}
