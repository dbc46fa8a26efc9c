//! Fetching and unpacking the pinned kernel packages into a cache that
//! survives between runs (`~/.cache/sluice/kernels`, or
//! `$SLUICE_KERNEL_CACHE`). apt reads a private list of sources, lists and
//! cache under that directory; the system's apt sources are never touched.
//! A package is downloaded only when the cache lacks it, and apt checks it
//! against the signed index as it downloads.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::kernels::{Kernel, KEYRING, SUITES};
use crate::{setup::nix_is_root, step};

/// A kernel package unpacked in the cache.
pub struct Unpacked {
    /// `uname -r` of the kernel, e.g. `6.1.0-50-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` (or `usr/lib/modules/<release>` from trixie on).
    pub modules: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLUICE_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d),
        (_, Some(h)) if !h.is_empty() => PathBuf::from(h).join(".cache"),
        // No home (some CI shells): keep the cache beside the build.
        _ => return crate::target_dir().join("kernel-cache"),
    };
    base.join("sluice/kernels")
}

/// The private apt configuration: each invocation gets these options.
struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    fn new(cache: &Path) -> Result<Apt> {
        let dir = cache.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("create {}", dir.join(sub).display()))?;
        }
        let list: String = SUITES.iter().map(|s| format!("deb [signed-by={KEYRING}] {s}\n")).collect();
        let file = dir.join("sources.list");
        if std::fs::read_to_string(&file).ok().as_deref() != Some(list.as_str()) {
            std::fs::write(&file, list).with_context(|| format!("write {}", file.display()))?;
        }
        Ok(Apt { dir, updated: false })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let d = &self.dir;
        cmd.arg("-o").arg(format!("Dir::Etc::sourcelist={}", d.join("sources.list").display()));
        cmd.args(["-o", "Dir::Etc::sourceparts=-"]);
        cmd.arg("-o").arg(format!("Dir::State::Lists={}", d.join("lists").display()));
        cmd.arg("-o").arg(format!("Dir::Cache={}", d.join("cache").display()));
        cmd.args(["-o", "Acquire::Languages=none"]);
        if nix_is_root() {
            // apt's _apt user cannot write into root's home; download as root.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        step("vm-test: reading the Debian suites of the matrix (private apt list)");
        run_captured("apt-get update (private list)", self.command("apt-get").args(["update", "-q"]))?;
        self.updated = true;
        Ok(())
    }
}

/// Runs `cmd`; on failure the error carries its stderr and stdout.
fn run_captured(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            if stdout.trim().is_empty() { String::new() } else { format!("\n{}", stdout.trim_end()) }
        );
    }
    Ok(stdout)
}

/// The fetcher for one run: apt is updated at most once, and only when a
/// package has to be downloaded.
pub struct Fetcher {
    cache: PathBuf,
    apt: Option<Apt>,
}

impl Fetcher {
    pub fn new() -> Result<Fetcher> {
        let cache = cache_dir();
        std::fs::create_dir_all(&cache).with_context(|| format!("create the kernel cache {}", cache.display()))?;
        Ok(Fetcher { cache, apt: None })
    }

    /// The unpacked kernel, downloading and unpacking it first if the cache lacks it.
    pub fn ensure(&mut self, k: &Kernel) -> Result<Unpacked> {
        let dir = self.cache.join(format!("{}_{}", k.package, k.version));
        let stamp = dir.join(".sluice-complete");
        if !stamp.exists() {
            let deb = self.download(k)?;
            step(&format!("vm-test: unpacking {}", deb.display()));
            let partial = self.cache.join(format!(".{}_{}.partial-{}", k.package, k.version, std::process::id()));
            let _ = std::fs::remove_dir_all(&partial);
            run_captured("dpkg -x", Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&partial, &dir)
                .with_context(|| format!("rename {} to {}", partial.display(), dir.display()))?;
            std::fs::write(&stamp, format!("{}={}\n", k.package, k.version))?;
        }
        locate(&dir)
            .with_context(|| format!("kernel package {}={} unpacked in {}", k.package, k.version, dir.display()))
    }

    /// The .deb of `k` in the cache, downloading it if it is not there.
    fn download(&mut self, k: &Kernel) -> Result<PathBuf> {
        let debs = self.cache.join("debs");
        std::fs::create_dir_all(&debs)?;
        // apt names the file <package>_<version with ':' as %3a>_<arch>.deb.
        let file = debs.join(format!("{}_{}_amd64.deb", k.package, k.version.replace(':', "%3a")));
        if file.exists() {
            return Ok(file);
        }
        if self.apt.is_none() {
            self.apt = Some(Apt::new(&self.cache)?);
        }
        let apt = self.apt.as_mut().expect("just set");
        apt.update().context("cannot read the Debian suites, so the kernels cannot be downloaded")?;
        step(&format!("vm-test: downloading {}={} ({})", k.package, k.version, k.suite));
        let spec = format!("{}={}", k.package, k.version);
        run_captured(
            &format!("apt-get download {spec}"),
            apt.command("apt-get").current_dir(&debs).args(["download", "-q", &spec]),
        )
        .with_context(|| {
            format!(
                "kernel {} is pinned to {spec} from {}, and it could not be downloaded; if the suite dropped \
                     that version, move the pin in xtask/src/vm/kernels.rs (README: Supported kernels)",
                k.label, k.suite
            )
        })?;
        if !file.exists() {
            bail!("apt-get download {spec} succeeded but {} is not there", file.display());
        }
        Ok(file)
    }
}

/// vmlinuz and the modules directory of an unpacked kernel package.
fn locate(root: &Path) -> Result<Unpacked> {
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .with_context(|| format!("list {}", boot.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz.file_name().unwrap().to_str().unwrap().trim_start_matches("vmlinuz-").to_owned();
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules/{release} or usr/lib/modules/{release}"))?;
    Ok(Unpacked { release, vmlinuz, modules })
}
