//! Building what the guest runs: `sluice`, `sluice-peer`, and the
//! integration-test executables of the checks, found through cargo's JSON
//! messages (their file names carry a hash).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::checks::{Check, Run};
use crate::{step, workspace};

/// The test targets to build, by package; only those that exist in the workspace.
pub struct Plan {
    tests: BTreeMap<String, BTreeSet<String>>,
}

pub struct Built {
    pub sluice: PathBuf,
    pub peer: PathBuf,
    /// test target name -> executable
    pub tests: BTreeMap<String, PathBuf>,
}

pub fn plan(checks: &[Check]) -> Result<Plan> {
    let out = Command::new("cargo")
        .current_dir(workspace())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .context("could not start cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let mut existing = BTreeSet::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        for t in pkg["targets"].as_array().into_iter().flatten() {
            if t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test")) {
                existing.insert((
                    pkg["name"].as_str().unwrap_or("").to_owned(),
                    t["name"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
    }
    let mut tests: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in checks {
        if let Run::Test { package, target, .. } = &c.run {
            if existing.contains(&(package.to_string(), target.to_string())) {
                tests.entry(package.to_string()).or_default().insert(target.to_string());
            }
        }
    }
    Ok(Plan { tests })
}

/// Runs cargo with JSON messages; returns (target kind, target name, executable) of each executable built.
fn cargo_executables(args: &[&str]) -> Result<Vec<(String, String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(workspace())
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else { continue };
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("").to_owned();
        let name = msg["target"]["name"].as_str().unwrap_or("").to_owned();
        exes.push((kind, name, PathBuf::from(exe)));
    }
    Ok(exes)
}

pub fn build(plan: &Plan) -> Result<Built> {
    step("vm-test: building sluice, sluice-peer and the checks' test executables");
    let bins =
        cargo_executables(&["build", "-p", "sluice", "--bin", "sluice", "-p", "sluice-tests", "--bin", "sluice-peer"])?;
    let find_bin = |name: &str| {
        bins.iter()
            .find(|(k, n, _)| k == "bin" && n == name)
            .map(|(_, _, p)| p.clone())
            .with_context(|| format!("cargo built no {name} binary"))
    };
    let sluice = find_bin("sluice")?;
    let peer = find_bin("sluice-peer")?;
    let mut tests = BTreeMap::new();
    for (package, targets) in &plan.tests {
        let mut args = vec!["test", "--no-run", "-p", package.as_str()];
        for t in targets {
            args.extend(["--test", t.as_str()]);
        }
        for (kind, name, exe) in cargo_executables(&args)? {
            if kind == "test" && targets.contains(&name) {
                tests.insert(name, exe);
            }
        }
        for t in targets {
            if !tests.contains_key(t) {
                bail!("cargo test --no-run -p {package} --test {t} built no executable");
            }
        }
    }
    Ok(Built { sluice, peer, tests })
}
