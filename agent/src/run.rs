//! The agent's main loop: load config and CA, pick the capture mode, serve
//! the node endpoints, keep enrolled pods in line with the config, and shut
//! down gracefully on SIGTERM/SIGINT.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use http::StatusCode;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{error, info, warn, Instrument};

use crate::{
    admin::{self, Route},
    bpf::{Datapath, DatapathCollector, PinRoot, SpliceMaps},
    cni::{self, CniServer},
    inpod::Pods,
    keeper::Keeper,
    kubernetes,
    metrics::{Metrics, ModeLabel, ResultLabel},
    proxy::{splice, Ctx},
    redirect::{ebpf::EbpfRedirect, iptables::IptablesRedirect, probe, Mode, Redirect},
    state::{Config, ConfigWatcher, State},
    tunnel::pool::Pool,
};

/// `--redirect`: how pod traffic is captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectChoice {
    Auto,
    Ebpf,
    Iptables,
}

pub struct RunOptions {
    pub config: PathBuf,
    /// Discover from the API server this kubeconfig points at (else
    /// in-cluster credentials when present, else the config file).
    pub kubeconfig: Option<PathBuf>,
    /// The host's /proc, scanned for pods already running.
    pub proc_root: PathBuf,
    /// Where the CNI plugin reaches the agent.
    pub cni_socket: PathBuf,
    /// Where pods' cgroups are looked for (default: the cgroup v2 mount).
    pub cgroup_root: Option<PathBuf>,
    pub node: String,
    pub redirect: RedirectChoice,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub cleanup: bool,
    /// How long in-flight connections may take to finish after SIGTERM.
    pub drain: Duration,
    /// bpffs directory for eBPF mode's pinned maps.
    pub pin_root: PathBuf,
    /// Splice same-node connections in the kernel (eBPF mode only).
    pub splice: bool,
    /// The keeper's socket, for spliced connections to outlive the agent.
    pub keeper: Option<PathBuf>,
    /// Redirect loopback traffic inside pods socket to socket (eBPF mode;
    /// see `agent_common::CONFIG_LOOPBACK_BYPASS` for why it is opt-in).
    pub loopback_bypass: bool,
}

