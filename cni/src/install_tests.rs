//! Install and uninstall against real config shapes in temp dirs: what goes
//! in, what comes out, and that uninstall gives back every byte.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// A bridge conflist as podman/containerd examples ship it.
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "mynet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.22.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

/// Calico's, with tabs and CRLF line ends, and `name` before `cniVersion`.
const CALICO: &str = "{\r\n\t\"name\": \"k8s-pod-network\",\r\n\t\"cniVersion\": \"0.3.1\",\r\n\t\"plugins\": [\r\n\t\t{\r\n\t\t\t\"type\": \"calico\",\r\n\t\t\t\"log_level\": \"info\",\r\n\t\t\t\"datastore_type\": \"kubernetes\",\r\n\t\t\t\"nodename\": \"node1\",\r\n\t\t\t\"mtu\": 0,\r\n\t\t\t\"ipam\": {\"type\": \"calico-ipam\"},\r\n\t\t\t\"policy\": {\"type\": \"k8s\"},\r\n\t\t\t\"kubernetes\": {\"kubeconfig\": \"/etc/cni/net.d/calico-kubeconfig\"}\r\n\t\t},\r\n\t\t{\"type\": \"portmap\", \"snat\": true, \"capabilities\": {\"portMappings\": true}},\r\n\t\t{\"type\": \"bandwidth\", \"capabilities\": {\"bandwidth\": true}}\r\n\t]\r\n}\r\n";

/// What install makes of CALICO with default settings: every key in its
/// original order (`log_level` before `datastore_type`), two-space indent.
const CALICO_INSTALLED: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node1",
      "mtu": 0,
      "ipam": {
        "type": "calico-ipam"
      },
      "policy": {
        "type": "k8s"
      },
      "kubernetes": {
        "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {
        "portMappings": true
      }
    },
    {
      "type": "bandwidth",
      "capabilities": {
        "bandwidth": true
      }
    },
    {
      "type": "sluice-cni",
      "agentSocket": "/var/run/sluice/cni.sock",
      "failClosed": true,
      "excludeNamespaces": [
        "kube-system",
        "sluice-system"
      ],
      "logFile": "/var/run/sluice/sluice-cni.log"
    }
  ]
}
"#;

/// Cilium's, odd indentation and no final newline.
const CILIUM: &str = "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"cilium\",\n  \"plugins\": [\n    {\n       \"type\": \"cilium-cni\",\n       \"enable-debug\": false,\n       \"log-file\": \"/var/run/cilium/cilium-cni.log\"\n    }\n  ]\n}";

/// Flannel's single-plugin `.conf`, `type` first, four-space indent.
const FLANNEL: &str = r#"{
    "type": "flannel",
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
    }
}
"#;

const FLANNEL_INSTALLED: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cbr0",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "sluice-cni",
      "agentSocket": "/var/run/sluice/cni.sock",
      "failClosed": true,
      "excludeNamespaces": [
        "kube-system",
        "sluice-system"
      ],
      "logFile": "/var/run/sluice/sluice-cni.log"
    }
  ]
}
"#;

const LOOPBACK: &str = r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#;

/// A conf dir and a bin dir in a temp dir.
struct Node {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    plugin: PathBuf,
}

