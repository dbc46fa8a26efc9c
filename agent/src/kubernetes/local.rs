//! Where this node's enrolled pods live: their netns and pod cgroup, found
//! by scanning `/proc` (for pods that were running before the agent, or
//! before their namespace was labelled). The CNI plugin's event, when there
//! is one, only makes this faster.
//!
//! Sticky: once a pod is found, the same process's netns path is reported
//! for as long as that process is still in the pod, so the workload the
//! agent enrolled does not change under it on every rebuild. A scan runs
//! only when an enrolled pod is not found yet or its process has gone.

use std::collections::HashMap;
use std::path::PathBuf;

use tracing::{debug, warn};

use crate::inpod::discover::{self, FoundPod};

pub struct LocalPods {
    proc_root: PathBuf,
    cgroup_mount: PathBuf,
    found: HashMap<String, FoundPod>,
    scans: u64,
}

impl LocalPods {
    pub fn new(proc_root: PathBuf, cgroup_mount: PathBuf) -> LocalPods {
        LocalPods { proc_root, cgroup_mount, found: HashMap::new(), scans: 0 }
    }

    /// Resolves `wanted` (pod uids); forgets pods no longer wanted. Returns
    /// the uids still not found.
    pub fn resolve(&mut self, wanted: &[String]) -> Vec<String> {
        self.found.retain(|uid, _| wanted.contains(uid));
        self.found.retain(|_, f| discover::still_in_pod(&self.proc_root, f));
        let missing = |found: &HashMap<String, FoundPod>| -> Vec<String> {
            wanted.iter().filter(|u| !found.contains_key(*u)).cloned().collect()
        };
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