/// Idle HBONE connections close after this long.
const POOL_IDLE: Duration = Duration::from_secs(30);

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let metrics = Arc::new(Metrics::default());

    let (mut states, source) = tokio::select! {
        r = open_source(&opts, &metrics) => r?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let state = states.borrow().clone();
    // Local signing (ca.dir) or a CA service (ca.address): the file's `ca:`
    // section decides, read once at start.
    let ca_section = Config::load(&opts.config).with_context(|| format!("loading {}", opts.config.display()))?.ca;
    let (certs, roots) = crate::identity::open_certs(&ca_section)?;
    if let Some(collector) = certs.collector() {
        metrics.register_collector(Box::new(collector));
    }

    let redirect = choose_redirect(&opts)?;
    let mode = redirect.mode().to_string();
    metrics.redirect_mode.get_or_create(&ModeLabel { mode: mode.clone() }).set(1);
    if redirect.mode() == Mode::Ebpf {
        metrics.register_collector(Box::new(DatapathCollector(PinRoot::new(&opts.pin_root))));
    }

    let splice = match (redirect.mode(), opts.splice) {
        (Mode::Ebpf, true) => Some(SpliceMaps::open(&PinRoot::new(&opts.pin_root)).context("same-node splice")?),
        _ => None,
    };
    info!(mode = %mode, splice = splice.is_some(), "capture mode chosen");
    let ctx = Arc::new(Ctx {
        state: states.clone(),
        certs,
        roots,
        pool: Pool::new(POOL_IDLE),
        metrics: metrics.clone(),
        active: Default::default(),
        kept: Default::default(),
        splice,
        keeper: match (&opts.keeper, opts.splice && redirect.mode() == Mode::Ebpf) {
            (Some(path), true) => Some(Keeper::new(path)),
            _ => None,
        },
        local_pods: Default::default(),
    });
    let pods = Pods::new(ctx.clone(), redirect);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    serve_endpoints(&opts, &ctx, &pods, &ready, &mode, &source).await?;
    // An ADD wakes the loop below to enroll now: the pod's netns did not
    // exist at the last sync, and the next periodic one is seconds away.
    let resync_now = Arc::new(tokio::sync::Notify::new());
    let cni = CniServer {
        resync: resync_now.clone(),
        pods: pods.clone(),
        states: states.clone(),
        hints: match &source {
            Source::Kubernetes(_, hints) => Some(hints.clone()),
            Source::File(_) => None,
        },
        ready: ready.clone(),
        cgroup_root: match &opts.cgroup_root {
            Some(root) => root.clone(),
            None => crate::inpod::discover::cgroup2_mount().context("finding the cgroup v2 mount")?,
        },
    };
    let _cni_socket = cni::serve(&opts.cni_socket, Arc::new(cni))?;

    pods.sync(&state).await;
    adopt_spliced(&ctx);
    ready.store(true, Ordering::Relaxed);
    info!(node = %opts.node, mode = %mode, pods = pods.dump().len(), "sluice ready");
    // Tests and the demo wait for this line.
    println!("READY");

    let mut resync = tokio::time::interval(Duration::from_secs(5));
    // Check often enough to renew well before expiry even for short TTLs.
    let mut rotate =
        tokio::time::interval((state.ca().cert_ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(60)));
    let signal = loop {
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() {
                    break "state source ended";
                }
                let state = states.borrow_and_update().clone();
                metrics.config_reloads.get_or_create(&ResultLabel { result: "ok" }).inc();
                info!(generation = state.generation(), "state changed");
                pods.sync(&state).await;
                crate::proxy::revalidate(&ctx, &state);
            }
            _ = resync.tick() => pods.sync(&states.borrow().clone()).await,
            _ = resync_now.notified() => pods.sync(&states.borrow().clone()).await,
            _ = rotate.tick() => pods.refresh_certs(),
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    info!(signal, "shutting down: GOAWAY to HBONE clients, draining connections");
    ready.store(false, Ordering::Relaxed);
    pods.shutdown(opts.cleanup).await;
    let deadline = Instant::now() + opts.drain;
    let draining = || ctx.active.load(Ordering::Relaxed).saturating_sub(ctx.kept.load(Ordering::Relaxed));
    while draining() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = draining();
    if left > 0 {
        warn!(connections = left, "drain period over; closing the rest");
    }
    ctx.pool.clear();
    if opts.cleanup {
        PinRoot::new(&opts.pin_root).remove()?;
    }
    let kept = ctx.kept.load(Ordering::Relaxed);
    if kept > 0 && !opts.cleanup {
        // Returning would drop the runtime and with it each spliced
        // connection's task, whose socket halves shut down writing on drop:
        // a FIN to both apps through the sockets the keeper shares, and the
        // splice map entries removed. Exiting here leaves both as they are,
        // for the next agent to adopt, exactly as after a crash.
        info!(connections = kept, "leaving spliced connections to the keeper");
        std::process::exit(0);
    }
    Ok(())
}

