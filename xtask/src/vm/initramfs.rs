//! The guest's root: a gzip'd newc cpio that the kernel unpacks into RAM.
//! It is built in two parts and concatenated (the kernel reads one archive
//! after the other): a common part with busybox, the host tools, Sluice's
//! binaries, the test executables and /init; and a per-kernel part with that
//! kernel's modules and the order to load them in.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::modules::Module;

/// Where things live in the guest.
pub const GUEST_SLUICE: &str = "/sluice/bin/sluice";
pub const GUEST_PEER: &str = "/sluice/bin/sluice-peer";
pub const GUEST_TESTS: &str = "/sluice/tests";
const MODULE_LIST: &str = "etc/sluice-vm/modules";

/// Host tools copied into /usr/sbin with their libraries, each with the
/// other names it answers to (multi-call binaries); busybox provides the
/// rest (sh, mount, insmod, sysctl, timeout, dd, poweroff, ...).
pub const HOST_TOOLS: &[(&str, &[&str])] = &[
    ("ip", &[]),
    ("tc", &[]),
    ("bpftool", &[]),
    ("curl", &[]), // the harness reads the agents' readiness and metrics with it
    (
        "xtables-nft-multi",
        &[
            "iptables-nft",
            "iptables-nft-save",
            "iptables-nft-restore",
            "ip6tables-nft",
            "ip6tables-nft-save",
            "ip6tables-nft-restore",
            // Debian's default alternative for the plain names is nft.
            "iptables",
            "iptables-save",
            "iptables-restore",
            "ip6tables",
            "ip6tables-save",
            "ip6tables-restore",
        ],
    ),
    (
        "xtables-legacy-multi",
        &[
            "iptables-legacy",
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "ip6tables-legacy",
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
        ],
    ),
];

/// Plugins the host tools dlopen (so `ldd` does not list them), copied whole
/// with their own libraries: iptables' matches and targets.
const HOST_PLUGIN_DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu/xtables"];

/// Host files the tools read: iptables-save names protocols through
/// /etc/protocols (without it `-p tcp` comes out as `-p 6`).
const HOST_FILES: &[&str] = &["/etc/protocols", "/etc/services", "/etc/ethertypes"];

/// One check as the guest runs it.
pub struct GuestCheck {
    pub name: String,
    pub timeout_secs: u32,
    pub argv: Vec<String>,
}

/// Everything that goes into the common part.
pub struct Contents<'a> {
    pub sluice: &'a Path,
    pub peer: &'a Path,
    /// (file name in the guest's [`GUEST_TESTS`], host executable)
    pub tests: Vec<(String, PathBuf)>,
    pub checks: &'a [GuestCheck],
}

/// Finds a program on PATH (plus the sbin directories, which a non-root PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Builds the common part into `work/common.cpio.gz`.
pub fn build_common(work: &Path, c: &Contents<'_>) -> Result<PathBuf> {
    let root = work.join("common");
    let _ = std::fs::remove_dir_all(&root);
    for dir in ["bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "root", "etc/sluice-vm", "lib/modules"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    symlink("/run", root.join("var/run").tap_parent()?).context("symlink /var/run")?;

    let mut libs = BTreeSet::new();
    let busybox = which("busybox").context("busybox is not installed (apt-get install busybox-static)")?;
    copy_elf(&busybox, &root.join("bin/busybox"), false, &mut libs)?;
    let mut taken: BTreeSet<String> = BTreeSet::from(["busybox".to_owned()]);
    for (tool, aliases) in HOST_TOOLS {
        let host = which(tool).with_context(|| format!("{tool} is not installed (cargo xtask setup installs it)"))?;
        copy_elf(&host, &root.join("usr/sbin").join(tool), false, &mut libs)?;
        taken.insert(tool.to_string());
        for alias in *aliases {
            symlink(tool, root.join("usr/sbin").join(alias))?;
            taken.insert(alias.to_string());
        }
    }
    for dir in HOST_PLUGIN_DIRS.iter().map(Path::new).filter(|d| d.is_dir()) {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                copy_elf(&path, &guest(&root, &path.to_string_lossy()), false, &mut libs)?;
            }
        }
    }
    for file in HOST_FILES.iter().map(Path::new).filter(|f| f.is_file()) {
        std::fs::copy(file, guest(&root, &file.to_string_lossy()))?;
    }
    let applets = Command::new(&busybox).arg("--list").output().context("busybox --list")?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines().map(str::trim).filter(|a| !a.is_empty()) {
        if taken.insert(applet.to_owned()) {
            symlink("busybox", root.join("bin").join(applet))?;
        }
    }
    // Sluice's binaries and the tests are big debug builds; their debug info
    // is not needed in the guest, and a small archive boots faster.
    copy_elf(c.sluice, &guest(&root, GUEST_SLUICE), true, &mut libs)?;
    copy_elf(c.peer, &guest(&root, GUEST_PEER), true, &mut libs)?;
    for (name, exe) in &c.tests {
        copy_elf(exe, &guest(&root, &format!("{GUEST_TESTS}/{name}")), true, &mut libs)?;
    }
    for lib in &libs {
        let dest = guest(&root, &lib.to_string_lossy());
        if !dest.exists() {
            std::fs::create_dir_all(dest.parent().unwrap())?;
            // Follows the symlink: the guest gets the file under the name ldd printed.
            std::fs::copy(lib, &dest).with_context(|| format!("copy library {}", lib.display()))?;
        }
    }
    write_exec(&root.join("init"), &init_script(c.checks))?;
    let out = work.join("common.cpio.gz");
    cpio(&root, &out)?;
    Ok(out)
}

