//! The plugin's decisions, for each CNI command, as one function of the
//! environment, stdin and the agent's answers, so every branch can be tested
//! without a runtime.
//!
//! - ADD passes `prevResult` through (converted only if the config's version
//!   differs) once the agent says the pod is captured or not enrolled.
//! - An agent that cannot be reached, or does not answer in time, fails ADD
//!   with code 11 when `failClosed` (the kubelet retries the sandbox), and
//!   lets it pass, logged as "not meshed", when not.
//! - DEL never fails for lack of an agent or of state: runtimes retry a
//!   failed DEL forever and a pod that cannot be deleted is worse than a
//!   listener in a netns that is about to disappear.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::client::{exchange, ClientError};
use crate::log::{Log, Subject};
use crate::protocol::{self, Attachment, Outcome, PodRef, Request, Response, ADD_TIMEOUT_SECS, DEFAULT_SOCKET};
use crate::spec::{self, code, CniError, Command};

/// Longest config the plugin reads from stdin.
pub const MAX_STDIN: usize = 1 << 20;

/// How long DEL, CHECK, STATUS and GC wait for the agent.
const SHORT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the runtime gave us: the `CNI_*` variables (others are ignored).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub vars: HashMap<String, String>,
}

impl Env {
    pub fn from_process() -> Self {
        Env {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars.get(k).map(String::as_str)
    }
}

/// The plugin's own config entry in the conflist, as the runtime hands it
/// over (with the list's `name`, `cniVersion` and the `prevResult`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conf {
    cni_version: Option<Value>,
    name: Option<Value>,
    #[serde(rename = "type")]
    ty: Option<Value>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default = "yes")]
    fail_closed: bool,
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    #[serde(default)]
    log_file: Option<PathBuf>,
    prev_result: Option<Box<RawValue>>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// What the process prints and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub success: bool,
}

impl Output {
    fn ok(stdout: Vec<u8>) -> Self {
        Output { stdout, success: true }
    }

    fn err(e: &CniError, version: Option<&str>) -> Self {
        let mut stdout = serde_json::to_vec(&e.to_json(version)).unwrap_or_default();
        stdout.push(b'\n');
        Output { stdout, success: false }
    }
}

