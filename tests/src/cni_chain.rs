//! Runs a CNI plugin chain the way a container runtime does (libcni's
//! conflist semantics): ADD through the plugins in order, each given the
//! previous one's result as `prevResult`; CHECK in order and DEL in reverse,
//! each given the chain's final result; the standard `CNI_*` environment;
//! the plugin's config (with `name` and `cniVersion` of the list) on stdin.
//! Plugins run inside the node's netns, where a runtime would run them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A conflist: `{cniVersion, name, plugins: [...]}`.
#[derive(Debug, Clone)]
pub struct Chain {
    pub conflist: Value,
    /// Directories searched for each plugin's `type` (CNI_PATH).
    pub cni_path: Vec<PathBuf>,
    /// The node netns the plugins run in.
    pub netns: String,
}

/// One pod's attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, ...
    pub args: Vec<(String, String)>,
}

/// A plugin that answered with an error.
#[derive(Debug, Clone)]
pub struct PluginError {
    pub plugin: String,
    pub code: Option<u64>,
    pub msg: String,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed with code {:?}: {} (stderr: {})", self.plugin, self.code, self.msg, self.stderr.trim())
    }
}

impl std::error::Error for PluginError {}

/// How long one plugin may run; the bridge plugin is quick, sluice-cni waits
/// for the agent (at most its own ADD timeout).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(45);

impl Chain {
    fn plugins(&self) -> Result<Vec<Value>> {
        self.conflist["plugins"].as_array().cloned().context("conflist without plugins")
    }

    /// The plugin's stdin: its entry, plus the list's name and version, plus
    /// `prevResult` when there is one.
    fn config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = self.conflist["name"].clone();
        c["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c
    }

    fn find(&self, ty: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {ty} not in {:?}", self.cni_path))
    }

    /// Runs one plugin; `Ok(stdout as JSON)` on success.
    pub fn exec(
        &self,
        command: &str,
        plugin: &Value,
        a: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Value, PluginError> {
        let ty = plugin["type"].as_str().unwrap_or("?").to_string();
        let fail = |msg: String| PluginError {
            plugin: ty.clone(),
            code: None,
            msg,
            stdout: String::new(),
            stderr: String::new(),
        };
        let bin = self.find(&ty).map_err(|e| fail(format!("{e:#}")))?;
        let cni_args: Vec<String> = a.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let path: Vec<String> = self.cni_path.iter().map(|p| p.display().to_string()).collect();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", cni_args.join(";"))
            .env("CNI_PATH", path.join(":"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", bin.display())))?;
        let input = serde_json::to_vec(&self.config(plugin, prev)).unwrap_or_default();
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&input);
        }
        let deadline = Instant::now() + PLUGIN_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!("{command} did not finish within {PLUGIN_TIMEOUT:?}")));
                }
            }
        }
        let out = child.wait_with_output().map_err(|e| fail(format!("collecting output: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            if stdout.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&stdout).map_err(|e| PluginError {
                plugin: ty.clone(),
                code: None,
                msg: format!("stdout is not JSON: {e}"),
                stdout,
                stderr,
            });
        }
        let err: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        Err(PluginError {
            plugin: ty,
            code: err["code"].as_u64(),
            msg: err["msg"].as_str().unwrap_or("(no CNI error on stdout)").to_string(),
            stdout,
            stderr,
        })
    }

    /// ADD through the chain; the final result.
    pub fn add(&self, a: &Attachment) -> Result<Value, PluginError> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins().map_err(|e| PluginError {
            plugin: "conflist".into(),
            code: None,
            msg: format!("{e:#}"),
            stdout: String::new(),
            stderr: String::new(),
        })? {
            let result = self.exec("ADD", &plugin, a, prev.as_ref())?;
            prev = Some(result);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK through the chain with the final result.
    pub fn check(&self, a: &Attachment, result: &Value) -> Result<(), PluginError> {
        for plugin in self.plugins().unwrap_or_default() {
            self.exec("CHECK", &plugin, a, Some(result))?;
        }
        Ok(())
    }

    /// DEL in reverse order with the final result (or none).
    pub fn del(&self, a: &Attachment, result: Option<&Value>) -> Result<(), PluginError> {
        for plugin in self.plugins().unwrap_or_default().iter().rev() {
            self.exec("DEL", plugin, a, result)?;
        }
        Ok(())
    }
}

/// The first IPv4 address of a CNI result (`ips[].address`, CIDR form).
pub fn result_ipv4(result: &Value) -> Result<std::net::Ipv4Addr> {
    for ip in result["ips"].as_array().into_iter().flatten() {
        if let Some(addr) = ip["address"].as_str().and_then(|a| a.split('/').next()) {
            if let Ok(v4) = addr.parse() {
                return Ok(v4);
            }
        }
    }
    bail!("no IPv4 address in the CNI result {result}")
}