impl Node {
    fn new(files: &[(&str, &str)]) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let (conf, bin) = (tmp.path().join("net.d"), tmp.path().join("bin"));
        std::fs::create_dir(&conf).unwrap();
        std::fs::create_dir(&bin).unwrap();
        let plugin = tmp.path().join("sluice-cni-build");
        std::fs::write(&plugin, b"\x7fELF pretend plugin").unwrap();
        let node = Node { _tmp: tmp, conf, bin, plugin };
        for (name, text) in files {
            node.write(name, text);
        }
        node
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.conf.join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.conf.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_str(&self.read(name)).unwrap()
    }

    /// Every file of the conf dir with its bytes, our `.sluice/` left out.
    fn files(&self) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != STATE_DIR)
            .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
            .collect()
    }

    fn opts(&self, settings: Settings) -> InstallOptions {
        InstallOptions { bin_dir: self.bin.clone(), conf_dir: self.conf.clone(), plugin: self.plugin.clone(), settings }
    }

    fn install_with(&self, settings: Settings) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        install(&self.opts(settings), &mut |_, m: &str| lines.push(m.to_owned()))?;
        Ok(lines)
    }

    fn install(&self) -> anyhow::Result<Vec<String>> {
        self.install_with(Settings::default())
    }

    fn uninstall(&self) -> Vec<String> {
        self.uninstall_with(false)
    }

    fn uninstall_with(&self, keep_binary: bool) -> Vec<String> {
        let mut lines = Vec::new();
        let opts = UninstallOptions { bin_dir: self.bin.clone(), conf_dir: self.conf.clone(), keep_binary };
        uninstall(&opts, &mut |_, m: &str| lines.push(m.to_owned())).unwrap();
        lines
    }

    fn state_dir(&self) -> PathBuf {
        self.conf.join(STATE_DIR)
    }
}

fn types(list: &Value) -> Vec<&str> {
    list["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect()
}

fn mode(p: &Path) -> u32 {
    p.metadata().unwrap().permissions().mode() & 0o7777
}

struct Shape {
    what: &'static str,
    files: &'static [(&'static str, &'static str)],
    /// The file that holds the chain after install.
    target: &'static str,
    version: &'static str,
    name: &'static str,
    /// The primary's plugins, in order, before ours.
    before: &'static [&'static str],
}

const SHAPES: &[Shape] = &[
    Shape {
        what: "bridge conflist",
        files: &[("10-bridge.conflist", BRIDGE)],
        target: "10-bridge.conflist",
        version: "1.0.0",
        name: "mynet",
        before: &["bridge", "portmap"],
    },
    Shape {
        what: "calico (with its kubeconfig beside it)",
        files: &[("10-calico.conflist", CALICO), ("calico-kubeconfig", "apiVersion: v1\n")],
        target: "10-calico.conflist",
        version: "0.3.1",
        name: "k8s-pod-network",
        before: &["calico", "portmap", "bandwidth"],
    },
    Shape {
        what: "cilium",
        files: &[("05-cilium.conflist", CILIUM)],
        target: "05-cilium.conflist",
        version: "0.3.1",
        name: "cilium",
        before: &["cilium-cni"],
    },
    Shape {
        what: "flannel .conf becomes a .conflist",
        files: &[("10-flannel.conf", FLANNEL)],
        target: "10-flannel.conflist",
        version: "0.3.1",
        name: "cbr0",
        before: &["flannel"],
    },
    Shape {
        what: "lexical order: 05-cilium before 10-calico before 99-loopback",
        files: &[("10-calico.conflist", CALICO), ("99-loopback.conf", LOOPBACK), ("05-cilium.conflist", CILIUM)],
        target: "05-cilium.conflist",
        version: "0.3.1",
        name: "cilium",
        before: &["cilium-cni"],
    },
    Shape {
        what: "a .json file is a single-plugin config",
        files: &[("50-lo.json", LOOPBACK), ("60-calico.conflist", CALICO)],
        target: "50-lo.conflist",
        version: "0.3.1",
        name: "lo",
        before: &["loopback"],
    },
];

