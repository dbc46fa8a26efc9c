//! Where this node's enrolled pods live: their netns and pod cgroup, found
//! by scanning `/proc` (for pods that were running before the agent, or
//! before their namespace was labelled). The CNI plugin's event, when there
//! is one, only makes this faster.
//!
//! Sticky: once a pod is found, the same process's netns path is reported
//! for as long as that process is still in the pod, so the workload the
//! agent enrolled does not change under it on every rebuild. A scan runs
//! only when an enrolled pod is not found yet or its process has gone.
//! A scan finds every pod on the node, enrolled or not; the others are
//! remembered until the next scan, so a label change that enrolls a pod
//! that was running at the last scan costs no scan (one costs a read of
//! `/proc/<pid>/cgroup` for every process on the node).
//!
//! [`Hints`] are what the CNI plugin reported (`crate::cni`): a pod's netns
//! path, cgroup and addresses at ADD, before any of its processes exist.
//! A hint wins over the scan; a DEL turns it into a tombstone, so a pod
//! being torn down is not enrolled again from a stale scan while the API
//! server still lists it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::inpod::discover::{self, FoundPod};

/// What the CNI plugin said about one pod at ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub netns: PathBuf,
    pub cgroup: Option<PathBuf>,
    /// From the runtime's prevResult: the API server does not have them yet
    /// at ADD time.
    pub ips: Vec<IpAddr>,
    pub container_id: String,
}

#[derive(Default)]
struct HintSet {
    by_uid: HashMap<String, Hint>,
    /// Pods the plugin has deleted; dropped once the API no longer lists them.
    removed: HashSet<String>,
}

/// The CNI plugin's reports, shared by the CNI server and the builder.
pub struct Hints {
    set: Mutex<HintSet>,
    changed: Arc<Notify>,
}

impl Hints {
    pub(super) fn new(changed: Arc<Notify>) -> Hints {
        Hints { set: Mutex::default(), changed }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HintSet) -> R) -> R {
        let r = f(&mut self.set.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_one();
        r
    }

    pub fn add(&self, uid: String, hint: Hint) {
        self.with(|s| {
            s.removed.remove(&uid);
            s.by_uid.insert(uid, hint);
        });
    }

    pub fn remove(&self, uid: &str) {
        self.with(|s| {
            s.by_uid.remove(uid);
            s.removed.insert(uid.to_string());
        });
    }

    /// The pod a container id was added for (DEL may carry no pod uid).
    pub fn uid_of_container(&self, container_id: &str) -> Option<String> {
        let s = self.set.lock().unwrap_or_else(|p| p.into_inner());
        s.by_uid
            .iter()
            .find(|(_, h)| !container_id.is_empty() && h.container_id == container_id)
            .map(|(u, _)| u.clone())
    }

    /// CNI GC: removes the pods whose container is not in `valid`; returns them.
    pub fn retain_containers(&self, valid: &HashSet<&str>) -> Vec<String> {
        self.with(|s| {
            let stale: Vec<String> = s
                .by_uid
                .iter()
                .filter(|(_, h)| !valid.contains(h.container_id.as_str()))
                .map(|(u, _)| u.clone())
                .collect();
            for uid in &stale {
                s.by_uid.remove(uid);
                s.removed.insert(uid.clone());
            }
            stale
        })
    }

    /// (hints, tombstones) as they are now.
    pub(super) fn snapshot(&self) -> (HashMap<String, Hint>, HashSet<String>) {
        let s = self.set.lock().unwrap_or_else(|p| p.into_inner());
        (s.by_uid.clone(), s.removed.clone())
    }

    /// Forgets the tombstones of pods the API server no longer lists, so the
    /// set does not grow with every pod the node has ever run.
    pub(super) fn forget_removed(&self, listed: &HashSet<&str>) {
        let mut s = self.set.lock().unwrap_or_else(|p| p.into_inner());
        s.removed.retain(|uid| listed.contains(uid.as_str()));
    }
}

pub struct LocalPods {
    proc_root: PathBuf,
    cgroup_mount: PathBuf,
    found: HashMap<String, FoundPod>,
    /// Every pod the last scan found, enrolled or not; checked with
    /// [`discover::still_in_pod`] before use.
    seen: HashMap<String, FoundPod>,
    scans: u64,
}

impl LocalPods {
    pub fn new(proc_root: PathBuf, cgroup_mount: PathBuf) -> LocalPods {
        LocalPods { proc_root, cgroup_mount, found: HashMap::new(), seen: HashMap::new(), scans: 0 }
    }