/// A bridge + host-local conflist for one node, then `extra` plugins:
/// the bridge `cni0` on `gateway`/`prefix`, addresses from `range_start` to
/// `range_end`, host-local's state in `data_dir` (never the node's
/// /var/lib/cni).
pub fn bridge_conflist(
    name: &str,
    subnet: &str,
    range: (&str, &str),
    gateway: &str,
    data_dir: &Path,
    extra: Vec<Value>,
) -> Value {
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": subnet, "rangeStart": range.0, "rangeEnd": range.1, "gateway": gateway}]],
        },
    })];
    plugins.extend(extra);
    json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins})
}

impl Attachment {
    /// The attachment kubelet hands the runtime for `pod` in namespace `ns`:
    /// `eth0` in the pod's netns and the `K8S_POD_*` CNI_ARGS (with
    /// `IgnoreUnknown`, as kubelet sends them), plus `extra` args (e.g.
    /// host-local's `IP=` for a fixed address).
    pub fn kubelet(pod: &crate::CniPod, ns: &str, extra: &[(&str, &str)]) -> Attachment {
        let container_id = format!("c0ffee{}", &pod.uid()[..8]);
        let mut args: Vec<(String, String)> = vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), ns.into()),
            ("K8S_POD_NAME".into(), pod.name().into()),
            ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.clone()),
            ("K8S_POD_UID".into(), pod.uid().into()),
        ];
        args.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Attachment { container_id, netns: pod.netns_path(), ifname: "eth0".into(), args }
    }
}

/// `sluice-cni`'s entry in a conflist: the agent's socket, `failClosed`,
/// the usual excluded namespaces, and its decision log at `log_file`.
pub fn sluice_plugin(socket: &Path, fail_closed: bool, log_file: &Path) -> Value {
    json!({
        "type": "sluice-cni",
        "agentSocket": socket,
        "failClosed": fail_closed,
        "excludeNamespaces": ["kube-system", "sluice-system"],
        "logFile": log_file,
    })
}

/// CNI_PATH for a chain of Debian's reference plugins and `sluice-cni`:
/// `/usr/lib/cni`, then the directory cargo built `sluice-cni` in
/// (`SLUICE_CNI_BIN` overrides).
pub fn plugin_dirs() -> Result<Vec<PathBuf>> {
    let plugin = crate::peer::target_bin("sluice-cni", "SLUICE_CNI_BIN");
    Ok(vec![PathBuf::from("/usr/lib/cni"), plugin.parent().context("sluice-cni's directory")?.to_path_buf()])
}

/// What of `pod`'s capture is visible from outside the agents: its three
/// listeners, and the mode's rules (iptables) or programs (eBPF).
pub fn capture_state(pod: &crate::CniPod, mode: &str) -> Result<(bool, bool)> {
    let ss = pod.exec_ok(&["ss", "-Hltn"])?;
    let listeners = [":15001", ":15006", ":15008"].iter().all(|p| ss.contains(p));
    let rules = if mode == "iptables" {
        let rules = pod.exec_ok(&["iptables-save"])?;
        rules.contains("15001") && rules.contains("15006")
    } else {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(crate::Place::cgroup_path(pod))
            .output()
            .context("bpftool cgroup show")?;
        String::from_utf8_lossy(&out.stdout).contains("connect4")
    };
    Ok((listeners, rules))
}

/// Polls `cond` every 50 ms until it holds, failing after `within`.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    loop {
        if cond()? {
            return Ok(());
        }
        anyhow::ensure!(t.elapsed() < within, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `node`'s agent has enrolled (captured) every pod in `uids`.
pub fn wait_enrolled(node: &crate::Node, uids: &[&str], within: Duration) -> Result<()> {
    wait_for(&format!("{} to enroll {uids:?}", node.name()), within, || {
        let dump = crate::kube_mesh::config_dump(node)?;
        let pods: Vec<&Value> = dump["pods"].as_array().into_iter().flatten().collect();
        Ok(uids.iter().all(|u| pods.iter().any(|p| p["uid"] == *u)))
    })
}

/// Waits until `node`'s agent lists the pod `uid` as an HBONE workload
/// (other nodes learn a pod is meshed only from the API).
pub fn wait_known_as_hbone(node: &crate::Node, uid: &str, within: Duration) -> Result<()> {
    wait_for(&format!("{} to list {uid} as HBONE", node.name()), within, || {
        let dump = crate::kube_mesh::config_dump(node)?;
        Ok(dump["workloads"].as_array().into_iter().flatten().any(|w| w["uid"] == uid && w["protocol"] == "Hbone"))
    })
}
