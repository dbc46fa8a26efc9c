//! `sluice cni install` / `uninstall` as the DaemonSet's install-cni
//! container runs them: the real `sluice` binary against a temp conf dir
//! and bin dir (only files; no root, nothing under /etc/cni or /opt/cni).
//!
//! install puts sluice-cni last in the primary conflist and copies the
//! binary; `--watch` puts the entry back after the primary CNI rewrites its
//! file, and leaves it there when stopped; uninstall gives back the
//! original bytes and removes the binary.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use sluice_tests::agent_bin;

/// Calico's conflist, with the formatting quirks a byte-exact restore must
/// survive: tabs, CRLF, `name` before `cniVersion`, no final newline.
const CALICO: &str = "{\r\n\t\"name\": \"k8s-pod-network\",\r\n\t\"cniVersion\": \"0.3.1\",\r\n\t\"plugins\": [\r\n\t\t{\"type\": \"calico\", \"log_level\": \"info\", \"datastore_type\": \"kubernetes\", \"mtu\": 0, \"ipam\": {\"type\": \"calico-ipam\"}},\r\n\t\t{\"type\": \"portmap\", \"snat\": true, \"capabilities\": {\"portMappings\": true}},\r\n\t\t{\"type\": \"bandwidth\", \"capabilities\": {\"bandwidth\": true}}\r\n\t]\r\n}";

const LOOPBACK: &str = "{\"cniVersion\": \"0.3.1\", \"name\": \"lo\", \"type\": \"loopback\"}\n";

/// How long the watcher may take to notice a rewrite (it polls every second).
const WATCH_DEADLINE: Duration = Duration::from_secs(10);

struct Dirs {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    plugin: PathBuf,
    /// The stderr of every command run, for failure messages.
    logs: PathBuf,
}

impl Dirs {
    fn new() -> Result<Dirs> {
        let tmp = tempfile::tempdir()?;
        let (conf, bin) = (tmp.path().join("etc/cni/net.d"), tmp.path().join("opt/cni/bin"));
        std::fs::create_dir_all(&conf)?;
        std::fs::create_dir_all(&bin)?;
        // Not the real plugin: any bytes prove the copy, and a pattern
        // longer than the copy's compare buffer tests it past one chunk.
        let plugin = tmp.path().join("usr/local/bin/sluice-cni");
        std::fs::create_dir_all(plugin.parent().context("plugin dir")?)?;
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        std::fs::write(&plugin, bytes)?;
        let logs = tmp.path().join("logs");
        std::fs::create_dir(&logs)?;
        Ok(Dirs { _tmp: tmp, conf, bin, plugin, logs })
    }

    /// The DaemonSet's install-cni arguments, with our dirs.
    fn install_args(&self) -> Vec<String> {
        vec![
            "cni".into(),
            "install".into(),
            format!("--bin-dir={}", self.bin.display()),
            format!("--conf-dir={}", self.conf.display()),
            format!("--plugin={}", self.plugin.display()),
            "--agent-socket=/var/run/sluice/cni.sock".into(),
        ]
    }

    fn uninstall_args(&self) -> Vec<String> {
        vec![
            "cni".into(),
            "uninstall".into(),
            format!("--bin-dir={}", self.bin.display()),
            format!("--conf-dir={}", self.conf.display()),
        ]
    }

    fn read(&self, name: &str) -> Result<String> {
        std::fs::read_to_string(self.conf.join(name)).with_context(|| format!("reading {name}"))
    }

