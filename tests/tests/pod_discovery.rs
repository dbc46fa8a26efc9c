//! The agent finds harness pods the way it finds kubelet's: by the UID in
//! each process's cgroup v2 path (`.../pod<uid>`, kubelet's cgroupfs
//! scheme), with the netns from `/proc/<pid>/ns/net`, and by walking the
//! cgroup tree for a pod that has no processes yet.

use std::{os::unix::fs::MetadataExt, path::Path};

use anyhow::{ensure, Context, Result};
use sluice::inpod::discover::{find_pod_cgroup, scan_proc};
use sluice_tests::{cgroup2_mount, require_root, Topology};

/// A UUID as the API server writes it: 8-4-4-4-12 lowercase hex digits.
fn uuid_shaped(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[test]
fn scan_proc_and_find_pod_cgroup_see_harness_pods_root() -> Result<()> {
    require_root!(Ok(()));
    let topo = Topology::new("discover")?;
    let node = topo.add_node("node1")?;
    let (a, b, idle) = (node.add_pod("a")?, node.add_pod("b")?, node.add_pod("idle")?);
    let _pauses = [a.start_pause()?, b.start_pause()?];

    let uids = [a.uid(), b.uid(), idle.uid()];
    for (i, uid) in uids.iter().enumerate() {
        ensure!(uuid_shaped(uid), "pod UID {uid:?} is not UUID-shaped");
        ensure!(!uids[..i].contains(uid), "pod UID {uid} is not unique: {uids:?}");
    }
    for pod in [&a, &b, &idle] {
        let dir = pod.cgroup_path();
        ensure!(dir == node.cgroup_path().join(format!("pod{}", pod.uid())), "{}", dir.display());
        ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    }

    let mount = cgroup2_mount()?;
    let found = scan_proc(Path::new("/proc"), &mount).context("scan_proc")?;
    for pod in [&a, &b] {
        let got = found.get(pod.uid()).with_context(|| format!("pod {} ({}) not found", pod.name(), pod.uid()))?;
        ensure!(got.uid == pod.uid());
        ensure!(got.cgroup == pod.cgroup_path(), "pod {}: cgroup {}", pod.name(), got.cgroup.display());
        let want = std::fs::metadata(pod.netns_path())?.ino();
        let seen = std::fs::metadata(&got.netns).with_context(|| format!("stat {}", got.netns.display()))?.ino();
        ensure!(seen == want, "pod {}: netns inode {seen} via {}, want {want}", pod.name(), got.netns.display());
    }
    ensure!(!found.contains_key(idle.uid()), "pod without processes found: {:?}", found.get(idle.uid()));

    for pod in [&a, &b, &idle] {
        let got = find_pod_cgroup(&topo.cgroup_path(), pod.uid());
        ensure!(got.as_deref() == Some(pod.cgroup_path().as_path()), "pod {}: {got:?}", pod.name());
        // Kubelet writes the UID with dashes; the API can show any case.
        let upper = find_pod_cgroup(&topo.cgroup_path(), &pod.uid().to_uppercase());
        ensure!(upper == got, "pod {}: upper-case UID found {upper:?}", pod.name());
    }
    topo.close()
}
