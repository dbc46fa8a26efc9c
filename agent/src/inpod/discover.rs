//! Pods already running on this node, found without the Kubernetes API's
//! help: the pod UID from each process's cgroup v2 path, its netns from
//! `/proc/<pid>/ns/net`, and the pod-level cgroup directory (the one kubelet
//! names after the UID, not a container's leaf).
//!
//! Kubelet names the pod-level directory in one of two schemes:
//!
//! ```text
//! cgroupfs: /kubepods[/besteffort|/burstable]/pod1f2e3d4c-5b6a-4789-8abc-def012345678/<container id>
//! systemd:  /kubepods.slice[/kubepods-burstable.slice]/kubepods[-burstable]-pod1f2e3d4c_5b6a_4789_8abc_def012345678.slice/cri-containerd-<id>.scope
//! ```
//!
//! Everything read here is hostile: processes exit mid-scan, files vanish or
//! are huge, lines are malformed. Such entries are skipped, never fatal; all
//! loops are bounded.
//!
//! A returned `/proc/<pid>/ns/net` path is only as good as the pid: open it
//! promptly (and compare what was opened with what was expected), since the
//! process can exit and its pid be reused.

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::{debug, warn};

/// At most this many `/proc` directory entries are read per scan.
const MAX_PROC_ENTRIES: usize = 1_000_000;
/// `/proc/<pid>/cgroup` files longer than this are skipped.
const MAX_CGROUP_FILE: u64 = 64 * 1024;
/// `/proc/<pid>/stat` is one short line; a longer one is not procfs.
const MAX_STAT_FILE: u64 = 4 * 1024;
/// [`find_pod_cgroup`] looks this many levels below its root, no deeper
/// (kubelet's pod directories sit at depth 1 to 3 below its cgroup root).
const MAX_SEARCH_DEPTH: usize = 6;
/// [`find_pod_cgroup`] reads at most this many directory entries.
const MAX_SEARCH_ENTRIES: usize = 200_000;

/// One pod found on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundPod {
    /// Canonical: lowercase, with dashes (`1f2e3d4c-5b6a-4789-8abc-def012345678`).
    pub uid: String,
    /// The process whose netns is reported.
    pub pid: u32,
    /// `<proc_root>/<pid>/ns/net`; it could be opened during the scan.
    pub netns: PathBuf,
    /// Absolute pod-level cgroup directory under the cgroup2 mount.
    pub cgroup: PathBuf,
}

/// `uid` in canonical form (lowercase, dashes) if it is UUID-shaped with
/// dashes, as `K8S_POD_UID` and `metadata.uid` are.
pub fn canonical_pod_uid(uid: &str) -> Option<String> {
    canonical_uid(uid, b'-')
}

/// `s` as a canonical pod UID if it is UUID-shaped (8-4-4-4-12 hex digits)
/// with `sep` between the groups; lowercased, with dashes.
fn canonical_uid(s: &str, sep: u8) -> Option<String> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = String::with_capacity(36);
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != sep {
                return None;
            }
            out.push('-');
        } else if c.is_ascii_hexdigit() {
            out.push(c.to_ascii_lowercase() as char);
        } else {
            return None;
        }
    }
    Some(out)
}

/// The pod UID carried by one cgroup directory name, in either scheme:
/// `pod<uid>` (cgroupfs, dashes) or `...-pod<uid>.slice` (systemd, where `-`
/// separates the slice hierarchy and the UID's dashes become `_`).
fn uid_from_component(name: &str) -> Option<String> {
    if let Some(uid) = name.strip_prefix("pod").and_then(|rest| canonical_uid(rest, b'-')) {
        return Some(uid);
    }
    let stem = name.strip_suffix(".slice")?;
    let last = stem.rsplit('-').next()?;
    canonical_uid(last.strip_prefix("pod")?, b'_')
}