#[test]
fn real_shapes_go_in_last_and_come_out_byte_exact() {
    for shape in SHAPES {
        let what = shape.what;
        let node = Node::new(shape.files);
        let before = node.files();
        node.install().unwrap_or_else(|e| panic!("{what}: {e:#}"));

        let list = node.json(shape.target);
        let mut want: Vec<&str> = shape.before.to_vec();
        want.push(PLUGIN_TYPE);
        assert_eq!(types(&list), want, "{what}");
        assert_eq!(list["plugins"].as_array().unwrap().last().unwrap(), &Settings::default().entry(), "{what}");
        assert_eq!(list["cniVersion"], shape.version, "{what}");
        assert_eq!(list["name"], shape.name, "{what}");
        // Nothing but the target changed (and the .conf it replaced).
        let after = node.files();
        for (name, bytes) in &before {
            if after.contains_key(name) && name != shape.target {
                assert_eq!(&after[name], bytes, "{what}: {name} was touched");
            }
        }
        let converted = !before.contains_key(shape.target);
        let mut names: Vec<&String> = after.keys().collect();
        names.sort();
        let mut want_names: Vec<String> = before.keys().cloned().collect();
        if converted {
            let conf = want_names.iter().position(|n| conf_dir::list_name(n) == shape.target).unwrap();
            want_names[conf] = shape.target.to_owned();
        }
        want_names.sort();
        assert_eq!(names, want_names.iter().collect::<Vec<_>>(), "{what}: files after install");

        // Again: not a byte changes.
        let installed = node.files();
        let lines = node.install().unwrap();
        assert_eq!(node.files(), installed, "{what}: reinstall changed something");
        assert!(lines.iter().any(|l| l.contains("already last")), "{what}: {lines:?}");

        node.uninstall();
        assert_eq!(node.files(), before, "{what}: uninstall is not byte-exact");
        assert!(!node.state_dir().exists(), "{what}: state left behind");
        assert!(!node.bin.join(PLUGIN_TYPE).exists(), "{what}: binary left behind");
    }
}

#[test]
fn calico_rewritten_exactly() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    assert_eq!(node.read("10-calico.conflist"), CALICO_INSTALLED);
}

#[test]
fn flannel_conf_converted_exactly() {
    let node = Node::new(&[("10-flannel.conf", FLANNEL)]);
    node.install().unwrap();
    assert_eq!(node.files().keys().collect::<Vec<_>>(), ["10-flannel.conflist"]);
    assert_eq!(node.read("10-flannel.conflist"), FLANNEL_INSTALLED);
    node.uninstall();
    assert_eq!(node.files(), BTreeMap::from([("10-flannel.conf".to_owned(), FLANNEL.as_bytes().to_vec())]));
}

#[test]
fn binary_is_copied_executable_and_removed() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    let bin = node.bin.join(PLUGIN_TYPE);
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(&node.plugin).unwrap());
    assert_eq!(mode(&bin), 0o755);
    node.uninstall_with(true);
    assert!(bin.exists(), "--keep-binary removed it");
    assert_eq!(node.read("10-calico.conflist"), CALICO);
    node.uninstall();
    assert!(!bin.exists());
}

#[test]
fn new_settings_replace_the_entry_in_place() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    let settings = Settings {
        agent_socket: "/run/other.sock".into(),
        fail_closed: false,
        exclude_namespaces: vec!["infra".into()],
        log_file: "/tmp/cni.log".into(),
    };
    node.install_with(settings.clone()).unwrap();
    let list = node.json("10-calico.conflist");
    assert_eq!(types(&list), ["calico", "portmap", "bandwidth", "sluice-cni"]);
    assert_eq!(
        list["plugins"][3],
        json!({"type": "sluice-cni", "agentSocket": "/run/other.sock", "failClosed": false,
               "excludeNamespaces": ["infra"], "logFile": "/tmp/cni.log"})
    );
    node.uninstall();
    assert_eq!(node.read("10-calico.conflist"), CALICO);
}

#[test]
fn an_entry_no_longer_last_is_moved_last() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    // Another chained plugin appended itself after us.
    let mut list = node.json("10-calico.conflist");
    list["plugins"].as_array_mut().unwrap().push(json!({"type": "tuning"}));
    node.write("10-calico.conflist", &serde_json::to_string_pretty(&list).unwrap());
    node.install().unwrap();
    assert_eq!(types(&node.json("10-calico.conflist")), ["calico", "portmap", "bandwidth", "tuning", "sluice-cni"]);
    // Uninstall cannot give back the original (tuning is new), only drop us.
    node.uninstall();
    assert_eq!(types(&node.json("10-calico.conflist")), ["calico", "portmap", "bandwidth", "tuning"]);
}

