//! Every branch of the plugin against a scripted agent: what it prints, its
//! code, what it asked the agent and what it logged.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::client::ClientError;
use crate::protocol::{Command as Wire, Outcome, Request, Response};

const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

/// Answers every request the same way and keeps what it was asked.
struct Scripted {
    answer: Box<dyn Fn() -> Result<Response, ClientError>>,
    asked: RefCell<Vec<(PathBuf, Request)>>,
}

impl Scripted {
    fn new(answer: impl Fn() -> Result<Response, ClientError> + 'static) -> Self {
        Scripted { answer: Box::new(answer), asked: RefCell::new(Vec::new()) }
    }

    fn ok(outcome: Outcome) -> Self {
        Self::new(move || Ok(Response { result: Ok(outcome), detail: "because".into() }))
    }

    fn down() -> Self {
        Self::new(|| {
            Err(ClientError::Unreachable {
                socket: "/run/x/cni.sock".into(),
                reason: "No such file or directory".into(),
            })
        })
    }
}

impl Agent for Scripted {
    fn ask(&self, socket: &Path, req: &Request, _t: Duration) -> Result<Response, ClientError> {
        self.asked.borrow_mut().push((socket.to_owned(), req.clone()));
        (self.answer)()
    }
}

fn env(command: &str, netns: &str) -> Env {
    let mut e = Env::default();
    for (k, v) in [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee12"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID={UID}")),
        ("CNI_PATH", "/opt/cni/bin"),
    ] {
        e.vars.insert(k.into(), v.into());
    }
    e
}

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"},{"name":"eth0","sandbox":"/proc/self/ns/net"}],"ips":[{"address":"10.10.1.130/25","gateway":"10.10.1.129","interface":1}],"dns":{}}"#;

fn conf(extra: Value, log: &Path) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "sluice-cni",
        "agentSocket": "/run/x/cni.sock",
        "excludeNamespaces": ["kube-system"],
        "logFile": log,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    let mut s = serde_json::to_string(&c).unwrap();
    // prevResult spliced in as text, so byte-exact pass-through is testable.
    if !extra.as_object().unwrap().contains_key("prevResult") {
        s.pop();
        s.push_str(&format!(",\"prevResult\":{PREV}}}"));
    }
    s.into_bytes()
}

fn error(out: &Output) -> Value {
    assert!(!out.success, "expected failure, got {}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).expect("error JSON on stdout")
}

fn logdir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("plugin.log");
    (d, f)
}

#[test]
fn add_captured_passes_prev_result_byte_exact_and_tells_the_agent_everything() {
    let (_d, log) = logdir();
    let agent = Scripted::ok(Outcome::Captured);
    let out = run(&env("ADD", "/proc/self/ns/net"), &conf(json!({}), &log), &agent, false);
    assert!(out.success, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.stdout, format!("{PREV}\n").into_bytes());
    let asked = agent.asked.borrow();
    assert_eq!(asked.len(), 1);
    let (sock, req) = &asked[0];
    assert_eq!(sock, Path::new("/run/x/cni.sock"));
    assert_eq!(req.command, Wire::Add);
    assert_eq!((req.pod.namespace.as_str(), req.pod.name.as_str(), req.pod.uid.as_str()), ("shop", "web-0", UID));
    assert_eq!(req.pod.netns, "/proc/self/ns/net");
    assert_eq!(req.pod.container_id, "c0ffee12");
    assert_eq!(req.pod.ips, vec!["10.10.1.130".parse::<std::net::IpAddr>().unwrap()]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("ADD shop/web-0") && text.contains("captured: because"), "{text}");
}

#[test]
fn add_converts_the_result_to_the_configs_version() {
    let (_d, log) = logdir();
    let agent = Scripted::ok(Outcome::NotEnrolled);
    let out = run(&env("ADD", "/proc/self/ns/net"), &conf(json!({"cniVersion": "0.4.0"}), &log), &agent, false);
    assert!(out.success);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["ips"][0]["version"], "4");
    assert!(std::fs::read_to_string(&log).unwrap().contains("not enrolled"));
}