/// Where workloads, services and policies come from.
enum Source {
    /// The config file, polled for changes (the handle keeps it alive).
    File(#[allow(dead_code)] tokio::task::JoinHandle<()>),
    Kubernetes(Arc<kubernetes::Status>, Arc<kubernetes::Hints>),
}

/// Where in-cluster credentials are mounted.
const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Picks and starts the source. `--kubeconfig` means the API server, as do
/// in-cluster credentials unless the config file lists workloads itself
/// (a file written for the local mode is not silently ignored).
async fn open_source(opts: &RunOptions, metrics: &Arc<Metrics>) -> Result<(watch::Receiver<Arc<State>>, Source)> {
    let file = opts.config.display().to_string();
    let config = Config::load(&opts.config).with_context(|| format!("loading the config {file}"))?;
    let listed = config.inventory_sections();
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && Path::new(IN_CLUSTER_TOKEN).exists();
    let client_config = match (&opts.kubeconfig, in_cluster) {
        (Some(path), _) => {
            if !listed.is_empty() {
                bail!(
                    "{file}: with --kubeconfig the API server is the source of workloads and policies; remove {} from the file (it may hold only trustDomain, ca and rootNamespace)",
                    listed.join(", ")
                );
            }
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Some(
                kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("using the kubeconfig {}", path.display()))?,
            )
        }
        (None, true) if listed.is_empty() => {
            Some(kube::Config::incluster().context("reading the in-cluster service account credentials")?)
        }
        (None, true) => {
            warn!(config = %file, sections = ?listed, "in-cluster credentials found, but the config file lists its own workloads; using the file");
            None
        }
        (None, false) => None,
    };
    let m = metrics.clone();
    let (file_states, watcher) = ConfigWatcher::spawn(&opts.config, &opts.node, move |e| {
        let result = match e {
            crate::state::ConfigError::NeedsRestart { .. } => "needs_restart",
            _ => "invalid",
        };
        m.config_reloads.get_or_create(&ResultLabel { result }).inc();
    })
    .with_context(|| format!("loading the config {file}"))?;
    let Some(client_config) = client_config else {
        return Ok((file_states, Source::File(watcher)));
    };
    // With the API server as the source, the file holds only mesh settings,
    // read once below. Watching it still says so when someone edits it:
    // trustDomain/ca.* are refused by the watcher itself, and any other
    // change (rootNamespace) is reported here instead of silently ignored.
    let (m, mut edits) = (metrics.clone(), file_states);
    tokio::spawn(async move {
        while edits.changed().await.is_ok() {
            m.config_reloads.get_or_create(&ResultLabel { result: "needs_restart" }).inc();
            warn!(config = %edits.borrow().root_namespace(), "the config file's mesh settings changed; with the Kubernetes source they apply at the next start (restart the agent)");
        }
        drop(watcher);
    });
    info!(api_server = %client_config.cluster_url, node = %opts.node, "discovering workloads from the Kubernetes API");
    let client = kube::Client::try_from(client_config).context("creating the Kubernetes client")?;
    let cgroup_mount = crate::inpod::discover::cgroup2_mount().context("finding the cgroup v2 mount")?;
    let options = kubernetes::Options {
        mesh: config.mesh(),
        node: opts.node.clone(),
        proc_root: opts.proc_root.clone(),
        cgroup_mount: match &opts.cgroup_root {
            Some(root) => root.clone(),
            None => cgroup_mount,
        },
    };
    let started = kubernetes::start(client, options).await?;
    Ok((started.states, Source::Kubernetes(started.status, started.hints)))
}