/// Parses a pod UID out of one cgroup path (either naming scheme); returns
/// (uid, the path prefix up to and including the pod component). The first
/// (outermost) component carrying a UID is the pod's; a container's leaf
/// below it never carries one.
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<(String, String)> {
    let mut end = 0;
    for (i, component) in path.split('/').enumerate() {
        end += component.len() + usize::from(i > 0);
        if let Some(uid) = uid_from_component(component) {
            return Some((uid, path[..end].to_owned()));
        }
    }
    None
}

/// The path of the cgroup v2 (`0::`) line of a `/proc/<pid>/cgroup` file.
/// Hybrid hosts also list v1 hierarchies (`4:memory:/...`); those are
/// ignored, as is a v1-only file (no `0::` line) and a non-UTF-8 path.
fn v2_path(file: &[u8]) -> Option<&str> {
    let line = file.split(|&b| b == b'\n').find_map(|line| line.strip_prefix(b"0::"))?;
    std::str::from_utf8(line).ok()
}

/// At most `max` bytes of `path`; `None` if it cannot be read or is longer.
fn read_bounded(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path).ok()?.take(max + 1).read_to_end(&mut buf).ok()?;
    (buf.len() as u64 <= max).then_some(buf)
}

/// The state letter of `/proc/<pid>/stat` (`pid (comm) S ...`; comm may
/// itself contain spaces and parentheses, hence the last `)`).
fn proc_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    match stat.get(close + 1..close + 3)? {
        [b' ', state] => Some(*state),
        _ => None,
    }
}

/// (device, inode) of the namespace behind an ns link, if it can be opened.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    let meta = File::open(path).ok()?.metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The best process seen so far for one pod.
struct Candidate {
    pid: u32,
    netns: (u64, u64),
    /// Its netns is not the agent's own.
    own_netns: bool,
    prefix: String,
}

/// Scans `proc_root` (normally "/proc") and returns one entry per pod UID.
///
/// A process counts only if it is not a zombie (or dead) and its `ns/net`
/// can be opened: a zombie's namespaces are gone and its pid is about to be
/// reused, so a pod whose processes are all like that is being torn down
/// (its cgroup is still found by [`find_pod_cgroup`]). All processes of a pod
/// share the pause container's netns; if two do not, the one outside the
/// agent's own netns (`<proc_root>/self/ns/net`) is kept and a warning logged.
/// Among equals the lowest pid wins.
///
/// The pod-level directory is the cgroup path's prefix joined under
/// `cgroup_mount`. If that is not a directory (the agent runs in a cgroup
/// namespace, so paths read `/../../kubepods...`, or the mount is a narrower
/// bind), it is looked up by UID under `cgroup_mount` instead; a pod whose
/// directory cannot be found is left out.
///
/// Fails only if `proc_root` itself cannot be listed.
pub fn scan_proc(proc_root: &Path, cgroup_mount: &Path) -> io::Result<HashMap<String, FoundPod>> {
    let self_netns = ns_id(&proc_root.join("self/ns/net"));
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(proc_root)?.take(MAX_PROC_ENTRIES) {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(pid @ 1..) = name.parse::<u32>() {
            pids.push(pid);
        }
    }
    pids.sort_unstable();

    let mut best: HashMap<String, Candidate> = HashMap::new();
    for pid in pids {
        // Any of these failing means the process exited (or is not ours to
        // read): skip it quietly.
        let dir = proc_root.join(pid.to_string());
        let Some(file) = read_bounded(&dir.join("cgroup"), MAX_CGROUP_FILE) else { continue };
        let Some((uid, prefix)) = v2_path(&file).and_then(pod_uid_from_cgroup_path) else { continue };
        let Some(stat) = read_bounded(&dir.join("stat"), MAX_STAT_FILE) else { continue };
        if matches!(proc_state(&stat), None | Some(b'Z' | b'X' | b'x')) {
            continue;
        }
        let Some(netns) = ns_id(&dir.join("ns/net")) else { continue };
        let own_netns = self_netns == Some(netns);
        match best.get_mut(&uid) {
            None => {
                best.insert(uid, Candidate { pid, netns, own_netns, prefix });
            }
            Some(kept) if kept.netns != netns => {
                let replace = kept.own_netns && !own_netns;
                let (keep, drop) = if replace { (pid, kept.pid) } else { (kept.pid, pid) };
                warn!(
                    pod_uid = %uid,
                    kept_pid = keep,
                    other_pid = drop,
                    "processes of one pod are in different network namespaces; keeping the one outside the agent's"
                );
                if replace {
                    *kept = Candidate { pid, netns, own_netns, prefix };
                }
            }
            Some(_) => {}
        }
    }

    let mut found = HashMap::with_capacity(best.len());
    for (uid, c) in best {
        let joined = cgroup_mount.join(c.prefix.trim_start_matches('/'));
        let is_dir =
            !c.prefix.split('/').any(|p| p == "..") && std::fs::symlink_metadata(&joined).is_ok_and(|m| m.is_dir());
        let cgroup = if is_dir { Some(joined) } else { find_pod_cgroup(cgroup_mount, &uid) };
        let Some(cgroup) = cgroup else {
            debug!(pod_uid = %uid, pid = c.pid, path = %c.prefix, "pod cgroup directory not found; skipped");
            continue;
        };
        let netns = proc_root.join(c.pid.to_string()).join("ns/net");
        found.insert(uid.clone(), FoundPod { uid, pid: c.pid, netns, cgroup });
    }
    Ok(found)
}