#[test]
fn file_mode_is_kept() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    let path = node.conf.join("10-calico.conflist");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    node.install().unwrap();
    assert_eq!(mode(&path), 0o600);
    node.uninstall();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(node.read("10-calico.conflist"), CALICO);
}

#[test]
fn unsupported_version_is_refused_and_nothing_changes() {
    for (version, want) in
        [(r#""0.2.0""#, r#"cniVersion "0.2.0" is not one sluice-cni supports"#), ("", "no \"cniVersion\"")]
    {
        let text = if version.is_empty() {
            r#"{"name": "old", "plugins": [{"type": "bridge"}]}"#.to_owned()
        } else {
            format!(r#"{{"cniVersion": {version}, "name": "old", "plugins": [{{"type": "bridge"}}]}}"#)
        };
        let node = Node::new(&[("10-old.conflist", &text)]);
        let e = format!("{:#}", node.install().unwrap_err());
        assert!(e.contains("10-old.conflist") && e.contains(want), "{e}");
        assert!(e.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{e}");
        assert_eq!(node.read("10-old.conflist"), text);
        assert!(!node.state_dir().exists());
    }
}

#[test]
fn garbage_alone_is_refused_with_the_file_named() {
    let node = Node::new(&[("10-broken.conflist", "{\"name\": \"x\", \"plugins\": [ {\"type\": ")]);
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("no valid CNI config") && e.contains("10-broken.conflist: not valid JSON"), "{e}");
    assert!(e.contains("line 1"), "the parser's position is lost: {e}");
    assert_eq!(node.read("10-broken.conflist"), "{\"name\": \"x\", \"plugins\": [ {\"type\": ");
}

#[test]
fn invalid_files_before_the_primary_are_skipped_by_name() {
    let node = Node::new(&[
        ("00-garbage.conf", "not json at all"),
        ("01-empty.conflist", r#"{"cniVersion": "0.3.1", "name": "e", "plugins": []}"#),
        ("02-list-as-conf.conf", CILIUM),
        ("03-array.json", "[]"),
        ("10-calico.conflist", CALICO),
    ]);
    let lines = node.install().unwrap();
    let all = lines.join("\n");
    for want in [
        "00-garbage.conf: skipped, as the runtime skips it: not valid JSON",
        "01-empty.conflist: skipped, as the runtime skips it: \"plugins\" is empty",
        "02-list-as-conf.conf: skipped, as the runtime skips it: no \"type\" (a conflist saved with a .conf or .json name?)",
        "03-array.json: skipped, as the runtime skips it: not a JSON object but an array",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
    assert_eq!(node.read("10-calico.conflist"), CALICO_INSTALLED);
    assert_eq!(node.read("00-garbage.conf"), "not json at all");
}

#[test]
fn empty_or_missing_dir_says_so() {
    let node = Node::new(&[("README", "not a config"), ("10-calico.conflist.bak", CALICO)]);
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("no CNI config in") && e.contains("net.d"), "{e}");
    std::fs::remove_dir_all(&node.conf).unwrap();
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("no CNI config in"), "{e}");
}

#[test]
fn our_own_files_are_never_candidates() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    // A temp file a killed install left behind sorts first but is ignored.
    node.write(".00-x.conflist.sluice-tmp.4242", "{garbage");
    let names: Vec<String> =
        conf_dir::candidates(&node.conf).unwrap().into_iter().map(|n| n.into_string().unwrap()).collect();
    assert_eq!(names, ["10-calico.conflist"]);
    assert!(node.state_dir().join("state.json").is_file());
}

#[test]
fn uninstall_with_nothing_installed_succeeds_and_says_so() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    let lines = node.uninstall();
    assert!(lines.iter().any(|l| l.contains("not installed")), "{lines:?}");
    assert_eq!(node.read("10-calico.conflist"), CALICO);
    let empty = Node::new(&[]);
    empty.uninstall();
}

#[test]
fn owner_rewrite_becomes_the_new_original() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    let newer = CALICO.replace("\"mtu\": 0", "\"mtu\": 1440");
    node.write("10-calico.conflist", &newer);
    node.install().unwrap();
    assert_eq!(types(&node.json("10-calico.conflist")), ["calico", "portmap", "bandwidth", "sluice-cni"]);
    node.uninstall();
    assert_eq!(node.read("10-calico.conflist"), newer);
}