#[test]
fn agent_down_fails_closed_with_11_naming_the_socket_or_passes_when_open() {
    let (_d, log) = logdir();
    let agent = Scripted::down();
    let out = run(&env("ADD", "/proc/self/ns/net"), &conf(json!({}), &log), &agent, false);
    let e = error(&out);
    assert_eq!(e["code"], 11);
    assert!(e["msg"].as_str().unwrap().contains("/run/x/cni.sock"), "{e}");
    assert_eq!(e["cniVersion"], "1.0.0");

    let out = run(&env("ADD", "/proc/self/ns/net"), &conf(json!({"failClosed": false}), &log), &agent, false);
    assert!(out.success);
    assert_eq!(out.stdout, format!("{PREV}\n").into_bytes());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("passed, not meshed") && text.contains("refused"), "{text}");
}

#[test]
fn agent_refusal_fails_closed_too() {
    let (_d, log) = logdir();
    let agent = Scripted::new(|| {
        Ok(Response { result: Err("pod shop/web-0 was not captured within 25 s".into()), detail: String::new() })
    });
    let e = error(&run(&env("ADD", "/proc/self/ns/net"), &conf(json!({}), &log), &agent, false));
    assert_eq!(e["code"], 11);
    assert!(e["msg"].as_str().unwrap().contains("not captured within 25 s"), "{e}");
}

