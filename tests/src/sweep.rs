//! Removing leftovers of harness runs that died without cleaning up
//! (SIGKILL, abort, power loss).

use crate::names::{owner_pid, HARNESS_PREFIX};
use crate::{cgroup, netns};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Once;

/// Remove netns and cgroups whose names start with `prefix` (which must
/// itself start with [`HARNESS_PREFIX`]) and whose owning process is dead.
/// Names of live processes, including this one, are left alone, so it is
/// safe while other test processes run. Processes still inside a stale
/// cgroup are SIGKILLed via cgroup.kill (they can only be harness
/// children). Returns the names removed.
pub fn sweep_stale(prefix: &str) -> Result<Vec<String>> {
    if !prefix.starts_with(HARNESS_PREFIX) {
        bail!("refusing to sweep {prefix:?}: not under the harness prefix {HARNESS_PREFIX:?}");
    }
    let stale = |name: &str| {
        name.starts_with(prefix) && owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut removed = Vec::new();
    let mut first_err = None;
    let mount = cgroup::cgroup2_mount()?;
    let stale_cgroups: Vec<String> = list_dir(&mount)?.into_iter().filter(|n| stale(n)).collect();
    for name in &stale_cgroups {
        if let Err(e) = cgroup::kill_all(&mount.join(name)) {
            first_err.get_or_insert(e);
        }
    }
    for name in list_dir(Path::new(netns::NETNS_DIR))?.into_iter().filter(|n| stale(n)) {
        match netns::del(&name) {
            Ok(()) => removed.push(name),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    for name in stale_cgroups {
        match cgroup::remove_tree(&mount.join(&name)) {
            Ok(()) => removed.push(name),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(removed), Err)
}

fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Sweep all harness leftovers once per process, before the first topology.
pub(crate) fn sweep_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| match sweep_stale(HARNESS_PREFIX) {
        Ok(removed) if !removed.is_empty() => {
            eprintln!("sluice-tests: removed stale leftovers: {removed:?}")
        }
        Ok(_) => {}
        Err(e) => eprintln!("sluice-tests: sweeping stale leftovers failed: {e:#}"),
    });
}
