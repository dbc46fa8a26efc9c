//! `sluice cni install` / `uninstall` on a node's CNI config dir whose
//! primary file (written by another CNI, or by anyone with the host path)
//! is the input. Runs the real `install` and `uninstall` on a conf dir in
//! /dev/shm and checks what the README promises:
//!
//! - install fails or leaves sluice-cni as the last plugin of a conflist;
//! - a second install with the same settings changes nothing;
//! - a failed install changes nothing;
//! - uninstall gives back every file as it was (name, bytes and mode) when
//!   sluice-cni was not in it before.
//!
//! The first byte is flags: bits 0-1 name the file (`10-net.conflist`,
//! `10-net.conf`, `10-net.json`); bit 2 adds a valid `20-bridge.conflist`
//! after it; bit 3 makes the file 0600 instead of 0644. A NUL byte in the
//! rest splits it: before, the config; after, `.sluice/state.json` as a
//! previous install (or a tamperer) left it; the promises about bytes then
//! do not apply.
#![no_main]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_cni::install::{install, uninstall, InstallOptions, Level, Settings, UninstallOptions, STATE_DIR};

const NAMES: [&str; 4] = ["10-net.conflist", "10-net.conf", "10-net.json", "10-net.conflist"];
/// A bridge conflist as podman and containerd examples ship it.
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "mynet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

struct Dirs {
    conf: PathBuf,
    bin: PathBuf,
    plugin: PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let root = base.join(format!("sluice-fuzz-cni-{}", std::process::id()));
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let plugin = root.join("sluice-cni");
        std::fs::write(&plugin, b"#!/bin/sh\nexit 0\n").unwrap();
        Dirs { conf: root.join("net.d"), bin, plugin }
    })
}

/// Every entry of the conf dir but our own state dir: name → (bytes, mode).
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == STATE_DIR {
            continue;
        }
        let meta = entry.metadata().unwrap();
        out.insert(name, (std::fs::read(entry.path()).unwrap(), meta.permissions().mode() & 0o7777));
    }
    out
}

/// Whether `v` names sluice-cni anywhere: then uninstall takes that entry
/// out too, and the byte-for-byte promise does not hold by design.
fn mentions_us(v: &Value) -> bool {
    match v {
        Value::String(s) => s == "sluice-cni",
        Value::Array(a) => a.iter().any(mentions_us),
        Value::Object(m) => m.values().any(mentions_us),
        _ => false,
    }
}

fn last_plugin_is_ours(bytes: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else { return false };
    v.get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.last())
        .and_then(|p| p.get("type"))
        .and_then(Value::as_str)
        == Some("sluice-cni")
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let (config, state) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let d = dirs();
    let _ = std::fs::remove_dir_all(&d.conf);
    std::fs::create_dir_all(&d.conf).unwrap();
    let name = NAMES[usize::from(flags & 3)];
    let path = d.conf.join(name);
    std::fs::write(&path, config).unwrap();
    let mode = if flags & 8 != 0 { 0o600 } else { 0o644 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    if flags & 4 != 0 {
        std::fs::write(d.conf.join("20-bridge.conflist"), BRIDGE).unwrap();
    }
    if let Some(state) = state {
        std::fs::create_dir_all(d.conf.join(STATE_DIR)).unwrap();
        std::fs::write(d.conf.join(STATE_DIR).join("state.json"), state).unwrap();
    }
    let before = snapshot(&d.conf);
    let ours_before = before.values().any(|(b, _)| serde_json::from_slice::<Value>(b).is_ok_and(|v| mentions_us(&v)));
    let promises = state.is_none() && !ours_before;

    let opts = InstallOptions {
        bin_dir: d.bin.clone(),
        conf_dir: d.conf.clone(),
        plugin: d.plugin.clone(),
        settings: Settings::default(),
    };
    let mut log = |_: Level, msg: &str| {
        let _ = msg.len();
    };
    let installed = install(&opts, &mut log);
    let after = snapshot(&d.conf);
    match &installed {
        Err(_) => {
            if promises {
                assert_eq!(before, after, "a failed install changed the conf dir: {installed:?}");
            }
        }
        Ok(()) => {
            assert!(
                after.values().any(|(b, _)| last_plugin_is_ours(b)),
                "install succeeded but no config ends with sluice-cni: {after:?}"
            );
            let again = install(&opts, &mut log);
            assert!(again.is_ok(), "a second install failed: {again:?}");
            assert_eq!(after, snapshot(&d.conf), "a second install with the same settings changed the conf dir");
        }
    }
    let removed =
        uninstall(&UninstallOptions { bin_dir: d.bin.clone(), conf_dir: d.conf.clone(), keep_binary: true }, &mut log);
    assert!(removed.is_ok() || !promises, "uninstall failed: {removed:?}");
    if installed.is_ok() && promises {
        let restored = snapshot(&d.conf);
        assert!(
            restored == before,
            "uninstall did not give the conf dir back as it was:\nbefore: {before:?}\nafter:  {restored:?}"
        );
    }
});
