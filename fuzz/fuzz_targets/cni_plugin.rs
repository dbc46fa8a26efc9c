//! The CNI plugin's input: what the container runtime hands `sluice-cni`
//! (`CNI_*` variables and the config on stdin), run through the real
//! `sluice_cni::plugin::run` against a scripted agent.
//!
//! Input, readable (see corpus/cni_plugin/): `KEY=VALUE` lines, a blank
//! line, then stdin. `AGENT=` picks the agent's answer (captured,
//! not-enrolled, removed, ready, error, down, broken; default captured);
//! every other line is an environment variable.
//!
//! Checked, beyond "never panics": stdout is always one JSON document (the
//! result, or an error object with a numeric `code`); every request the
//! plugin sends survives the wire (JSON out, the agent's parse back in,
//! equal); and an ADD or CHECK the plugin lets through names a pod the
//! agent's own checks accept (uid, namespace, name), so the two sides agree
//! on what a valid pod is.
#![no_main]

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::{fuzz_target, Corpus};
use serde_json::Value;
use sluice::state::names;
use sluice_cni::client::ClientError;
use sluice_cni::plugin::{run, Agent, Env};
use sluice_cni::protocol::{Command, Outcome, Request, Response};

/// The only log file an input may name: the plugin appends to whatever
/// `logFile` says, and this runs as root.
const FUZZ_LOG: &str = "/tmp/sluice-fuzz/cni.log";

struct Scripted {
    answer: String,
    asked: RefCell<Vec<Request>>,
}

impl Agent for Scripted {
    fn ask(&self, socket: &Path, req: &Request, _timeout: Duration) -> Result<Response, ClientError> {
        self.asked.borrow_mut().push(req.clone());
        let ok = |o| Ok(Response { result: Ok(o), detail: "fuzz".into() });
        match self.answer.as_str() {
            "not-enrolled" => ok(Outcome::NotEnrolled),
            "removed" => ok(Outcome::Removed),
            "ready" => ok(Outcome::Ready),
            "error" => Ok(Response { result: Err("fuzz: the agent failed".into()), detail: String::new() }),
            "down" => Err(ClientError::Unreachable { socket: socket.into(), reason: "fuzz: no agent".into() }),
            "broken" => Err(ClientError::Broken { socket: socket.into(), reason: "fuzz: garbled".into() }),
            _ => ok(Outcome::Captured),
        }
    }
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    if !log_file_is_safe(stdin) {
        return Corpus::Reject;
    }
    let mut env = Env::default();
    let mut answer = String::new();
    for line in head.split(|&b| b == b'\n') {
        // The process environment holds only UTF-8 here (Env::from_process).
        let Ok(line) = std::str::from_utf8(line) else { continue };
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        if k == "AGENT" {
            answer = v.to_owned();
        } else {
            env.vars.insert(k.to_owned(), v.to_owned());
        }
    }
    let agent = Scripted { answer, asked: RefCell::new(Vec::new()) };
    let out = run(&env, stdin, &agent, false);

    if !out.stdout.is_empty() {
        let doc: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", String::from_utf8_lossy(&out.stdout)));
        if !out.success {
            assert!(doc.get("code").is_some_and(Value::is_u64), "error without a numeric code: {doc}");
        }
    } else {
        assert!(out.success, "a failure must print its error object");
    }

    for req in agent.asked.borrow().iter() {
        let line = serde_json::to_vec(req).expect("a request always encodes");
        assert!(!line.contains(&b'\n'), "the request line holds a newline: the agent reads one line");
        let back: Request = serde_json::from_slice(&line).expect("the agent cannot parse what the plugin sent");
        assert_eq!(&back, req, "the request changed on the wire");
        if matches!(req.command, Command::Add | Command::Check) {
            let pod = &req.pod;
            assert_eq!(
                sluice::inpod::discover::canonical_pod_uid(&pod.uid).as_deref(),
                Some(pod.uid.as_str()),
                "the plugin sent K8S_POD_UID {:?}, which the agent refuses",
                pod.uid
            );
            if let Err(e) = names::check_dns_label(&pod.namespace) {
                panic!("the plugin sent namespace {:?}, which the agent refuses: {e}", pod.namespace);
            }
            if let Err(e) = names::check_dns_subdomain(&pod.name) {
                panic!("the plugin sent pod name {:?}, which the agent refuses: {e}", pod.name);
            }
        }
    }
    Corpus::Keep
});

/// `logFile` absent, null, or [`FUZZ_LOG`]. Invalid JSON is refused by the
/// plugin before it logs anything, so it is safe too; the same parser
/// decides both (a duplicate key makes the plugin refuse the config).
fn log_file_is_safe(stdin: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(map)) => match map.get("logFile") {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s == FUZZ_LOG,
            Some(_) => true, // not a path: the plugin refuses the config
        },
        Ok(_) => true,
        Err(_) => serde_json::from_slice::<serde::de::IgnoredAny>(stdin).is_err(),
    }
}
