//! The agent refuses bad input at start with an error that names the file,
//! the field and the reason, and exits non-zero instead of running half-set-up.

use std::process::Command;

fn run_with(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--node", "node1", "--redirect", "iptables", "--config"])
        .arg(&path)
        .args(["--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0"])
        .output()
        .expect("run sluice");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const GOOD_HEAD: &str = "trustDomain: cluster.local\nca:\n  dir: /nonexistent/sluice-ca\n  certTtl: 24h\n";

#[test]
fn invalid_ip_names_the_field() {
    let (ok, err) = run_with(&format!(
        "{GOOD_HEAD}workloads:\n  - uid: default/a\n    name: a\n    namespace: default\n    serviceAccount: sa\n    workloadIps: [10.0.0.300]\n    node: node1\n    netns: /var/run/netns/a\npolicies: []\n"
    ));
    assert!(!ok, "the agent must not start");
    assert!(err.contains("config.yaml"), "error must name the file: {err}");
    assert!(err.contains("workloadIps"), "error must name the field: {err}");
}

#[test]
fn unknown_field_is_rejected_by_name() {
    let (ok, err) = run_with(&format!("{GOOD_HEAD}workloads: []\npolicies: []\nnodeSelector: x\n"));
    assert!(!ok);
    assert!(err.contains("nodeSelector"), "error must name the unknown field: {err}");
}

#[test]
fn missing_ca_names_the_path() {
    let (ok, err) = run_with(&format!("{GOOD_HEAD}workloads: []\npolicies: []\n"));
    assert!(!ok);
    assert!(err.contains("/nonexistent/sluice-ca"), "error must name the CA path: {err}");
}

#[test]
fn unreadable_config_names_the_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--node", "n", "--config", "/nonexistent/sluice.yaml"])
        .output()
        .expect("run sluice");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/sluice.yaml"), "{err}");
}