    /// Resolves `wanted` (pod uids), from `hints` first, then from `/proc`;
    /// forgets pods no longer wanted. Returns the uids still not found.
    pub fn resolve(&mut self, wanted: &[String], hints: &HashMap<String, Hint>) -> Vec<String> {
        // Pods no longer wanted are remembered, for a label flipping back.
        let (keep, unwanted): (HashMap<_, _>, HashMap<_, _>) =
            std::mem::take(&mut self.found).into_iter().partition(|(uid, _)| wanted.contains(uid));
        self.found = keep;
        self.seen.extend(unwanted.into_iter().filter(|(_, f)| f.pid != 0));
        // A hint has no process to check (pid 0); it lasts until the DEL.
        self.found.retain(|uid, f| {
            if f.pid == 0 {
                hints.contains_key(uid)
            } else {
                discover::still_in_pod(&self.proc_root, f)
            }
        });
        for uid in wanted {
            let Some(hint) = hints.get(uid) else { continue };
            if self.found.get(uid).is_some_and(|f| f.pid == 0 && f.netns == hint.netns) {
                continue;
            }
            let cgroup = hint.cgroup.clone().or_else(|| discover::find_pod_cgroup(&self.cgroup_mount, uid));
            match cgroup {
                Some(cgroup) => {
                    let netns = hint.netns.clone();
                    self.found.insert(uid.clone(), FoundPod { uid: uid.clone(), pid: 0, netns, cgroup });
                }
                None => debug!(pod_uid = %uid, "CNI reported the pod, but its cgroup is not there yet"),
            }
        }
        let missing = |found: &HashMap<String, FoundPod>| -> Vec<String> {
            wanted.iter().filter(|u| !found.contains_key(*u)).cloned().collect()
        };
        for uid in missing(&self.found) {
            let Some(f) = self.seen.remove(&uid) else { continue };
            if discover::still_in_pod(&self.proc_root, &f) {
                debug!(pod_uid = %uid, pid = f.pid, "pod found by the last scan is still there");
                self.found.insert(uid, f);
            }
        }
        if missing(&self.found).is_empty() {
            return Vec::new();
        }
        self.scans += 1;
        match discover::scan_proc(&self.proc_root, &self.cgroup_mount) {
            Ok(mut all) => {
                for uid in missing(&self.found) {
                    if let Some(f) = all.remove(&uid) {
                        debug!(pod_uid = %uid, pid = f.pid, cgroup = %f.cgroup.display(), "found pod on this node");
                        self.found.insert(uid, f);
                    }
                }
                all.retain(|uid, _| !self.found.contains_key(uid));
                self.seen = all;
            }
            Err(e) => warn!(proc = %self.proc_root.display(), error = %e, "scanning for pods failed"),
        }
        missing(&self.found)
    }

    pub fn found(&self) -> &HashMap<String, FoundPod> {
        &self.found
    }

    /// How many /proc scans ran (for /config_dump).
    pub fn scans(&self) -> u64 {
        self.scans
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use super::*;

    const A: &str = "1f2e3d4c-5b6a-4789-8abc-def012345678";
    const B: &str = "2a3b4c5d-6e7f-4890-9abc-def012345678";

    /// `/proc/<pid>` of a running process in pod `uid` (cgroupfs naming),
    /// with its own netns stand-in, and the pod's cgroup directory.
    fn process(root: &Path, pid: u32, uid: &str) {
        let rel = format!("kubepods/besteffort/pod{uid}");
        fs::create_dir_all(root.join("cg").join(&rel)).unwrap();
        let dir = root.join("proc").join(pid.to_string());
        fs::create_dir_all(dir.join("ns")).unwrap();
        fs::write(dir.join("cgroup"), format!("0::/{rel}/ctr\n")).unwrap();
        fs::write(dir.join("stat"), format!("{pid} (pause) S 1 {pid} {pid} 0 -1\n")).unwrap();
        let ns = root.join(format!("ns-{pid}"));
        fs::write(&ns, "").unwrap();
        symlink(&ns, dir.join("ns/net")).unwrap();
    }

    #[test]
    fn pods_found_by_a_scan_need_no_other_scan_until_they_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("proc/self/ns")).unwrap();
        fs::write(root.join("host-ns"), "").unwrap();
        symlink(root.join("host-ns"), root.join("proc/self/ns/net")).unwrap();
        process(root, 10, A);
        process(root, 20, B);
        let mut local = LocalPods::new(root.join("proc"), root.join("cg"));
        let none = HashMap::new();
        let wanted = |uids: &[&str]| uids.iter().map(|u| u.to_string()).collect::<Vec<_>>();

        assert!(local.resolve(&wanted(&[A]), &none).is_empty());
        assert_eq!(local.scans(), 1);
        assert_eq!(local.found().keys().collect::<Vec<_>>(), [A]);
        // B was running at that scan: enrolling it (a label change) scans nothing.
        assert!(local.resolve(&wanted(&[A, B]), &none).is_empty());
        assert_eq!(local.scans(), 1);
        assert_eq!(local.found()[B].pid, 20);
        // Un-enrolled and enrolled again: still no scan.
        assert!(local.resolve(&wanted(&[B]), &none).is_empty());
        assert!(!local.found().contains_key(A));
        assert!(local.resolve(&wanted(&[A, B]), &none).is_empty());
        assert_eq!(local.scans(), 1);
        // A remembered pod whose process is gone is not taken: it is scanned for.
        assert!(local.resolve(&wanted(&[B]), &none).is_empty());
        fs::write(root.join("proc/10/stat"), "10 (pause) Z 1 10 10 0 -1\n").unwrap();
        assert_eq!(local.resolve(&wanted(&[A, B]), &none), [A.to_string()]);
        assert_eq!(local.scans(), 2);
        // And a pod that starts later is found by a scan as before.
        process(root, 11, A);
        assert!(local.resolve(&wanted(&[A, B]), &none).is_empty());
        assert_eq!((local.scans(), local.found()[A].pid), (3, 11));
    }
}