/// Whether `pod`'s process is still alive and in that pod: a cheap check
/// (one small file) that keeps a found netns path from outliving its pid.
pub fn still_in_pod(proc_root: &Path, pod: &FoundPod) -> bool {
    let dir = proc_root.join(pod.pid.to_string());
    let Some(file) = read_bounded(&dir.join("cgroup"), MAX_CGROUP_FILE) else { return false };
    let in_pod = v2_path(&file).and_then(pod_uid_from_cgroup_path).is_some_and(|(uid, _)| uid == pod.uid);
    let alive = read_bounded(&dir.join("stat"), MAX_STAT_FILE)
        .is_some_and(|stat| !matches!(proc_state(&stat), None | Some(b'Z' | b'X' | b'x')));
    in_pod && alive
}

/// Finds the pod-level cgroup directory for `uid` anywhere under `root` (the
/// cgroup v2 mount, or a narrower --cgroup-root), in either naming scheme,
/// without a /proc scan (kubelet creates it before any container starts).
///
/// Breadth-first, so the shallowest match wins; at most
/// [`MAX_SEARCH_DEPTH`] levels below `root` and [`MAX_SEARCH_ENTRIES`]
/// directory entries. Symlinks are never followed, and no other pod's
/// directory is entered (its children are containers). `uid` may be in any
/// case, with dashes; anything not UUID-shaped finds nothing.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let uid = canonical_uid(uid, b'-')?;
    let mut budget = MAX_SEARCH_ENTRIES;
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            if budget == 0 {
                return None;
            }
            budget -= 1;
            let Ok(entry) = entry else { continue };
            // DirEntry::file_type does not follow symlinks.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            match name.to_str().and_then(uid_from_component) {
                Some(found) if found == uid => return Some(entry.path()),
                Some(_) => {}
                None if depth + 1 < MAX_SEARCH_DEPTH => queue.push_back((entry.path(), depth + 1)),
                None => {}
            }
        }
    }
    None
}

/// The cgroup v2 mount point from /proc/self/mountinfo (hybrid hosts mount
/// it at /sys/fs/cgroup/unified, pure v2 at /sys/fs/cgroup).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_mountinfo(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/self/mountinfo"))
}