    fn names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.conf)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    }

    /// Write `name` as CNIs do: a temp file, then rename over.
    fn write_atomically(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.conf.join(format!(".{name}.calico-tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.conf.join(name))?;
        Ok(())
    }
}

fn sluice(args: &[String]) -> Result<Output> {
    Command::new(agent_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .with_context(|| format!("running sluice {}", args.join(" ")))
}

/// Run `sluice ARGS`, require success, return its log (stderr).
fn sluice_ok(args: &[String]) -> Result<String> {
    let out = sluice(args)?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "sluice {} failed ({}):\n{log}", args.join(" "), out.status);
    Ok(log)
}

fn plugin_types(list: &Value) -> Vec<String> {
    list["plugins"].as_array().into_iter().flatten().map(|p| p["type"].as_str().unwrap_or("?").to_owned()).collect()
}

fn entry(fail_closed: bool, exclude: &[&str]) -> Value {
    json!({
        "type": "sluice-cni",
        "agentSocket": "/var/run/sluice/cni.sock",
        "failClosed": fail_closed,
        "excludeNamespaces": exclude,
        "logFile": "/var/run/sluice/sluice-cni.log",
    })
}

/// The calico conflist holds our entry, last, exactly `want`, and the rest
/// of calico's chain as it was.
fn assert_installed(dirs: &Dirs, want: &Value) -> Result<()> {
    let text = dirs.read("10-calico.conflist")?;
    let list: Value = serde_json::from_str(&text).with_context(|| format!("installed conflist:\n{text}"))?;
    ensure!(plugin_types(&list) == ["calico", "portmap", "bandwidth", "sluice-cni"], "plugins:\n{text}");
    ensure!(list["plugins"][3] == *want, "our entry is not {want}:\n{text}");
    ensure!(list["cniVersion"] == "0.3.1" && list["name"] == "k8s-pod-network", "version or name changed:\n{text}");
    let original: Value = serde_json::from_str(CALICO)?;
    for i in 0..3 {
        ensure!(list["plugins"][i] == original["plugins"][i], "plugin {i} changed:\n{text}");
    }
    // The primary's key order is kept (`name` first), two-space indent.
    ensure!(text.starts_with("{\n  \"name\": \"k8s-pod-network\",\n  \"cniVersion\": \"0.3.1\",\n"), "{text}");
    Ok(())
}

/// SIGKILL on drop unless stopped, so a failing test leaves no watcher.
struct Watcher(Option<Child>);

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{what}: not within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn install_watch_uninstall_with_the_real_binary() -> Result<()> {
    let dirs = Dirs::new()?;
    std::fs::write(dirs.conf.join("10-calico.conflist"), CALICO)?;
    std::fs::write(dirs.conf.join("99-loopback.conf"), LOOPBACK)?;
    std::fs::write(dirs.conf.join("calico-kubeconfig"), "apiVersion: v1\n")?;
    let before = dirs.names()?;

    // 1. Install with non-default settings.
    let mut args = dirs.install_args();
    args.extend(["--fail-closed=false".into(), "--exclude-namespaces=kube-system,infra".into()]);
    sluice_ok(&args)?;
    assert_installed(&dirs, &entry(false, &["kube-system", "infra"]))?;
    ensure!(dirs.read("99-loopback.conf")? == LOOPBACK, "a file that is not the primary was touched");
    let mut with_state = [before.clone(), vec![".sluice".to_owned()]].concat();
    with_state.sort();
    ensure!(dirs.names()? == with_state, "files: {:?}", dirs.names()?);
    let copied = dirs.bin.join("sluice-cni");
    ensure!(std::fs::read(&copied)? == std::fs::read(&dirs.plugin)?, "the copied binary differs");
    let mode = copied.metadata()?.permissions().mode() & 0o7777;
    ensure!(mode == 0o755, "the copied binary has mode {mode:o}");

    // 2. The DaemonSet's own arguments: the entry is replaced in place with
    // the defaults; a second run writes nothing.
    sluice_ok(&dirs.install_args())?;
    let installed = dirs.read("10-calico.conflist")?;
    assert_installed(&dirs, &entry(true, &["kube-system", "sluice-system"]))?;
    let log = sluice_ok(&dirs.install_args())?;
    ensure!(dirs.read("10-calico.conflist")? == installed, "a reinstall changed the file");
    ensure!(log.contains("already last"), "reinstall log:\n{log}");

    // 3. --watch, then calico writes its file again (its pod restarted).
    let mut args = dirs.install_args();
    args.push("--watch".into());
    let stderr = std::fs::File::create(dirs.logs.join("watch.log"))?;
    let child = Command::new(agent_bin())
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting sluice cni install --watch")?;
    let mut watcher = Watcher(Some(child));
    let watch_log = || std::fs::read_to_string(dirs.logs.join("watch.log")).unwrap_or_default();
    // Its first install found everything in place.
    wait_until("the watcher's first look", WATCH_DEADLINE, || Ok(watch_log().contains("already last")))
        .with_context(watch_log)?;

    dirs.write_atomically("10-calico.conflist", CALICO)?;
    ensure!(dirs.read("10-calico.conflist")? == CALICO, "the rewrite did not land");
    let started = Instant::now();
    wait_until("sluice-cni last again after calico's rewrite", WATCH_DEADLINE, || {
        Ok(dirs.read("10-calico.conflist")? == installed)
    })
    .with_context(|| {
        format!("file:\n{}\nwatch log:\n{}", dirs.read("10-calico.conflist").unwrap_or_default(), watch_log())
    })?;
    eprintln!("watcher put the entry back after {:?}", started.elapsed());

    // 4. Stop it as the kubelet does (SIGTERM, by the pid we spawned): it
    // exits cleanly and leaves the plugin in the chain.
    let mut child = watcher.0.take().context("watcher")?;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
    let status = {
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > WATCH_DEADLINE {
                watcher.0 = Some(child);
                bail!("the watcher ignored SIGTERM for {WATCH_DEADLINE:?}:\n{}", watch_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    ensure!(status.success(), "the watcher exited with {status}:\n{}", watch_log());
    ensure!(dirs.read("10-calico.conflist")? == installed, "stopping the watcher changed the chain");
    ensure!(copied.exists(), "stopping the watcher removed the binary");
    ensure!(watch_log().contains("stays in the CNI chain"), "{}", watch_log());

    // 5. Uninstall: the bytes calico last wrote, byte for byte; no binary,
    // no state; a second uninstall has nothing to do and says so.
    sluice_ok(&dirs.uninstall_args())?;
    ensure!(dirs.read("10-calico.conflist")?.as_bytes() == CALICO.as_bytes(), "not byte-exact after uninstall");
    ensure!(dirs.read("99-loopback.conf")? == LOOPBACK, "99-loopback.conf changed");
    ensure!(dirs.names()? == before, "files after uninstall: {:?}", dirs.names()?);
    ensure!(!copied.exists(), "uninstall left the binary");
    let log = sluice_ok(&dirs.uninstall_args())?;
    ensure!(log.contains("not installed"), "second uninstall:\n{log}");
    Ok(())
}

#[test]
fn errors_name_the_dir_or_the_file() -> Result<()> {
    let dirs = Dirs::new()?;
    let check = |want: &str| -> Result<()> {
        let out = sluice(&dirs.install_args())?;
        let log = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "install succeeded:\n{log}");
        ensure!(log.contains(want), "error lacks {want:?}:\n{log}");
        Ok(())
    };
    check(&format!("no CNI config in {} yet", dirs.conf.display()))?;

    std::fs::write(
        dirs.conf.join("10-old.conflist"),
        r#"{"cniVersion": "0.2.0", "name": "x", "plugins": [{"type": "bridge"}]}"#,
    )?;
    check("10-old.conflist: cniVersion \"0.2.0\" is not one sluice-cni supports (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)")?;

    std::fs::write(dirs.conf.join("10-old.conflist"), "{\"cniVersion\": \"0.3.1\", \"plugins\": [")?;
    check("10-old.conflist: not valid JSON")?;
    ensure!(
        dirs.read("10-old.conflist")? == "{\"cniVersion\": \"0.3.1\", \"plugins\": [",
        "a refused file was changed"
    );
    ensure!(!dirs.conf.join(".sluice").exists(), "a refused install left state");

    // Without the plugin binary nothing is edited.
    std::fs::write(
        dirs.conf.join("10-old.conflist"),
        r#"{"cniVersion": "0.3.1", "name": "x", "plugins": [{"type": "bridge"}]}"#,
    )?;
    std::fs::remove_file(&dirs.plugin)?;
    check(&format!("opening the plugin binary {}", dirs.plugin.display()))?;
    ensure!(!dirs.read("10-old.conflist")?.contains("sluice-cni"), "edited without a binary to run");
    Ok(())
}
