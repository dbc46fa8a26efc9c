//! A meshed topology: nodes with pods, a CA, a Sluice config file listing
//! every workload, and one real `sluice run` agent per node.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};

use crate::{agent::agent_bin, Agent, Node, Pod, Topology};

/// One workload in the config.
#[derive(Clone)]
pub struct MeshPod {
    pub pod: Pod,
    pub namespace: String,
    pub service_account: String,
    pub enrolled: bool,
    /// The pod's labels (`app`, `version`, ...), as Kubernetes has them.
    pub labels: BTreeMap<String, String>,
    /// Istio's workload name (a Deployment's pods share it); the agent uses
    /// the pod name when this is `None`.
    pub workload_name: Option<String>,
    /// Services this pod is an endpoint of, by [`MeshService::key`], with
    /// the target ports it serves them on where they differ from the
    /// service's (service port → target port).
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
}

/// One service in the config, in ztunnel's local-config shape.
#[derive(Clone, Debug)]
pub struct MeshService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// ClusterIPs, e.g. "10.96.0.10" and "fd96::10".
    pub vips: Vec<String>,
    /// Service port → target port.
    pub ports: BTreeMap<u16, u16>,
    /// `internalTrafficPolicy: Local` (only endpoints on the client's node).
    pub local_only: bool,
}

impl MeshService {
    /// A `Cluster` service with the usual hostname `<name>.<ns>.svc.cluster.local`.
    pub fn new(name: &str, namespace: &str, vips: &[&str], ports: &[(u16, u16)]) -> MeshService {
        MeshService {
            name: name.into(),
            namespace: namespace.into(),
            hostname: format!("{name}.{namespace}.svc.cluster.local"),
            vips: vips.iter().map(|v| v.to_string()).collect(),
            ports: ports.iter().copied().collect(),
            local_only: false,
        }
    }

    /// How workloads name the service in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

impl MeshPod {
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.pod.name())
    }
}