#[test]
fn reformatted_by_someone_else_still_restores_the_original_bytes() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    let compact = serde_json::to_string(&node.json("10-calico.conflist")).unwrap();
    node.write("10-calico.conflist", &compact);
    // A reinstall keeps the saved original rather than taking the
    // reformatted file (which has our entry) as the new one.
    node.install().unwrap();
    node.write("10-calico.conflist", &compact);
    node.uninstall();
    assert_eq!(node.read("10-calico.conflist"), CALICO);
}

#[test]
fn changed_with_our_entry_kept_loses_only_our_entry() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    let mut list = node.json("10-calico.conflist");
    list["plugins"][0]["mtu"] = json!(1400);
    node.write("10-calico.conflist", &serde_json::to_string(&list).unwrap());
    let lines = node.uninstall();
    assert!(lines.iter().any(|l| l.contains("removed only sluice-cni")), "{lines:?}");
    let after = node.json("10-calico.conflist");
    assert_eq!(types(&after), ["calico", "portmap", "bandwidth"]);
    assert_eq!(after["plugins"][0]["mtu"], 1400);
}

#[test]
fn a_new_earlier_primary_moves_the_entry_and_restores_the_old_file() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    node.write("05-cilium.conflist", CILIUM);
    node.install().unwrap();
    assert_eq!(node.read("10-calico.conflist"), CALICO);
    assert_eq!(types(&node.json("05-cilium.conflist")), ["cilium-cni", "sluice-cni"]);
    node.uninstall();
    assert_eq!(node.read("05-cilium.conflist"), CILIUM);
    assert_eq!(node.read("10-calico.conflist"), CALICO);
}

#[test]
fn flannel_writing_its_conf_again_is_followed() {
    let node = Node::new(&[("10-flannel.conf", FLANNEL)]);
    node.install().unwrap();
    let newer = FLANNEL.replace("\"hairpinMode\": true", "\"hairpinMode\": false");
    node.write("10-flannel.conf", &newer);
    node.install().unwrap();
    assert_eq!(node.files().keys().collect::<Vec<_>>(), ["10-flannel.conflist"]);
    assert_eq!(node.json("10-flannel.conflist")["plugins"][0]["delegate"]["hairpinMode"], false);
    node.uninstall();
    assert_eq!(node.files(), BTreeMap::from([("10-flannel.conf".to_owned(), newer.into_bytes())]));
}

#[test]
fn a_conflist_we_made_that_was_deleted_is_not_resurrected() {
    let node = Node::new(&[("10-flannel.conf", FLANNEL)]);
    node.install().unwrap();
    std::fs::remove_file(node.conf.join("10-flannel.conflist")).unwrap();
    let lines = node.uninstall();
    assert!(lines.iter().any(|l| l.contains("gone since install")), "{lines:?}");
    assert!(node.files().is_empty());
}

#[test]
fn a_conflist_in_the_way_of_a_conversion_is_refused() {
    let node = Node::new(&[("10-flannel.conf", FLANNEL), ("10-flannel.conflist", CILIUM)]);
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("10-flannel.conf: cannot turn it into 10-flannel.conflist"), "{e}");
    assert_eq!(node.read("10-flannel.conflist"), CILIUM);
}