/// Takes over the spliced connections a previous agent left with the
/// keeper: their bytes kept flowing in the kernel; this agent passes their
/// half-closes on from now.
fn adopt_spliced(ctx: &Arc<Ctx>) {
    if ctx.keeper.is_none() {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        // The keeper may start after the agent: ask until it answers once.
        let kept = loop {
            let keeper = ctx.keeper.as_ref().expect("checked above");
            match tokio::task::block_in_place(|| keeper.list()) {
                Ok(k) => break k,
                Err(e) => {
                    warn!(error = format!("{e:#}"), "asking the keeper for spliced connections; retrying in 2 s");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        info!(connections = kept.len(), "adopting spliced connections from the keeper");
        for k in kept {
            let ctx = ctx.clone();
            let span = tracing::info_span!("adopted", id = %k.id);
            tokio::spawn(
                async move {
                    let _active = ctx.track();
                    if let Err(e) = splice::adopt(k, ctx.clone()).await {
                        tracing::debug!(error = format!("{e:#}"), "adopted connection ended");
                    }
                }
                .instrument(span),
            );
        }
    });
}

/// Picks the capture backend. `auto` takes eBPF when the probe finds every
/// piece, else iptables with one line naming what is missing; `ebpf` fails
/// with that same line instead of falling back.
fn choose_redirect(opts: &RunOptions) -> Result<Arc<dyn Redirect>> {
    let (choice, pin_root) = (opts.redirect, opts.pin_root.as_path());
    let iptables = || -> Result<Arc<dyn Redirect>> {
        Ok(Arc::new(IptablesRedirect::detect().context("detecting the iptables backend")?))
    };
    if choice == RedirectChoice::Iptables {
        return iptables();
    }
    let scratch = PinRoot::new(pin_root.with_file_name(format!("sluice-probe-{}", std::process::id())));
    let probe = probe::run(&scratch);
    if !probe.ebpf_possible() {
        let why = probe.missing_summary();
        if choice == RedirectChoice::Ebpf {
            bail!("--redirect ebpf: eBPF capture is not possible here: {why}");
        }
        warn!(reason = %why, "eBPF capture unavailable; falling back to iptables");
        return iptables();
    }
    match EbpfRedirect::new(PinRoot::new(pin_root), opts.loopback_bypass, opts.splice) {
        Ok(r) => Ok(Arc::new(r)),
        Err(e) if choice == RedirectChoice::Auto => {
            warn!(reason = format!("{e:#}"), "eBPF capture failed to start; falling back to iptables");
            iptables()
        }
        Err(e) => Err(e.context("--redirect ebpf")),
    }
}

async fn serve_endpoints(
    opts: &RunOptions,
    ctx: &Arc<Ctx>,
    pods: &Arc<Pods>,
    ready: &Arc<std::sync::atomic::AtomicBool>,
    mode: &str,
    source: &Source,
) -> Result<()> {
    let metrics = ctx.metrics.clone();
    let route: Route = Arc::new(move |path| match path {
        "/metrics" | "/stats/prometheus" => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    });
    admin::serve("metrics", opts.metrics, route).await?;

    let (ready_flag, ready_mode) = (ready.clone(), mode.to_owned());
    let route: Route = Arc::new(move |path| match path {
        "/healthz/ready" if ready_flag.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", format!("ready\nmode: {ready_mode}\n"))
        }
        "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready\nmode: {ready_mode}\n")),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    });
    admin::serve("readiness", opts.readiness, route).await?;

    let (ctx, pods, mode, node, redirect) =
        (ctx.clone(), pods.clone(), mode.to_owned(), opts.node.clone(), opts.redirect);
    let (loopback_bypass, keeper) = (opts.loopback_bypass, opts.keeper.clone());
    let kube_status = match source {
        Source::File(_) => None,
        Source::Kubernetes(status, _) => Some(status.clone()),
    };
    let config_file = opts.config.clone();
    let route: Route = Arc::new(move |path| match path {
        "/config_dump" => {
            let state = ctx.state();
            let dump = serde_json::json!({
                "node": node,
                "redirect": { "requested": redirect, "mode": mode },
                // Whether same-node connections are spliced in the kernel, and
                // who keeps them alive across agent restarts.
                "splice": {
                    "enabled": ctx.splice.is_some(),
                    "keeper": ctx.keeper.as_ref().and(keeper.as_ref()),
                    "loopbackBypass": loopback_bypass,
                },
                "source": match &kube_status {
                    None => serde_json::json!({ "file": config_file }),
                    Some(status) => serde_json::json!({ "kubernetes": status.dump() }),
                },
                "trustDomain": state.trust_domain(),
                "configGeneration": state.generation(),
                "pods": pods.dump(),
                "certificates": ctx.certs.ids().iter().map(|id| id.to_string()).collect::<Vec<_>>(),
                "ca": ctx.certs.dump(),
                "pool": ctx.pool.stats(),
                "activeConnections": ctx.active.load(Ordering::Relaxed),
                "workloads": state.workloads().map(|w| serde_json::json!({
                    "uid": w.uid, "namespace": w.namespace, "serviceAccount": w.service_account,
                    "ips": w.ips, "node": w.node, "protocol": format!("{:?}", w.protocol),
                })).collect::<Vec<_>>(),
                "services": state.services().map(|s| serde_json::json!({
                    "name": s.id(), "vips": s.vips, "ports": s.ports,
                    "endpoints": s.endpoints.iter().filter(|e| e.ready).count(),
                })).collect::<Vec<_>>(),
            });
            (StatusCode::OK, "application/json", serde_json::to_string_pretty(&dump).unwrap_or_default())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    });
    admin::serve("admin", opts.admin, route).await?;
    Ok(())
}

/// The issue-2 mode, kept for the sockmap demo: load the kernel programs,
/// enroll `cgroups`, run until SIGTERM or SIGINT.
pub async fn run_bypass(pins: PinRoot, cgroups: &[PathBuf], keep_pins: bool) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut datapath = Datapath::load(pins)?;
    // This mode is the loopback bypass and nothing else.
    let config = agent_common::Config { flags: agent_common::CONFIG_LOOPBACK_BYPASS, ..Default::default() };
    let result =
        datapath.set_config(config).and_then(|()| cgroups.iter().try_for_each(|cg| datapath.enroll_cgroup(cg)));
    if let Err(e) = result {
        datapath.shutdown(!keep_pins)?;
        return Err(e);
    }
    println!("READY");
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = sig, "stopping");
    if let Err(e) = datapath.shutdown(!keep_pins) {
        error!(error = format!("{e:#}"), "cleanup failed");
        return Err(e);
    }
    Ok(())
}