/// Config file, CA and agents for a [`Topology`]. Holds a temp dir that is
/// removed on drop.
pub struct Mesh {
    pub dir: tempdir::Dir,
    pub trust_domain: String,
    pub pods: Vec<MeshPod>,
    pub services: Vec<MeshService>,
    pub policies_yaml: String,
    pub cert_ttl: String,
    prefix: String,
    /// bpffs pin dirs of the agents started, removed with the mesh.
    pins: std::sync::Mutex<Vec<crate::PinDir>>,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory under /tmp removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> std::io::Result<Dir> {
            let p = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Mesh {
    /// Creates the CA (`sluice ca init`) in a fresh temp dir named after the
    /// topology.
    pub fn new(topo: &Topology, trust_domain: &str) -> Result<Mesh> {
        let dir = tempdir::Dir::new(topo.prefix())?;
        let out = Command::new(agent_bin()).args(["ca", "init", "--dir"]).arg(dir.path().join("ca")).output()?;
        ensure!(out.status.success(), "sluice ca init: {}", String::from_utf8_lossy(&out.stderr));
        Ok(Mesh {
            dir,
            trust_domain: trust_domain.into(),
            pods: Vec::new(),
            services: Vec::new(),
            policies_yaml: String::new(),
            cert_ttl: "24h".into(),
            prefix: topo.prefix().to_owned(),
            pins: Default::default(),
        })
    }

    pub fn add(&mut self, pod: &Pod, namespace: &str, service_account: &str, enrolled: bool) -> MeshPod {
        let p = MeshPod {
            pod: pod.clone(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            enrolled,
            labels: BTreeMap::new(),
            workload_name: None,
            services: BTreeMap::new(),
        };
        self.pods.push(p.clone());
        p
    }

    /// The config entry of the pod called `name`.
    pub fn pod_mut(&mut self, name: &str) -> &mut MeshPod {
        self.pods.iter_mut().find(|p| p.pod.name() == name).unwrap_or_else(|| panic!("no pod {name} in the mesh"))
    }

    /// Sets a pod's labels and Istio workload name.
    pub fn label(&mut self, pod: &str, workload_name: &str, labels: &[(&str, &str)]) {
        let p = self.pod_mut(pod);
        p.workload_name = Some(workload_name.into());
        p.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// Adds a service; returns its key for [`Self::add_endpoint`].
    pub fn add_service(&mut self, service: MeshService) -> String {
        let key = service.key();
        self.services.push(service);
        key
    }

    /// Makes `pod` an endpoint of the service `key`, on the service's
    /// target ports except where `target_ports` (service port → target
    /// port) says otherwise.
    pub fn add_endpoint(&mut self, pod: &str, key: &str, target_ports: &[(u16, u16)]) {
        self.pod_mut(pod).services.insert(key.into(), target_ports.iter().copied().collect());
    }

    /// Takes `pod` out of the service `key`'s endpoints.
    pub fn remove_endpoint(&mut self, pod: &str, key: &str) {
        self.pod_mut(pod).services.remove(key);
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The config file text for the current pods and policies.
    pub fn render(&self) -> String {
        let mut y = format!(
            "trustDomain: {}\nca:\n  dir: {}\n  certTtl: {}\nworkloads:\n",
            self.trust_domain,
            self.ca_dir().display(),
            self.cert_ttl
        );
        for p in &self.pods {
            let _ = writeln!(
                y,
                "  - uid: {uid}\n    name: {name}\n    namespace: {ns}\n    serviceAccount: {sa}\n    workloadIps: [{v4}, \"{v6}\"]\n    node: {node}\n    protocol: {proto}\n    netns: {netns}\n    cgroup: {cg}",
                uid = p.uid(),
                name = p.pod.name(),
                ns = p.namespace,
                sa = p.service_account,
                v4 = p.pod.ipv4(),
                v6 = p.pod.ipv6(),
                node = p.pod.node_name(),
                proto = if p.enrolled { "HBONE" } else { "TCP" },
                netns = p.pod.netns_path().display(),
                cg = p.pod.cgroup_path().display(),
            );
            if let Some(name) = &p.workload_name {
                let _ = writeln!(y, "    workloadName: {name}");
            }
            if !p.labels.is_empty() {
                let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
                let _ = writeln!(y, "    labels: {{{}}}", labels.join(", "));
            }
            if !p.services.is_empty() {
                y.push_str("    services:\n");
                for (key, ports) in &p.services {
                    let _ = writeln!(y, "      {key:?}: {}", port_map(ports));
                }
            }
        }
        if !self.services.is_empty() {
            y.push_str("services:\n");
            for s in &self.services {
                let vips: Vec<String> = s.vips.iter().map(|v| format!("{v:?}")).collect();
                let _ = writeln!(
                    y,
                    "  - name: {}\n    namespace: {}\n    hostname: {}\n    vips: [{}]\n    ports: {}\n    internalTrafficPolicy: {}",
                    s.name,
                    s.namespace,
                    s.hostname,
                    vips.join(", "),
                    port_map(&s.ports),
                    if s.local_only { "Local" } else { "Cluster" },
                );
            }
        }
        if self.policies_yaml.is_empty() {
            y.push_str("policies: []\n");
        } else {
            y.push_str("policies:\n");
            y.push_str(&self.policies_yaml);
        }
        y
    }

    /// Writes the config atomically (write + rename), as an editor would.
    pub fn write_config(&self) -> Result<PathBuf> {
        write_atomic(&self.config_path(), &self.render())?;
        Ok(self.config_path())
    }

    /// Starts `sluice run` in `node`'s netns with the mesh config.
    pub fn start_agent(&self, node: &Node, redirect: &str) -> Result<Agent> {
        self.launch_agent(node, redirect, &self.config_path(), &[], &[])
    }

    /// Starts an agent with the mesh config and extra `sluice run`
    /// arguments (e.g. `["--splice", "off"]`).
    pub fn start_agent_args(&self, node: &Node, redirect: &str, extra_args: &[&str]) -> Result<Agent> {
        self.launch_agent(node, redirect, &self.config_path(), &[], extra_args)
    }

    pub fn start_agent_with(&self, node: &Node, redirect: &str, config: &Path) -> Result<Agent> {
        self.launch_agent(node, redirect, config, &[], &[])
    }

    /// Starts an agent with extra environment (test-only switches).
    pub fn start_agent_env(&self, node: &Node, redirect: &str, config: &Path, env: &[(&str, &str)]) -> Result<Agent> {
        self.launch_agent(node, redirect, config, env, &[])
    }

    /// What every `start_agent*` comes down to: `sluice run --config CONFIG
    /// --node NODE --redirect REDIRECT EXTRA_ARGS...` with `env` added.
    fn launch_agent(
        &self,
        node: &Node,
        redirect: &str,
        config: &Path,
        env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Result<Agent> {
        // On bpffs, so eBPF mode can pin; one dir per node, removed with the mesh.
        let pins = crate::PinDir::new(&format!("{}-{}", self.prefix, node.name())).0.clone();
        self.pins.lock().unwrap().push(crate::PinDir(pins.clone()));
        let mut args = vec![
            "run",
            "--config",
            config.to_str().context("config path")?,
            "--node",
            node.name(),
            "--redirect",
            redirect,
        ];
        args.extend_from_slice(extra_args);
        Agent::start_env(node, &pins, &args, env)
    }
}

/// `{80: 8080, 443: 8443}`.
fn port_map(ports: &BTreeMap<u16, u16>) -> String {
    let pairs: Vec<String> = ports.iter().map(|(p, t)| format!("{p}: {t}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))
}

/// Fetches `path` from an agent endpoint inside `node`'s netns.
pub fn http_get(node: &Node, port: u16, path: &str) -> Result<String> {
    let out = node.output(
        {
            let mut c = Command::new("curl");
            c.args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}{path}")]);
            c
        },
        Duration::from_secs(10),
    )?;
    ensure!(out.status.success(), "GET {path}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of one Prometheus sample line whose name and labels contain
/// every `needle`; summed over matching lines.
pub fn metric_sum(metrics: &str, name: &str, needles: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