#[test]
fn excluded_namespaces_pass_without_asking() {
    let (_d, log) = logdir();
    let agent = Scripted::down();
    let mut env = env("ADD", "/nonexistent/netns");
    env.vars
        .insert("CNI_ARGS".into(), format!("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID={UID}"));
    let out = run(&env, &conf(json!({}), &log), &agent, false);
    assert!(out.success, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(agent.asked.borrow().is_empty());
    assert!(std::fs::read_to_string(&log).unwrap().contains("excluded"));
}

#[test]
fn bad_input_gets_the_right_code_and_names_what_is_wrong() {
    let (_d, log) = logdir();
    let agent = Scripted::ok(Outcome::Captured);
    let good = conf(json!({}), &log);
    let cases: Vec<(&str, Env, Vec<u8>, u64, &str)> = vec![
        ("bad JSON", env("ADD", "/proc/self/ns/net"), b"{not json".to_vec(), 6, "not valid JSON"),
        ("unknown version", env("ADD", "/proc/self/ns/net"), conf(json!({"cniVersion": "9.9.9"}), &log), 1, "9.9.9"),
        ("no version", env("ADD", "/proc/self/ns/net"), br#"{"type":"sluice-cni"}"#.to_vec(), 7, "cniVersion"),
        ("missing netns", env("ADD", "/nonexistent/netns"), good.clone(), 4, "CNI_NETNS"),
        (
            "no prevResult",
            env("ADD", "/proc/self/ns/net"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni"}"#.to_vec(),
            7,
            "prevResult",
        ),
        ("CHECK on 0.3.1", env("CHECK", "/proc/self/ns/net"), conf(json!({"cniVersion": "0.3.1"}), &log), 1, "0.4.0"),
        ("STATUS on 1.0.0", env("STATUS", ""), good.clone(), 1, "1.1.0"),
        ("GC without attachments", env("GC", ""), conf(json!({"cniVersion": "1.1.0"}), &log), 7, "valid-attachments"),
        ("oversized", env("ADD", "/proc/self/ns/net"), vec![b' '; MAX_STDIN + 1], 6, "over"),
    ];
    for (what, e, stdin, want, needle) in cases {
        let v = error(&run(&e, &stdin, &agent, false));
        assert_eq!(v["code"], want, "{what}: {v}");
        assert!(v["msg"].as_str().unwrap().contains(needle), "{what}: {v}");
    }
    let mut e = env("ADD", "/proc/self/ns/net");
    e.vars.remove("CNI_ARGS");
    let v = error(&run(&e, &good, &agent, false));
    assert!(v["code"] == 4 && v["msg"].as_str().unwrap().contains("CNI_ARGS"), "{v}");
    for (var, bad) in [
        ("CNI_ARGS", "K8S_POD_NAME=web"),
        ("CNI_ARGS", "garbage"),
        ("CNI_CONTAINERID", "../x"),
        ("CNI_IFNAME", "eth0/1"),
    ] {
        let mut e = env("ADD", "/proc/self/ns/net");
        e.vars.insert(var.into(), bad.into());
        let v = error(&run(&e, &good, &agent, false));
        assert_eq!(v["code"], 4, "{var}={bad}: {v}");
    }
    let mut e = env("ADD", "/proc/self/ns/net");
    e.vars.insert("CNI_ARGS".into(), "K8S_POD_NAMESPACE=Shop!;K8S_POD_NAME=web;K8S_POD_UID=x".into());
    assert!(error(&run(&e, &good, &agent, false))["msg"].as_str().unwrap().contains("K8S_POD_NAMESPACE"));
    let mut e = env("ADD", "/proc/self/ns/net");
    e.vars.remove("CNI_COMMAND");
    assert_eq!(error(&run(&e, &good, &agent, false))["code"], 4);
    e.vars.insert("CNI_COMMAND".into(), "add".into());
    assert_eq!(error(&run(&e, &good, &agent, false))["code"], 4);
    assert!(agent.asked.borrow().is_empty(), "bad input never reaches the agent");
}

#[test]
fn del_is_idempotent_and_never_fails_for_lack_of_an_agent() {
    let (_d, log) = logdir();
    for agent in [Scripted::down(), Scripted::ok(Outcome::Removed)] {
        // No prevResult, no netns, no CNI_ARGS: still fine.
        let mut e = env("DEL", "");
        e.vars.remove("CNI_ARGS");
        let out = run(&e, br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni"}"#, &agent, false);
        assert!(out.success && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(agent.asked.borrow()[0].1.command, Wire::Del);
        assert_eq!(agent.asked.borrow()[0].1.pod.container_id, "c0ffee12");
        let out = run(&env("DEL", "/gone"), &conf(json!({}), &log), &agent, false);
        assert!(out.success);
    }
}

#[test]
fn check_status_gc_and_version() {
    let (_d, log) = logdir();
    let ok = Scripted::ok(Outcome::Captured);
    assert!(run(&env("CHECK", "/proc/self/ns/net"), &conf(json!({}), &log), &ok, false).success);
    let missing =
        Scripted::new(|| Ok(Response { result: Err("capture is not in place".into()), detail: String::new() }));
    assert_eq!(error(&run(&env("CHECK", "/proc/self/ns/net"), &conf(json!({}), &log), &missing, false))["code"], 100);

    let v11 = json!({"cniVersion": "1.1.0"});
    assert!(run(&env("STATUS", ""), &conf(v11.clone(), &log), &Scripted::ok(Outcome::Ready), false).success);
    assert_eq!(error(&run(&env("STATUS", ""), &conf(v11.clone(), &log), &missing, false))["code"], 50);
    assert_eq!(error(&run(&env("STATUS", ""), &conf(v11.clone(), &log), &Scripted::down(), false))["code"], 51);
    let open = json!({"cniVersion": "1.1.0", "failClosed": false});
    assert!(run(&env("STATUS", ""), &conf(open, &log), &Scripted::down(), false).success);

    let gc = Scripted::ok(Outcome::Removed);
    let c = json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]});
    assert!(run(&env("GC", ""), &conf(c, &log), &gc, false).success);
    let req = &gc.asked.borrow()[0].1;
    assert_eq!((req.command, req.valid_attachments.len()), (Wire::Gc, 1));
    assert_eq!(req.valid_attachments[0].container_id, "c1");

    let out = run(&env("VERSION", ""), b"{\"cniVersion\":\"1.1.0\"}", &ok, false);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.success && v["supportedVersions"].as_array().unwrap().len() == 5 && v["cniVersion"] == "1.1.0");
}
