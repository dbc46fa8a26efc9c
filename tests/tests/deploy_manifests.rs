//! The manifests in deploy/ as a cluster would read them: every document
//! parses into its k8s-openapi type (unknown or misspelt fields are caught
//! by a round trip), and every path the agent opens on the host is mounted
//! into the container that opens it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of every deploy/*.yaml, as (file, JSON).
fn documents() -> Result<Vec<(String, Value)>> {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc).with_context(|| format!("{name}: document {i} is not YAML"))?;
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    Ok(docs)
}

use serde::Deserialize;

/// Parses `doc` as `T` and checks nothing was dropped on the way: a field
/// k8s-openapi does not know (a typo, a wrong level) would vanish silently.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(doc.clone()).with_context(|| format!("{file}: {}", kind_of(doc)))?;
    let back = serde_json::to_value(&typed)?;
    let mut missing = Vec::new();
    dropped("", doc, &back, &mut missing);
    ensure!(missing.is_empty(), "{file}: {}: fields the API does not have: {missing:?}", kind_of(doc));
    Ok(typed)
}

fn kind_of(doc: &Value) -> String {
    format!("{} {}", doc["kind"].as_str().unwrap_or("?"), doc["metadata"]["name"].as_str().unwrap_or("?"))
}

fn dropped(at: &str, written: &Value, parsed: &Value, out: &mut Vec<String>) {
    match (written, parsed) {
        (Value::Object(w), Value::Object(p)) => {
            for (k, v) in w {
                match p.get(k) {
                    Some(pv) => dropped(&format!("{at}.{k}"), v, pv, out),
                    None if v.is_null() => {}
                    None => out.push(format!("{at}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(p)) => {
            for (i, (wv, pv)) in w.iter().zip(p).enumerate() {
                dropped(&format!("{at}[{i}]"), wv, pv, out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() -> Result<()> {
    let docs = documents()?;
    let mut kinds = BTreeMap::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().with_context(|| format!("{file}: a document without kind"))?;
        match kind {
            "DaemonSet" => drop(typed::<DaemonSet>(file, doc)?),
            "Namespace" => drop(typed::<Namespace>(file, doc)?),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, doc)?),
            "ClusterRole" => drop(typed::<ClusterRole>(file, doc)?),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, doc)?),
            "ConfigMap" => drop(typed::<ConfigMap>(file, doc)?),
            "Deployment" => drop(typed::<k8s_openapi::api::apps::v1::Deployment>(file, doc)?),
            "Service" => drop(typed::<k8s_openapi::api::core::v1::Service>(file, doc)?),
            "Role" => drop(typed::<k8s_openapi::api::rbac::v1::Role>(file, doc)?),
            "RoleBinding" => drop(typed::<k8s_openapi::api::rbac::v1::RoleBinding>(file, doc)?),
            other => bail!("{file}: kind {other} has no check here; add it"),
        }
        *kinds.entry(kind.to_string()).or_insert(0) += 1;
    }
    ensure!(kinds.get("DaemonSet") == Some(&1), "exactly one DaemonSet: {kinds:?}");
    ensure!(kinds.contains_key("ClusterRole") && kinds.contains_key("ConfigMap"), "{kinds:?}");
    Ok(())
}

fn daemonset() -> Result<DaemonSet> {
    let docs = documents()?;
    let (file, doc) = docs.iter().find(|(_, d)| d["kind"] == "DaemonSet").context("no DaemonSet in deploy/")?;
    typed(file, doc)
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> Result<&'a Container> {
    spec.containers.iter().find(|c| c.name == name).with_context(|| format!("no container {name}"))
}

/// `--flag=value` or the default.
fn flag(c: &Container, name: &str, default: &str) -> String {
    let prefix = format!("--{name}=");
    c.args.iter().flatten().find_map(|a| a.strip_prefix(&prefix)).unwrap_or(default).to_string()
}

/// The mount that holds `path` in `c`, as (mount path, volume name).
fn mounted(c: &Container, path: &str) -> Option<(String, String)> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .map(|m| (m.mount_path.clone(), m.name.clone()))
}

#[test]
fn every_path_the_agent_opens_is_mounted() -> Result<()> {
    let ds = daemonset()?;
    let spec = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).context("DaemonSet without a pod spec")?;
    let agent = container(spec, "sluice")?;
    let volumes: BTreeMap<&str, _> = spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    ensure!(
        agent.args.as_ref().is_some_and(|a| a.first().map(String::as_str) == Some("run")),
        "the agent runs `sluice run`"
    );

    // What `sluice run` opens, with the defaults the agent itself uses.
    let pin_root = flag(agent, "pin-root", agent_common::PIN_ROOT);
    let opened = [
        ("--pin-root (bpffs)", pin_root.clone(), Some("/sys/fs/bpf")),
        ("--proc-root", flag(agent, "proc-root", "/proc"), Some("/proc")),
        ("--cni-socket", flag(agent, "cni-socket", sluice_cni::protocol::DEFAULT_SOCKET), None),
        ("--keeper", flag(agent, "keeper", ""), None),
        ("--config", flag(agent, "config", ""), None),
        ("the pods' cgroups", "/sys/fs/cgroup".to_string(), Some("/sys/fs/cgroup")),
        ("CNI_NETNS paths", "/var/run/netns".to_string(), Some("/var/run/netns")),
    ];
    for (what, path, host) in opened {
        ensure!(!path.is_empty(), "{what}: not set on the agent");
        let (mount, volume) =
            mounted(agent, &path).with_context(|| format!("{what} {path}: not mounted in the agent"))?;
        let v = volumes.get(volume.as_str()).with_context(|| format!("{what}: volume {volume} not declared"))?;
        if let Some(host) = host {
            let hp = v.host_path.as_ref().with_context(|| format!("{what}: volume {volume} is not a hostPath"))?;
            ensure!(hp.path == host, "{what}: volume {volume} is hostPath {} (want {host})", hp.path);
        }
        eprintln!("{what}: {path} under {mount} (volume {volume})");
    }
    // The keeper shares the socket directory with the agent.
    let keeper = container(spec, "keeper")?;
    let keeper_socket =
        keeper.args.iter().flatten().skip_while(|a| *a != "--socket").nth(1).cloned().unwrap_or_default();
    ensure!(keeper_socket == flag(agent, "keeper", ""), "keeper socket {keeper_socket:?} differs from the agent's");
    ensure!(
        mounted(keeper, &keeper_socket).map(|m| m.1) == mounted(agent, &keeper_socket).map(|m| m.1),
        "keeper and agent must share the socket volume"
    );

    // The install container writes into the node's CNI directories.
    let install = container(spec, "install-cni")?;
    for (flagname, host) in [("bin-dir", "/opt/cni/bin"), ("conf-dir", "/etc/cni/net.d")] {
        let path = flag(install, flagname, "");
        let (_, volume) =
            mounted(install, &path).with_context(|| format!("install-cni --{flagname} {path} not mounted"))?;
        let hp = volumes.get(volume.as_str()).and_then(|v| v.host_path.as_ref()).context("install-cni volume")?;
        ensure!(hp.path == host, "install-cni --{flagname}: hostPath {} (want {host})", hp.path);
    }
    // The plugin config written by the install step points at the agent's socket.
    ensure!(
        flag(install, "agent-socket", sluice_cni::protocol::DEFAULT_SOCKET)
            == flag(agent, "cni-socket", sluice_cni::protocol::DEFAULT_SOCKET)
    );
    Ok(())
}

#[test]
fn upgrades_start_the_new_agent_beside_the_old() -> Result<()> {
    let ds = daemonset()?;
    let spec = ds.spec.as_ref().context("spec")?;
    let rolling = spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).context("rollingUpdate")?;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    ensure!(rolling.max_surge == Some(IntOrString::Int(1)), "maxSurge must be 1: {:?}", rolling.max_surge);
    ensure!(rolling.max_unavailable == Some(IntOrString::Int(0)), "maxUnavailable must be 0");
    let pod = spec.template.spec.as_ref().context("pod spec")?;
    ensure!(pod.host_network == Some(true), "hostNetwork");
    ensure!(pod.host_pid != Some(true), "hostPID is not needed (/proc is mounted at /host/proc)");
    let agent = container(pod, "sluice")?;
    ensure!(agent.security_context.as_ref().and_then(|s| s.privileged) == Some(true), "the agent is privileged");
    let probe = agent.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).context("readiness probe")?;
    ensure!(probe.path.as_deref() == Some("/healthz/ready"));
    let annotations = spec.template.metadata.as_ref().and_then(|m| m.annotations.as_ref()).context("annotations")?;
    ensure!(annotations.get("prometheus.io/scrape").map(String::as_str) == Some("true"));
    ensure!(annotations.get("prometheus.io/port").map(String::as_str) == Some("15020"));
    Ok(())
}

#[test]
fn rbac_reads_exactly_what_the_agent_watches() -> Result<()> {
    let docs = documents()?;
    let (file, doc) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "sluice")
        .context("no ClusterRole sluice")?;
    let role: ClusterRole = typed(file, doc)?;
    let mut granted = Vec::new();
    for rule in role.rules.iter().flatten() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        ensure!(verbs == ["get", "list", "watch"], "{file}: the agent only reads: {verbs:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    let watched = [
        "/namespaces",
        "/pods",
        "/services",
        "discovery.k8s.io/endpointslices",
        "security.istio.io/authorizationpolicies",
        "security.istio.io/peerauthentications",
    ];
    ensure!(granted == watched, "{file}: granted {granted:?}, the agent watches {watched:?}");
    Ok(())
}