/// Builds the per-kernel part (modules and their load order) into `work/modules-<label>.cpio.gz`.
pub fn build_modules(work: &Path, label: &str, release: &str, modules: &[Module]) -> Result<PathBuf> {
    let root = work.join(format!("modules-{label}"));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("lib/modules").join(release);
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(root.join("etc/sluice-vm"))?;
    let mut list = String::new();
    for m in modules {
        std::fs::write(dir.join(format!("{}.ko", m.name)), &m.bytes)?;
        writeln!(list, "/lib/modules/{release}/{}.ko", m.name)?;
    }
    std::fs::write(root.join(MODULE_LIST), list)?;
    let out = work.join(format!("modules-{label}.cpio.gz"));
    cpio(&root, &out)?;
    Ok(out)
}

/// `common` followed by `modules`: the initrd of one kernel.
pub fn concat(parts: &[&Path], out: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend(std::fs::read(p).with_context(|| format!("read {}", p.display()))?);
    }
    std::fs::write(out, bytes).with_context(|| format!("write {}", out.display()))
}

trait TapParent {
    fn tap_parent(self) -> Result<PathBuf>;
}

impl TapParent for PathBuf {
    /// Creates the parent directory, returns the path.
    fn tap_parent(self) -> Result<PathBuf> {
        std::fs::create_dir_all(self.parent().context("path has no parent")?)?;
        Ok(self)
    }
}

fn guest(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Copies an executable (stripping debug info when asked) and adds the
/// libraries `ldd` lists for it, loader included, to `libs`.
fn copy_elf(src: &Path, dest: &Path, strip: bool, libs: &mut BTreeSet<PathBuf>) -> Result<()> {
    std::fs::create_dir_all(dest.parent().unwrap())?;
    let stripped = strip
        && Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(dest)
            .arg(src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !stripped {
        std::fs::copy(src, dest).with_context(|| format!("copy {} to {}", src.display(), dest.display()))?;
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))?;
    let out = Command::new("ldd").arg(src).output().context("could not start ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static executable: "not a dynamic executable".
        return Ok(());
    }
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: ldd cannot find {line}", src.display());
        }
    }
    Ok(())
}

/// Packs `root` as a gzip'd newc cpio, entries owned by root.
fn cpio(root: &Path, out: &Path) -> Result<()> {
    let script = r#"set -euo pipefail
cd "$1"
find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -n -6 > "$2""#;
    let status = Command::new("bash")
        .args(["-c", script, "cpio"])
        .arg(root)
        .arg(out)
        .status()
        .context("could not start bash for cpio | gzip")?;
    if !status.success() {
        bail!("packing {} into {} failed ({status}); is cpio installed?", root.display(), out.display());
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=,:+".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The guest's PID 1. It reports on the console, one framed log and one
/// `SLUICE-CHECK <name> pass|fail rc=<n>` line per check, then writes its
/// status to the isa-debug-exit port (qemu exits with `(status << 1) | 1`):
/// 0 all checks exited 0, 1 some check failed, 2 the guest could not be set up.
fn init_script(checks: &[GuestCheck]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test` (xtask/src/vm/initramfs.rs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
export NO_COLOR=1 SLUICE_BIN=/sluice/bin/sluice SLUICE_PEER_BIN=/sluice/bin/sluice-peer SLUICE_REQUIRE_ROOT=1

leave() {
    # isa-debug-exit at 0xf4 (244): qemu exits with ($1 << 1) | 1.
    printf "\\$(printf %03o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
    poweroff -f
    while :; do sleep 60; done
}
setup_failed() {
    echo "SLUICE-SETUP fail $*"
    leave 2
}

mount -t devtmpfs devtmpfs /dev || leave 2
# The kernel found no /dev/console in the archive: take the console now.
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc || setup_failed "mount proc"
mount -t sysfs sysfs /sys || setup_failed "mount sysfs"
mount -t bpf bpf /sys/fs/bpf || setup_failed "mount bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || setup_failed "mount cgroup2"
mount -t tmpfs tmpfs /run || setup_failed "mount /run"
mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns || setup_failed "mount /run/netns"
mount -t tmpfs tmpfs /tmp || setup_failed "mount /tmp"
# Kernel messages from here on would tear the check logs apart.
dmesg -n 1
echo "SLUICE-VM kernel $(uname -r)"
while read -r m; do
    insmod "$m" || setup_failed "insmod $m"
done < /etc/sluice-vm/modules
ip link set lo up || setup_failed "ip link set lo up"
echo "SLUICE-SETUP ok"

status=0
check() {
    name=$1; limit=$2; shift 2
    echo "SLUICE-LOG-BEGIN $name"
    start=$(cut -d. -f1 /proc/uptime)
    timeout -s KILL "$limit" "$@" </dev/null 2>&1
    rc=$?
    secs=$(( $(cut -d. -f1 /proc/uptime) - start ))
    echo
    echo "SLUICE-LOG-END $name"
    if [ "$rc" -eq 0 ]; then
        echo "SLUICE-CHECK $name pass rc=0 secs=$secs"
    else
        status=1
        echo "SLUICE-CHECK $name fail rc=$rc secs=$secs"
    fi
}

"#,
    );
    for c in checks {
        let argv: Vec<String> = c.argv.iter().map(|a| shell_quote(a)).collect();
        writeln!(s, "check {} {} {}", shell_quote(&c.name), c.timeout_secs, argv.join(" ")).unwrap();
    }
    s.push_str("\necho \"SLUICE-DONE status=$status\"\nleave \"$status\"\n");
    s
}