#[test]
fn lost_state_still_takes_the_entry_out() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.install().unwrap();
    std::fs::remove_dir_all(node.state_dir()).unwrap();
    let lines = node.uninstall();
    assert!(lines.iter().any(|l| l.contains("no saved original")), "{lines:?}");
    assert_eq!(types(&node.json("10-calico.conflist")), ["calico", "portmap", "bandwidth"]);
}

#[test]
fn corrupt_state_is_set_aside() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    std::fs::create_dir(node.state_dir()).unwrap();
    std::fs::write(node.state_dir().join("state.json"), r#"{"original": {"file": "../../etc/passwd.conf"}}"#).unwrap();
    let lines = node.install().unwrap();
    assert!(lines.iter().any(|l| l.contains("state.json: unusable")), "{lines:?}");
    assert!(node.state_dir().join("state.json.bad").is_file());
    assert_eq!(node.read("10-calico.conflist"), CALICO_INSTALLED);
    node.uninstall();
    assert_eq!(node.read("10-calico.conflist"), CALICO);
}

#[test]
fn files_sluice_must_not_edit_are_errors_not_skips() {
    // A symlink the runtime would follow.
    let node = Node::new(&[("real.txt", CILIUM)]);
    std::os::unix::fs::symlink(node.conf.join("real.txt"), node.conf.join("05-cilium.conflist")).unwrap();
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("05-cilium.conflist: a symlink"), "{e}");
    assert_eq!(node.read("real.txt"), CILIUM);

    // Over the size bound: never read whole.
    let big = format!("{}{}", " ".repeat(MAX_CONFIG_BYTES as usize), LOOPBACK);
    let node = Node::new(&[("01-big.conf", &big), ("10-calico.conflist", CALICO)]);
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("01-big.conf: larger than 1048576 bytes"), "{e}");
    assert_eq!(node.read("10-calico.conflist"), CALICO);
}

#[test]
fn sluice_alone_is_not_a_chain() {
    let node = Node::new(&[("10-us.conf", r#"{"cniVersion": "1.0.0", "name": "x", "type": "sluice-cni"}"#)]);
    let e = format!("{:#}", node.install().unwrap_err());
    assert!(e.contains("10-us.conf: its only plugin is sluice-cni"), "{e}");
}

#[test]
fn watch_puts_the_entry_back_and_leaves_it_on_stop() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    let opts = node.opts(Settings::default());
    let (stop, stopped) = mpsc::channel();
    let (lines_tx, lines_rx) = mpsc::channel();
    let watcher = std::thread::spawn(move || {
        watch(&opts, &stopped, Duration::from_millis(20), &mut |_, m: &str| {
            let _ = lines_tx.send(m.to_owned());
        })
    });
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let path = node.conf.join("10-calico.conflist");
    let has_us = || std::fs::read_to_string(&path).is_ok_and(|t| t == CALICO_INSTALLED);
    wait_for("the first install", &has_us);

    // The primary CNI writes its file again, atomically as CNIs do.
    let tmp = node.conf.join(".calico-tmp");
    std::fs::write(&tmp, CALICO).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for("the entry back", &has_us);

    // No config at all for a while, then a new one: said once, then followed.
    std::fs::remove_file(&path).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    node.write("05-cilium.conflist", CILIUM);
    wait_for("cilium's chain", &|| node.read("05-cilium.conflist").contains("sluice-cni"));

    stop.send(()).unwrap();
    watcher.join().unwrap().unwrap();
    assert_eq!(types(&node.json("05-cilium.conflist")), ["cilium-cni", "sluice-cni"]);
    let lines: Vec<String> = lines_rx.try_iter().collect();
    let waiting = lines.iter().filter(|l| l.contains("no CNI config in")).count();
    assert_eq!(waiting, 1, "a lasting problem is said once: {lines:#?}");
    assert!(lines.last().unwrap().contains("stays in the CNI chain"), "{lines:#?}");
}