/// mountinfo: `id parent maj:min root mountpoint opts [optional...] - fstype src superopts`;
/// the first cgroup2 mount point.
fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(unescape_mountinfo)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Three octal digits, at most \377 (one byte).
        let octal = b.get(i + 1..i + 4).filter(|d| d[0] <= b'3' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::symlink,
        path::{Path, PathBuf},
    };

    use super::*;

    const UID_A: &str = "1f2e3d4c-5b6a-4789-8abc-def012345678";
    const UID_B: &str = "0a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d";
    const UID_C: &str = "99999999-8888-4777-a666-555555555555";
    const UID_D: &str = "abcdef01-2345-4678-9abc-def012345678";
    const UID_E: &str = "12345678-90ab-4cde-8f01-234567890abc";
    const UID_F: &str = "fedcba98-7654-4321-8fed-cba987654321";
    const CTR: &str = "4f1a9c0e7b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

    fn under(uid: &str) -> String {
        uid.replace('-', "_")
    }

    fn parsed(path: &str) -> Option<(String, String)> {
        pod_uid_from_cgroup_path(path)
    }

    #[test]
    fn cgroupfs_scheme_every_qos_class() {
        for qos in ["/kubepods/besteffort", "/kubepods/burstable", "/kubepods"] {
            let pod = format!("{qos}/pod{UID_A}");
            assert_eq!(parsed(&format!("{pod}/{CTR}")), Some((UID_A.into(), pod.clone())), "{qos}");
            assert_eq!(parsed(&pod), Some((UID_A.into(), pod.clone())), "the pod dir itself");
        }
        // A kubelet --cgroup-root, and the test harness's layout.
        let pod = format!("/custom/root/kubepods/pod{UID_B}");
        assert_eq!(parsed(&format!("{pod}/{CTR}")), Some((UID_B.into(), pod)));
        let pod = format!("/sl-1a-0-discover/node1/pod{UID_B}");
        assert_eq!(parsed(&pod), Some((UID_B.into(), pod)));
    }

    #[test]
    fn systemd_scheme_every_qos_class() {
        let u = under(UID_A);
        for (slices, pod) in [
            ("/kubepods.slice/kubepods-burstable.slice", format!("kubepods-burstable-pod{u}.slice")),
            ("/kubepods.slice/kubepods-besteffort.slice", format!("kubepods-besteffort-pod{u}.slice")),
            ("/kubepods.slice", format!("kubepods-pod{u}.slice")),
        ] {
            let prefix = format!("{slices}/{pod}");
            for leaf in
                [format!("cri-containerd-{CTR}.scope"), format!("crio-{CTR}.scope"), format!("docker-{CTR}.scope")]
            {
                assert_eq!(parsed(&format!("{prefix}/{leaf}")), Some((UID_A.into(), prefix.clone())), "{leaf}");
            }
            assert_eq!(parsed(&prefix), Some((UID_A.into(), prefix.clone())));
        }
    }

    #[test]
    fn uids_are_canonical() {
        let upper = UID_A.to_uppercase();
        assert_eq!(parsed(&format!("/kubepods/pod{upper}/x")).unwrap().0, UID_A);
        let pod = format!("/kubepods.slice/kubepods-pod{}.slice", under(&upper));
        assert_eq!(parsed(&pod).unwrap().0, UID_A);
    }

    #[test]
    fn garbage_is_ignored() {
        let u = under(UID_A);
        for path in [
            String::new(),
            "/".into(),
            "/kubepods".into(),
            "/kubepods.slice/kubepods-burstable.slice".into(),
            "/system.slice/containerd.service".into(),
            "/user.slice/user-0.slice/session-1.scope".into(),
            "/kubepods/podnotauuid/x".into(),
            "/kubepods/pod".into(),
            // One digit short, one too many, a non-hex digit, dashes misplaced.
            format!("/kubepods/pod{}/x", &UID_A[1..]),
            format!("/kubepods/pod{UID_A}0/x"),
            format!("/kubepods/pod{}g/x", &UID_A[..35]),
            "/kubepods/pod1f2e3d4c5-b6a-4789-8abc-def012345678".into(),
            // Static pods: kubelet's config hash, 32 hex digits without dashes.
            "/kubepods/burstable/pod8c0f1e3b0a2d4e6f8a9b1c3d5e7f9a0b/x".into(),
            // Each scheme with the other's separator.
            format!("/kubepods/pod{u}/x"),
            format!("/kubepods.slice/kubepods-pod{UID_A}.slice"),
            // Not a slice, or something after the UID.
            format!("/kubepods.slice/kubepods-pod{u}.scope"),
            format!("/kubepods.slice/kubepods-pod{u}x.slice"),
            format!("/kubepods/pod{UID_A} (deleted)"),
            format!("/kubepods/xpod{UID_A}"),
            "\0\u{fffd}//pod-/../..".into(),
        ] {
            assert_eq!(parsed(&path), None, "{path:?}");
        }
    }

    #[test]
    fn the_outermost_pod_component_wins() {
        let pod = format!("/kubepods/pod{UID_A}");
        assert_eq!(parsed(&format!("{pod}/pod{UID_B}")), Some((UID_A.into(), pod)));
    }

    #[test]
    fn cgroup_files_v2_and_hybrid() {
        let v2 = format!("0::/kubepods/pod{UID_A}/{CTR}\n");
        assert_eq!(v2_path(v2.as_bytes()), Some(format!("/kubepods/pod{UID_A}/{CTR}").as_str()));
        let hybrid = format!(
            "12:memory:/kubepods/pod{UID_B}/{CTR}\n11:cpu,cpuacct:/kubepods/pod{UID_B}/{CTR}\n\
             1:name=systemd:/kubepods/pod{UID_B}/{CTR}\n0::/kubepods/pod{UID_A}/{CTR}\n"
        );
        // Only the v2 line counts, even where v1 hierarchies disagree with it.
        assert_eq!(v2_path(hybrid.as_bytes()).and_then(pod_uid_from_cgroup_path).unwrap().0, UID_A);
        let v1_only = format!("12:memory:/kubepods/pod{UID_B}/{CTR}\n1:name=systemd:/kubepods/pod{UID_B}\n");
        assert_eq!(v2_path(v1_only.as_bytes()), None);
        assert_eq!(v2_path(b""), None);
        assert_eq!(v2_path(b"garbage\n\xff\xfe\n0:"), None);
        assert_eq!(v2_path(b"0::/\xffpod\n"), None, "non-UTF-8");
    }

    #[test]
    fn stat_states() {
        assert_eq!(proc_state(b"42 (pause) S 1 42 42 0 -1"), Some(b'S'));
        assert_eq!(proc_state(b"42 (a) b) (c) Z 1 42"), Some(b'Z'));
        assert_eq!(proc_state(b"42 (pause)"), None);
        assert_eq!(proc_state(b"42 pause S"), None);
        assert_eq!(proc_state(b""), None);
    }

    #[test]
    fn mountinfo_hybrid_pure_and_escaped() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n\
                      33 31 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,xattr,name=systemd\n";
        assert_eq!(parse_mountinfo(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure =
            "24 30 0:22 / /sys rw - sysfs sysfs rw\n28 24 0:24 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let escaped = "41 31 0:38 / /mnt/c\\040g\\134x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(escaped), Some(PathBuf::from("/mnt/c g\\x")));
        assert_eq!(parse_mountinfo("1 2 0:1 / /x rw - tmpfs t rw\ngarbage\n - cgroup2"), None);
        assert_eq!(parse_mountinfo(""), None);
    }

    #[test]
    fn this_hosts_cgroup2_mount_is_a_directory() {
        // Every host that builds Sluice runs cgroup v2 (pure or hybrid).
        if let Ok(mount) = cgroup2_mount() {
            assert!(mount.join("cgroup.procs").exists(), "{}", mount.display());
        }
    }

    /// A fake `/proc` plus a fake cgroup mount in one tempdir.
    struct Fake {
        _dir: tempfile::TempDir,
        proc: PathBuf,
        cg: PathBuf,
        ns: PathBuf,
    }

    impl Fake {
        fn new() -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let (proc, cg, ns) = (dir.path().join("proc"), dir.path().join("cg"), dir.path().join("ns"));
            for d in [&proc, &cg, &ns] {
                fs::create_dir(d).unwrap();
            }
            let fake = Fake { _dir: dir, proc, cg, ns };
            // The agent itself, in the host netns.
            fake.netns("host");
            let me = fake.proc.join("self");
            fs::create_dir_all(me.join("ns")).unwrap();
            symlink(fake.ns.join("host"), me.join("ns/net")).unwrap();
            fake
        }

        /// A netns stand-in: its own file, so its own inode.
        fn netns(&self, name: &str) -> PathBuf {
            let path = self.ns.join(name);
            if !path.exists() {
                fs::write(&path, name).unwrap();
            }
            path
        }

        fn cgroup_dir(&self, rel: &str) -> PathBuf {
            let path = self.cg.join(rel.trim_start_matches('/'));
            fs::create_dir_all(&path).unwrap();
            path
        }

        /// `/proc/<pid>` with whichever of cgroup, stat, ns/net are given.
        fn process(&self, pid: u32, cgroup: Option<&str>, state: Option<char>, netns: Option<&str>) {
            let dir = self.proc.join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).unwrap();
            if let Some(cgroup) = cgroup {
                fs::write(dir.join("cgroup"), cgroup).unwrap();
            }
            if let Some(state) = state {
                fs::write(dir.join("stat"), format!("{pid} (proc {pid}) {state} 1 {pid} {pid} 0 -1\n")).unwrap();
            }
            if let Some(netns) = netns {
                symlink(self.ns.join(netns), dir.join("ns/net")).unwrap();
            }
        }

        fn running(&self, pid: u32, cgroup: &str, netns: &str) {
            self.netns(netns);
            self.process(pid, Some(cgroup), Some('S'), Some(netns));
        }

        fn found(&self, uid: &str, pid: u32, cgroup: &Path) -> FoundPod {
            FoundPod {
                uid: uid.into(),
                pid,
                netns: self.proc.join(pid.to_string()).join("ns/net"),
                cgroup: cgroup.to_path_buf(),
            }
        }
    }

    #[test]
    fn scan_of_a_fake_proc_tree() {
        let f = Fake::new();
        // A: cgroupfs, two processes in one netns (pause + app): the lower pid.
        let a = f.cgroup_dir(&format!("kubepods/besteffort/pod{UID_A}"));
        f.running(100, &format!("0::/kubepods/besteffort/pod{UID_A}/{CTR}\n"), "a");
        f.running(101, &format!("0::/kubepods/besteffort/pod{UID_A}/other\n"), "a");
        // B: systemd on a hybrid host; its first process is a zombie.
        let b_rel = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", under(UID_B));
        let b = f.cgroup_dir(&b_rel);
        let b_file =
            format!("5:memory:/{b_rel}/x\n1:name=systemd:/{b_rel}/x\n0::/{b_rel}/cri-containerd-{CTR}.scope\n");
        f.netns("b");
        f.process(200, Some(&b_file), Some('Z'), Some("b"));
        f.running(201, &b_file, "b");
        // C: a lower pid in the agent's (host) netns, a higher one in the pod's.
        let c = f.cgroup_dir(&format!("kubepods/pod{UID_C}"));
        f.running(300, &format!("0::/kubepods/pod{UID_C}/x\n"), "host");
        f.running(301, &format!("0::/kubepods/pod{UID_C}/y\n"), "c");
        f.running(302, &format!("0::/kubepods/pod{UID_C}/z\n"), "host");
        // D: the agent runs in a cgroup namespace, so the path is relative to
        // it; the directory is found by UID instead.
        let d = f.cgroup_dir(&format!("kubepods/burstable/pod{UID_D}"));
        f.running(400, &format!("0::/../../burstable/pod{UID_D}/x\n"), "d");
        // E: every process of it vanished at some point of the scan.
        f.process(500, None, None, None); // before cgroup was read
        f.process(501, Some(&format!("0::/kubepods/pod{UID_E}/x\n")), None, Some("e")); // before stat
        f.process(502, Some(&format!("0::/kubepods/pod{UID_E}/x\n")), Some('S'), Some("gone")); // ns/net dangles
        f.process(503, Some(&format!("0::/kubepods/pod{UID_E}/x\n")), Some('X'), None); // dead
        f.cgroup_dir(&format!("kubepods/pod{UID_E}"));
        // F: running, but its cgroup directory is nowhere under the mount.
        f.running(600, &format!("0::/kubepods/pod{UID_F}/x\n"), "f");
        // Not pods, or not processes.
        f.running(700, "0::/system.slice/containerd.service\n", "host");
        f.running(701, "12:memory:/kubepods/podnotauuid/x\n0::/\n", "host");
        f.running(702, &format!("0::/kubepods/pod{UID_F}x/y\n"), "host");
        f.running(703, &"0::/kubepods/".repeat(10_000), "host"); // > 64 KiB
        fs::write(f.proc.join("cpuinfo"), "processor: 0").unwrap();
        fs::create_dir(f.proc.join("sys")).unwrap();
        fs::create_dir(f.proc.join("0")).unwrap();
        fs::create_dir(f.proc.join("+5")).unwrap();
        symlink(f.proc.join("100"), f.proc.join("thread-self")).unwrap();

        let found = scan_proc(&f.proc, &f.cg).unwrap();
        let mut uids: Vec<&str> = found.keys().map(String::as_str).collect();
        uids.sort_unstable();
        let mut want = vec![UID_A, UID_B, UID_C, UID_D];
        want.sort_unstable();
        assert_eq!(uids, want);
        assert_eq!(found[UID_A], f.found(UID_A, 100, &a));
        assert_eq!(found[UID_B], f.found(UID_B, 201, &b));
        assert_eq!(found[UID_C], f.found(UID_C, 301, &c));
        assert_eq!(found[UID_D], f.found(UID_D, 400, &d));
    }

    #[test]
    fn scan_of_an_empty_or_missing_proc() {
        let f = Fake::new();
        assert!(scan_proc(&f.proc, &f.cg).unwrap().is_empty());
        assert!(scan_proc(&f.proc.join("nope"), &f.cg).is_err());
        // Without /proc/self every netns counts as the pod's: first pid wins.
        fs::remove_file(f.proc.join("self/ns/net")).unwrap();
        let c = f.cgroup_dir(&format!("kubepods/pod{UID_C}"));
        f.running(300, &format!("0::/kubepods/pod{UID_C}/x\n"), "host");
        f.running(301, &format!("0::/kubepods/pod{UID_C}/y\n"), "c");
        assert_eq!(scan_proc(&f.proc, &f.cg).unwrap()[UID_C], f.found(UID_C, 300, &c));
    }

    #[test]
    fn scan_on_the_real_proc_never_fails() {
        // Whatever runs on the build host: no panic, and whatever is found is
        // well-formed.
        let mount = cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        for (uid, pod) in scan_proc(Path::new("/proc"), &mount).unwrap() {
            assert_eq!(canonical_uid(&uid, b'-').as_deref(), Some(uid.as_str()));
            assert!(pod.cgroup.starts_with(&mount) && pod.cgroup.is_dir());
        }
    }

    #[test]
    fn find_pod_cgroup_both_schemes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mk = |rel: &str| {
            let p = root.join(rel);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("cgroup.procs"), "").unwrap();
            p
        };
        mk("system.slice/containerd.service");
        mk("user.slice/user-0.slice");
        let a = mk(&format!("kubepods/besteffort/pod{UID_A}"));
        mk(&format!("kubepods/besteffort/pod{UID_A}/{CTR}"));
        mk(&format!("kubepods/burstable/pod{UID_C}/{CTR}"));
        let b_rel = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", under(UID_B));
        let b = mk(&b_rel);
        mk(&format!("{b_rel}/cri-containerd-{CTR}.scope"));
        let g = mk(&format!("kubepods.slice/kubepods-pod{}.slice", under(UID_D)));

        assert_eq!(find_pod_cgroup(root, UID_A), Some(a.clone()));
        assert_eq!(find_pod_cgroup(root, &UID_A.to_uppercase()), Some(a));
        assert_eq!(find_pod_cgroup(root, UID_B), Some(b));
        assert_eq!(find_pod_cgroup(root, UID_D), Some(g));
        // A narrower root.
        assert_eq!(
            find_pod_cgroup(&root.join("kubepods/burstable"), UID_C),
            Some(root.join(format!("kubepods/burstable/pod{UID_C}")))
        );
        assert_eq!(find_pod_cgroup(&root.join("kubepods.slice"), UID_C), None);
        // Not there, not a UID, not a directory.
        assert_eq!(find_pod_cgroup(root, UID_E), None);
        for bad in ["", "pod", &under(UID_A), &UID_A[1..], "../../etc"] {
            assert_eq!(find_pod_cgroup(root, bad), None, "{bad:?}");
        }
        assert_eq!(find_pod_cgroup(&root.join("missing"), UID_A), None);
        assert_eq!(find_pod_cgroup(&root.join("system.slice/containerd.service/cgroup.procs"), UID_A), None);
    }

    #[test]
    fn find_pod_cgroup_ignores_symlinks_files_and_depth() {
        let dir = tempfile::tempdir().unwrap();
        let (root, elsewhere) = (dir.path().join("cg"), dir.path().join("elsewhere"));
        fs::create_dir_all(elsewhere.join(format!("pod{UID_B}"))).unwrap();
        fs::create_dir_all(elsewhere.join(format!("pod{UID_C}"))).unwrap();
        fs::create_dir_all(root.join("kubepods")).unwrap();
        // A symlink named like a pod, and a symlinked directory holding one.
        symlink(elsewhere.join(format!("pod{UID_B}")), root.join(format!("kubepods/pod{UID_B}"))).unwrap();
        symlink(&elsewhere, root.join("kubepods/link")).unwrap();
        // A symlink loop.
        symlink(root.join("kubepods"), root.join("kubepods/loop")).unwrap();
        // A regular file named like a pod.
        fs::write(root.join(format!("pod{UID_D}")), "").unwrap();
        // Depth 6 is found, depth 7 is not.
        let six = root.join("1/2/3/4/5").join(format!("pod{UID_A}"));
        fs::create_dir_all(&six).unwrap();
        let seven = root.join("1/2/3/4/5/6").join(format!("pod{UID_E}"));
        fs::create_dir_all(&seven).unwrap();
        // Another pod's directory is not entered.
        fs::create_dir_all(root.join(format!("kubepods/pod{UID_F}/pod{UID_C}"))).unwrap();

        assert_eq!(find_pod_cgroup(&root, UID_A), Some(six));
        assert_eq!(find_pod_cgroup(&root, UID_B), None);
        assert_eq!(find_pod_cgroup(&root, UID_C), None);
        assert_eq!(find_pod_cgroup(&root, UID_D), None);
        assert_eq!(find_pod_cgroup(&root, UID_E), None);
    }

    #[test]
    fn find_pod_cgroup_shallowest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join(format!("a/b/pod{UID_A}"));
        let shallow = dir.path().join(format!("z/pod{UID_A}"));
        fs::create_dir_all(&deep).unwrap();
        fs::create_dir_all(&shallow).unwrap();
        assert_eq!(find_pod_cgroup(dir.path(), UID_A), Some(shallow));
    }
}
