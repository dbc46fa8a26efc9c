//! `sluice`: the node agent binary. Subcommands dispatch into the library;
//! nothing here but argument parsing and process setup.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sluice::{
    bpf::{self, PinRoot},
    run::{RedirectChoice, RunOptions},
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice node agent: eBPF-steered mTLS/HBONE for Kubernetes pods")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Manage the built-in certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Print the kernel programs' counters from the pinned maps.
    Inspect {
        #[arg(long, default_value = agent_common::PIN_ROOT)]
        pin_root: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Preflight: can this node run eBPF capture? Prints each program type,
    /// map type, helper and attach point with yes/no, then the mode `auto`
    /// would pick. Exit status 0 when eBPF mode is possible, 2 when not.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Hold spliced connections' sockets so they outlive the agent (run as
    /// a second container beside it; see README "Same-node splice").
    Keeper {
        #[arg(long, default_value = "/var/run/sluice/keeper.sock")]
        socket: PathBuf,
    },
    /// Put sluice-cni into the node's CNI chain, or take it out (the
    /// DaemonSet's install-cni container; see README "The CNI chain").
    Cni {
        #[command(subcommand)]
        cmd: CniCmd,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum CniCmd {
    /// Copy the plugin into --bin-dir and put it last in the chain of the
    /// config the runtime loads from --conf-dir (the lexically first
    /// *.conf, *.conflist or *.json that parses). With --watch, keep it
    /// there until SIGTERM/SIGINT; it is not removed on exit.
    Install(Box<CniInstallArgs>),
    /// Take the plugin out of the chain (the original file back byte for
    /// byte when it is unchanged since install) and remove the binary.
    Uninstall {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        conf_dir: PathBuf,
        /// Leave the binary in --bin-dir.
        #[arg(long)]
        keep_binary: bool,
    },
}

#[derive(clap::Args)]
struct CniInstallArgs {
    /// The node's CNI binary dir (in the DaemonSet, the host's /opt/cni/bin).
    #[arg(long)]
    bin_dir: PathBuf,
    /// The node's CNI config dir (the host's /etc/cni/net.d).
    #[arg(long)]
    conf_dir: PathBuf,
    /// The sluice-cni binary to copy into --bin-dir.
    #[arg(long, default_value = "/usr/local/bin/sluice-cni")]
    plugin: PathBuf,
    /// The agent's CNI socket, as the plugin will see it on the host.
    #[arg(long, default_value = sluice_cni::protocol::DEFAULT_SOCKET)]
    agent_socket: PathBuf,
    /// When the agent cannot confirm a pod's capture, make the runtime
    /// retry the pod (true) or let it start outside the mesh (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    fail_closed: bool,
    /// Namespaces whose pods the plugin passes without asking the agent.
    #[arg(long, value_delimiter = ',', default_value = "kube-system,sluice-system")]
    exclude_namespaces: Vec<String>,
    /// The plugin's decision log on the host.
    #[arg(long, default_value = sluice_cni::install::DEFAULT_LOG_FILE)]
    log_file: PathBuf,
    /// After installing, put the plugin back whenever the primary CNI
    /// rewrites its config or an earlier config appears.
    #[arg(long)]
    watch: bool,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Write a new ECDSA P-256 root: DIR/root-cert.pem and DIR/ca-key.pem.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve Istio's certificate API (istio.v1.auth.IstioCertificateService)
    /// over gRPC and TLS: the only process that holds the CA key. Callers
    /// are authenticated by TokenReview; see README "Trust model".
    Serve(Box<CaServeArgs>),
}

#[derive(clap::Args)]
struct CaServeArgs {
    /// The CA directory (root-cert.pem, ca-key.pem, optional cert-chain.pem).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = sluice::identity::service::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The API server for TokenReviews and pod lookups (default: in-cluster
    /// credentials).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The node agents' service account, `<namespace>/<name>`: only it may
    /// ask for identities of pods on its own node.
    #[arg(long, default_value = sluice::identity::service::DEFAULT_AGENT_SERVICE_ACCOUNT)]
    agent_service_account: String,
    /// Token audience required in the TokenReview (repeatable).
    #[arg(long = "audience", default_values_t = [sluice::identity::service::DEFAULT_AUDIENCE.to_string()])]
    audiences: Vec<String>,
    /// Longest certificate lifetime granted; longer requests are refused.
    #[arg(long, default_value = "168h", value_parser = parse_duration)]
    max_ttl: Duration,
    /// Lifetime for requests that ask for none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    default_ttl: Duration,
    /// Extra DNS name or IP for the service's TLS certificate (repeatable),
    /// besides sluice-ca.sluice-system.svc and its short forms, localhost.
    #[arg(long = "san")]
    sans: Vec<String>,
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    sluice::state::duration::parse(s)
}

#[derive(clap::Args)]
struct RunArgs {
    /// The local config file (YAML; see README). Required unless --cgroup.
    #[arg(long, required_unless_present = "cgroups")]
    config: Option<PathBuf>,
    /// Discover pods, services and Istio policies from the API server this
    /// kubeconfig points at. In a pod with a service account the in-cluster
    /// credentials are used without it. The config file then holds only
    /// trustDomain, ca and rootNamespace.
    #[arg(long, conflicts_with = "cgroups")]
    kubeconfig: Option<PathBuf>,
    /// The Unix socket the CNI plugin (`sluice-cni`) reports pods on.
    #[arg(long, default_value = sluice_cni::protocol::DEFAULT_SOCKET)]
    cni_socket: PathBuf,
    /// Look for pods' cgroups under this directory only (default: anywhere
    /// under the cgroup v2 mount).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Where the host's /proc is (in a DaemonSet without hostPID, a hostPath
    /// mount): running pods are found there by their cgroup.
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// This node's name: the agent enrolls the workloads whose `node` is this.
    #[arg(long, required_unless_present = "cgroups")]
    node: Option<String>,
    /// How pod traffic is captured.
    #[arg(long, value_enum, default_value = "auto")]
    redirect: RedirectChoice,
    /// The admin endpoint (`/config_dump`): loopback by default; any other
    /// address is logged as a warning.
    #[arg(long, default_value = sluice::admin::DEFAULT_ADMIN)]
    admin: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    /// On exit, remove all capture from enrolled pods (default: leave it, so
    /// a restarted or upgraded agent takes over without a gap in capture).
    #[arg(long)]
    cleanup: bool,
    /// Seconds in-flight connections get to finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Socket-bypass only: attach sock_ops to this cgroup v2 (repeatable);
    /// no config, no tunnel.
    #[arg(long = "cgroup", conflicts_with = "config")]
    cgroups: Vec<PathBuf>,
    /// Directory on bpffs for Sluice's pinned maps.
    #[arg(long, default_value = agent_common::PIN_ROOT)]
    pin_root: PathBuf,
    /// Leave the pinned maps in place on exit, for a restarted agent to adopt.
    #[arg(long)]
    keep_pins: bool,
    /// Same-node connections between enrolled pods: `on` hands them to the
    /// kernel after authorization (eBPF capture only); `off` sends them
    /// through HBONE like any other.
    #[arg(long, value_enum, default_value = "on")]
    splice: Toggle,
    /// The keeper's socket (`sluice keeper`): spliced connections then
    /// survive this agent being killed, and the next agent adopts them.
    #[arg(long)]
    keeper: Option<PathBuf>,
    /// App-to-app loopback traffic inside a pod: `on` moves it socket to
    /// socket in the kernel (eBPF capture only). Off by default: the kernel
    /// then answers a blocking read() that wakes without data with EAGAIN,
    /// which breaks clients that half-close and wait for their answer.
    #[arg(long, value_enum, default_value = "off")]
    loopback_bypass: Toggle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Toggle {
    On,
    Off,
}

fn main() -> std::process::ExitCode {
    sluice::tunnel::copy::keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            if !args.cgroups.is_empty() {
                return rt.block_on(sluice::run::run_bypass(
                    PinRoot::new(args.pin_root),
                    &args.cgroups,
                    args.keep_pins,
                ));
            }
            let opts = RunOptions {
                config: args.config.context("--config is required")?,
                kubeconfig: args.kubeconfig,
                proc_root: args.proc_root,
                cni_socket: args.cni_socket,
                cgroup_root: args.cgroup_root,
                node: args.node.context("--node is required")?,
                redirect: args.redirect,
                admin: args.admin,
                metrics: args.metrics,
                readiness: args.readiness,
                cleanup: args.cleanup,
                drain: Duration::from_secs(args.drain_secs),
                pin_root: args.pin_root,
                splice: args.splice == Toggle::On,
                keeper: args.keeper,
                loopback_bypass: args.loopback_bypass == Toggle::On,
            };
            rt.block_on(sluice::run::run(opts))
        }
        Cmd::Ca { cmd: CaCmd::Init { dir } } => {
            sluice::identity::Ca::init(&dir).with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!("wrote {}/root-cert.pem and {}/ca-key.pem", dir.display(), dir.display());
            Ok(())
        }
        Cmd::Ca { cmd: CaCmd::Serve(args) } => {
            let opts = sluice::identity::service::ServeOptions {
                dir: args.dir,
                listen: args.listen,
                kubeconfig: args.kubeconfig,
                trust_domain: args.trust_domain,
                agent_service_account: args.agent_service_account,
                audiences: args.audiences,
                max_ttl: args.max_ttl,
                default_ttl: args.default_ttl,
                sans: args.sans,
            };
            tokio::runtime::Runtime::new()?.block_on(sluice::identity::service::serve(opts))
        }
        Cmd::Keeper { socket } => sluice::keeper::serve(&socket),
        Cmd::Inspect { pin_root, json } => {
            let counters = bpf::read_counters(&PinRoot::new(pin_root))?;
            if json {
                println!("{}", serde_json::to_string(&counters)?);
            } else {
                print!("{counters}");
            }
            Ok(())
        }
        Cmd::Probe { json } => {
            let scratch = PinRoot::new(format!("/sys/fs/bpf/sluice-probe-{}", std::process::id()));
            let probe = sluice::redirect::probe::run(&scratch);
            if json {
                println!("{}", serde_json::to_string_pretty(&probe)?);
            } else {
                print!("{probe}");
            }
            if !probe.ebpf_possible() {
                std::process::exit(2);
            }
            Ok(())
        }
        Cmd::Version => {
            println!("sluice {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Cni { cmd } => cni(cmd),
    }
}

fn cni(cmd: CniCmd) -> Result<()> {
    use sluice_cni::install::{self, Level};
    let mut log = |level: Level, msg: &str| match level {
        Level::Info => tracing::info!("{msg}"),
        Level::Warn => tracing::warn!("{msg}"),
    };
    match cmd {
        CniCmd::Install(args) => {
            let opts = install::InstallOptions {
                bin_dir: args.bin_dir,
                conf_dir: args.conf_dir,
                plugin: args.plugin,
                settings: install::Settings {
                    agent_socket: args.agent_socket,
                    fail_closed: args.fail_closed,
                    exclude_namespaces: args.exclude_namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                    log_file: args.log_file,
                },
            };
            if !args.watch {
                return install::install(&opts, &mut log);
            }
            let stop = stop_on_signal()?;
            install::watch(&opts, &stop, Duration::from_secs(1), &mut log)
        }
        CniCmd::Uninstall { bin_dir, conf_dir, keep_binary } => {
            install::uninstall(&install::UninstallOptions { bin_dir, conf_dir, keep_binary }, &mut log)
        }
    }
}

/// Lifts the soft limit on open files to the hard one. Every proxied
/// connection holds a socket in the agent (two when spliced), and a
/// container starts with a soft limit of 1024 under containerd 2.x and
/// systemd (the hard one is far higher, for programs that ask): the agent
/// would refuse connections with EMFILE past about a thousand. Found by
/// `cargo xtask soak`. Failing to raise it is logged, not fatal.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let soft = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::info!(from = soft, to = lim.rlim_max, "raised the open-file limit");
    } else {
        let e = std::io::Error::last_os_error();
        tracing::warn!(soft, hard = lim.rlim_max, error = %e, "could not raise the open-file limit");
    }
}

/// SIGTERM or SIGINT, as one message. Handled rather than left to the
/// default action: as a container's PID 1 the process would ignore SIGTERM
/// and sit out the grace period until SIGKILL.
fn stop_on_signal() -> Result<std::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut term, mut int) = {
        let _in_runtime = rt.enter();
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        let _ = tx.send(());
    });
    Ok(rx)
}