/// Talks to the agent; the real one uses the socket, tests script answers.
pub trait Agent {
    fn ask(&self, socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError>;
}

pub struct SocketAgent;

impl Agent for SocketAgent {
    fn ask(&self, socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
        exchange(socket, req, timeout)
    }
}

/// The whole plugin: environment and stdin in, stdout and status out.
/// `stderr_log` also copies each decision to stderr.
pub fn run(env: &Env, stdin: &[u8], agent: &dyn Agent, stderr_log: bool) -> Output {
    let Some(command) = env.get("CNI_COMMAND") else {
        return Output::err(&CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"), None);
    };
    let Some(command) = Command::parse(command) else {
        let e = CniError::new(code::INVALID_ENV, format!("CNI_COMMAND {command:?} is not a CNI command"))
            .with_details("want ADD, DEL, CHECK, STATUS, VERSION or GC");
        return Output::err(&e, None);
    };
    if command == Command::Version {
        let body = json!({"cniVersion": spec::LATEST, "supportedVersions": spec::SUPPORTED_VERSIONS});
        return Output::ok(format!("{body}\n").into_bytes());
    }
    if stdin.len() > MAX_STDIN {
        return Output::err(
            &CniError::new(code::DECODING_FAILURE, format!("config on stdin over {MAX_STDIN} bytes")),
            None,
        );
    }
    let conf: Conf = match serde_json::from_slice(stdin) {
        Ok(c) => c,
        Err(e) => {
            let e = CniError::new(code::DECODING_FAILURE, "the config on stdin is not valid JSON for sluice-cni")
                .with_details(e.to_string());
            return Output::err(&e, None);
        }
    };
    let version = match &conf.cni_version {
        Some(Value::String(v)) if spec::is_supported(v) => v.clone(),
        Some(Value::String(v)) => {
            let e = CniError::new(code::INCOMPATIBLE_VERSION, format!("cniVersion {v:?} is not supported"))
                .with_details(format!("supported: {}", spec::SUPPORTED_VERSIONS.join(", ")));
            return Output::err(&e, None);
        }
        Some(other) => {
            return Output::err(
                &CniError::new(code::INVALID_CONFIG, format!("cniVersion {other} is not a string")),
                None,
            )
        }
        None => {
            return Output::err(&CniError::new(code::INVALID_CONFIG, "cniVersion is missing from the config"), None)
        }
    };
    let log = Log::new(conf.log_file.clone(), stderr_log);
    let plugin = Plugin { env, conf: &conf, version: &version, log: &log, agent, command };
    match plugin.dispatch() {
        Ok(out) => Output::ok(out),
        Err(e) => {
            log.decision(command.as_str(), &subject(env), "error", &e.to_string());
            Output::err(&e, Some(&version))
        }
    }
}

fn subject(env: &Env) -> Subject {
    let args = env.get("CNI_ARGS").and_then(|a| spec::parse_cni_args(a).ok()).unwrap_or_default();
    let get = |k: &str| args.get(k).cloned().unwrap_or_default();
    Subject {
        namespace: get("K8S_POD_NAMESPACE"),
        name: get("K8S_POD_NAME"),
        uid: get("K8S_POD_UID"),
        container_id: env.get("CNI_CONTAINERID").unwrap_or_default().to_owned(),
    }
}

struct Plugin<'a> {
    env: &'a Env,
    conf: &'a Conf,
    version: &'a str,
    log: &'a Log,
    agent: &'a dyn Agent,
    command: Command,
}

impl Plugin<'_> {
    fn socket(&self) -> PathBuf {
        self.conf.agent_socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    fn decide(&self, pod: &PodRef, decision: &str, reason: &str) {
        let who = Subject {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            container_id: pod.container_id.clone(),
        };
        self.log.decision(self.command.as_str(), &who, decision, reason);
    }

    fn dispatch(&self) -> Result<Vec<u8>, CniError> {
        let c = self.command;
        if !spec::at_least(self.version, c.since()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("{} needs cniVersion {} or later; the config says {}", c.as_str(), c.since(), self.version),
            ));
        }
        if let Some(Value::String(ty)) = &self.conf.ty {
            if ty != "sluice-cni" {
                return Err(CniError::new(code::INVALID_CONFIG, format!("config type {ty:?} is not sluice-cni")));
            }
        }
        if let Some(name) = &self.conf.name {
            let name = name.as_str().ok_or_else(|| CniError::new(code::INVALID_CONFIG, "name is not a string"))?;
            spec::check_network_name(name)?;
        }
        for var in c.required_env() {
            if self.env.get(var).is_none_or(str::is_empty) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{var} is not set (required for {})", c.as_str()),
                ));
            }
        }
        match c {
            Command::Add => self.add(),
            Command::Del => self.del(),
            Command::Check => self.check(),
            Command::Status => self.status(),
            Command::Gc => self.gc(),
            Command::Version => unreachable!("answered before the config is read"),
        }
    }

    /// The pod from `CNI_*` and `CNI_ARGS`. `strict`: ADD and CHECK need the
    /// pod's Kubernetes names (the agent decides from them); DEL takes what
    /// there is.
    fn pod(&self, strict: bool) -> Result<PodRef, CniError> {
        let container_id = self.env.get("CNI_CONTAINERID").unwrap_or_default().to_owned();
        if !container_id.is_empty() || strict {
            spec::check_container_id(&container_id)?;
        }
        let ifname = self.env.get("CNI_IFNAME").unwrap_or_default().to_owned();
        if strict {
            spec::check_ifname(&ifname)?;
        }
        let args = match self.env.get("CNI_ARGS") {
            Some(a) => spec::parse_cni_args(a)?,
            None if strict => {
                return Err(CniError::new(code::INVALID_ENV, "CNI_ARGS is not set")
                    .with_details("sluice-cni needs K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID from the kubelet"))
            }
            None => HashMap::new(),
        };
        let arg = |k: &str| -> Result<String, CniError> {
            match args.get(k) {
                Some(v) if !v.is_empty() => Ok(v.clone()),
                _ if strict => Err(CniError::new(code::INVALID_ENV, format!("CNI_ARGS has no {k}"))),
                _ => Ok(String::new()),
            }
        };
        let pod = PodRef {
            namespace: arg("K8S_POD_NAMESPACE")?,
            name: arg("K8S_POD_NAME")?,
            uid: arg("K8S_POD_UID")?,
            netns: self.env.get("CNI_NETNS").unwrap_or_default().to_owned(),
            container_id,
            ifname,
            ips: Vec::new(),
        };
        if strict {
            if !spec::is_dns_label(&pod.namespace) {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("K8S_POD_NAMESPACE {:?} is not a namespace name", pod.namespace),
                ));
            }
            if !spec::is_dns_subdomain(&pod.name) {
                return Err(CniError::new(code::INVALID_ENV, format!("K8S_POD_NAME {:?} is not a pod name", pod.name)));
            }
            if !spec::is_pod_uid(&pod.uid) {
                return Err(CniError::new(code::INVALID_ENV, format!("K8S_POD_UID {:?} is not a pod UID", pod.uid)));
            }
        }
        Ok(pod)
    }

    fn excluded(&self, pod: &PodRef) -> bool {
        self.conf.exclude_namespaces.contains(&pod.namespace)
    }

    fn prev_result(&self) -> Result<&str, CniError> {
        self.conf.prev_result.as_deref().map(RawValue::get).ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "no prevResult: sluice-cni is a chained plugin and must come after the primary CNI ({})",
                    self.command.as_str()
                ),
            )
        })
    }

    fn add(&self) -> Result<Vec<u8>, CniError> {
        let mut pod = self.pod(true)?;
        let raw = self.prev_result()?;
        let mut out = spec::pass_through(raw, self.version)?;
        out.push(b'\n');
        if self.excluded(&pod) {
            self.decide(&pod, "passed", "namespace excluded by excludeNamespaces; not meshed");
            return Ok(out);
        }
        let netns = Path::new(&pod.netns);
        if !netns.is_absolute() || !netns.exists() {
            return Err(CniError::new(code::INVALID_ENV, format!("CNI_NETNS {:?} does not exist", pod.netns)));
        }
        let prev: Value = serde_json::from_str(raw).map_err(|e| {
            CniError::new(code::DECODING_FAILURE, "prevResult does not decode").with_details(e.to_string())
        })?;
        pod.ips = spec::pod_ips(&prev)?;
        let req = Request { command: protocol::Command::Add, pod: pod.clone(), valid_attachments: vec![] };
        let socket = self.socket();
        match self.agent.ask(&socket, &req, Duration::from_secs(ADD_TIMEOUT_SECS)) {
            Ok(Response { result: Ok(Outcome::Captured), detail }) => {
                self.decide(&pod, "captured", &detail);
                Ok(out)
            }
            Ok(Response { result: Ok(Outcome::NotEnrolled), detail }) => {
                self.decide(&pod, "not enrolled", &detail);
                Ok(out)
            }
            Ok(Response { result: Ok(other), detail }) => self.fail_or_pass(
                &pod,
                out,
                format!("the agent at {} answered ADD with {other:?} ({detail})", socket.display()),
            ),
            Ok(Response { result: Err(why), .. }) => self.fail_or_pass(
                &pod,
                out,
                format!("the agent at {} could not capture the pod: {why}", socket.display()),
            ),
            Err(e) => self.fail_or_pass(&pod, out, e.to_string()),
        }
    }

    /// An ADD the agent did not confirm: code 11 so the kubelet retries the
    /// sandbox, or, without `failClosed`, the pod starts outside the mesh.
    fn fail_or_pass(&self, pod: &PodRef, out: Vec<u8>, why: String) -> Result<Vec<u8>, CniError> {
        if self.conf.fail_closed {
            self.decide(pod, "refused", &format!("{why}; failClosed, so the runtime will retry"));
            Err(CniError::new(code::TRY_AGAIN_LATER, why).with_details("failClosed: the pod does not start unmeshed"))
        } else {
            self.decide(pod, "passed, not meshed", &format!("{why}; failClosed is false"));
            Ok(out)
        }
    }

    fn del(&self) -> Result<Vec<u8>, CniError> {
        let pod = self.pod(false)?;
        if !pod.namespace.is_empty() && self.excluded(&pod) {
            self.decide(&pod, "removed", "namespace excluded; nothing to do");
            return Ok(Vec::new());
        }
        let req = Request { command: protocol::Command::Del, pod: pod.clone(), valid_attachments: vec![] };
        match self.agent.ask(&self.socket(), &req, SHORT_TIMEOUT) {
            Ok(Response { result: Ok(_), detail }) => self.decide(&pod, "removed", &detail),
            Ok(Response { result: Err(why), .. }) => self.decide(&pod, "removed (agent reported a problem)", &why),
            Err(e) => self.decide(
                &pod,
                "removed (agent not told)",
                &format!("{e}; the agent drops the pod when the API does"),
            ),
        }
        Ok(Vec::new())
    }

    fn check(&self) -> Result<Vec<u8>, CniError> {
        let pod = self.pod(true)?;
        self.prev_result()?;
        if self.excluded(&pod) {
            return Ok(Vec::new());
        }
        let req = Request { command: protocol::Command::Check, pod: pod.clone(), valid_attachments: vec![] };
        match self.agent.ask(&self.socket(), &req, SHORT_TIMEOUT) {
            Ok(Response { result: Ok(_), detail }) => {
                self.decide(&pod, "checked", &detail);
                Ok(Vec::new())
            }
            Ok(Response { result: Err(why), .. }) => Err(CniError::new(code::CAPTURE_MISSING, why)),
            Err(e) if self.conf.fail_closed => Err(CniError::new(code::TRY_AGAIN_LATER, e.to_string())),
            Err(e) => {
                self.decide(&pod, "checked, not meshed", &format!("{e}; failClosed is false"));
                Ok(Vec::new())
            }
        }
    }

    fn status(&self) -> Result<Vec<u8>, CniError> {
        let req = Request { command: protocol::Command::Status, pod: PodRef::default(), valid_attachments: vec![] };
        match self.agent.ask(&self.socket(), &req, SHORT_TIMEOUT) {
            Ok(Response { result: Ok(_), .. }) => Ok(Vec::new()),
            // ADD would pass anyway: the plugin can serve it.
            Err(_) | Ok(Response { result: Err(_), .. }) if !self.conf.fail_closed => Ok(Vec::new()),
            Ok(Response { result: Err(why), .. }) => {
                Err(CniError::new(code::NOT_AVAILABLE, format!("the agent is not ready: {why}")))
            }
            // With no agent at all, pods already captured have their new
            // connections refused (pinned programs fail closed) until it is back.
            Err(e) => Err(CniError::new(code::NOT_AVAILABLE_LIMITED, e.to_string())
                .with_details("captured pods cannot open new connections until the agent is back")),
        }
    }

    fn gc(&self) -> Result<Vec<u8>, CniError> {
        let valid = self
            .conf
            .valid_attachments
            .as_ref()
            .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "GC without cni.dev/valid-attachments"))?;
        let valid_attachments = valid
            .iter()
            .map(|a| Attachment { container_id: a.container_id.clone(), ifname: a.ifname.clone() })
            .collect();
        let req = Request { command: protocol::Command::Gc, pod: PodRef::default(), valid_attachments };
        match self.agent.ask(&self.socket(), &req, SHORT_TIMEOUT) {
            Ok(Response { result: Ok(_), detail }) => self.decide(&PodRef::default(), "collected", &detail),
            Ok(Response { result: Err(why), .. }) => return Err(CniError::new(code::IO_FAILURE, why)),
            // A restarted agent has no stale attachments to collect.
            Err(e) => self.decide(&PodRef::default(), "nothing collected", &e.to_string()),
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
