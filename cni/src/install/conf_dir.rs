//! Which config file the container runtime loads from the CNI config dir,
//! decided the way libcni's users do: `libcni.ConfFiles(dir, [".conf",
//! ".conflist", ".json"])` (directories skipped, extension as Go's
//! `filepath.Ext`), sorted lexically by bytes, first one that loads wins.
//!
//! Files that do not load are skipped, as CRI-O (ocicni), istio-cni and
//! kubelet's old dockershim do, each with the reason. containerd's go-cni
//! instead fails pod networking outright on such a file; installing into
//! the next file is harmless there (no pod starts at all) and right for the
//! others, and a primary caught mid-write by a non-atomic writer is picked
//! again on the next look.
//!
//! A file the runtime would load but sluice must not edit (a symlink, an
//! oversized or non-UTF-8 file, a name that is not UTF-8) is an error, not a
//! skip: installing into the next file would leave the chain the runtime
//! uses without the plugin, silently.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{conflist, files};

/// The extensions libcni's users pass to `ConfFiles`.
pub const CONF_EXTENSIONS: &[&str] = &[".conf", ".conflist", ".json"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `.conf` or `.json`: one plugin, no chain.
    Conf,
    /// `.conflist`: `{name, cniVersion, plugins: [...]}`.
    List,
}

/// A config file that loads, with what was read.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub path: PathBuf,
    /// Exactly the bytes on disk (valid JSON, hence UTF-8).
    pub text: String,
    pub value: Value,
    pub kind: Kind,
    /// Permission bits, kept when the file is rewritten.
    pub mode: u32,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub primary: Option<Candidate>,
    /// Files before the primary that the runtime skips: (name, why).
    pub skipped: Vec<(String, String)>,
}

/// Why a file is not a usable primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The runtime would not load it either.
    Skip(String),
    /// The runtime would load it, but sluice cannot edit it safely.
    Unusable(String),
}

/// Go's `filepath.Ext`: from the last dot of the name on, or empty.
fn extension(name: &OsStr) -> &[u8] {
    let b = name.as_bytes();
    b.iter().rposition(|&c| c == b'.').map_or(&[][..], |i| &b[i..])
}

pub fn kind_of(name: &str) -> Option<Kind> {
    match extension(OsStr::new(name)) {
        b".conflist" => Some(Kind::List),
        b".conf" | b".json" => Some(Kind::Conf),
        _ => None,
    }
}

/// `10-flannel.conf` -> `10-flannel.conflist`.
pub fn list_name(name: &str) -> String {
    let stem = name.rfind('.').map_or(name, |i| &name[..i]);
    format!("{stem}.conflist")
}

/// The names libcni would consider, in the order it tries them. A missing
/// dir has none (libcni treats it the same way).
pub fn candidates(dir: &Path) -> Result<Vec<OsString>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing the CNI config dir {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing the CNI config dir {}", dir.display()))?;
        // As Go's DirEntry.IsDir: the entry itself, a symlink is not a dir
        // (this also leaves our own `.sluice/` out).
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        if CONF_EXTENSIONS.iter().any(|ext| extension(&name) == ext.as_bytes()) {
            names.push(name);
        }
    }
    // Bytewise, as Go's sort.Strings.
    names.sort();
    Ok(names)
}

/// Read and check one file of `dir`.
pub fn load(dir: &Path, name: &OsStr) -> Result<Candidate, Problem> {
    let path = dir.join(name);
    let kind = if extension(name) == b".conflist" { Kind::List } else { Kind::Conf };
    let link = path.symlink_metadata().map_err(|e| Problem::Skip(format!("cannot stat it: {e}")))?;
    let meta = if link.file_type().is_symlink() {
        path.metadata().map_err(|e| Problem::Skip(format!("a symlink whose target cannot be read: {e}")))?
    } else {
        link.clone()
    };
    if !meta.is_file() {
        return Err(Problem::Skip("not a regular file".into()));
    }
    let bytes = files::read_bounded(&path, files::MAX_CONFIG_BYTES).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Problem::Unusable(format!("{e}; refusing to read it")),
        _ => Problem::Skip(format!("cannot read it: {e}")),
    })?;
    let value = conflist::parse(kind, &bytes).map_err(Problem::Skip)?;
    if link.file_type().is_symlink() {
        let target = std::fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default();
        return Err(Problem::Unusable(format!(
            "a symlink (to {target}); sluice edits only regular files, and replacing the link would cut it from its target"
        )));
    }
    let Some(name) = name.to_str() else {
        return Err(Problem::Unusable("its name is not UTF-8; sluice cannot record it to restore it".into()));
    };
    // Go's JSON decoder accepts invalid UTF-8 inside strings; the original
    // must be kept exactly, so such a file is not ours to rewrite.
    let text = String::from_utf8(bytes)
        .map_err(|_| Problem::Unusable("not valid UTF-8; sluice could not restore it byte for byte".into()))?;
    Ok(Candidate { name: name.to_owned(), path, text, value, kind, mode: meta.permissions().mode() & 0o7777 })
}

/// The primary config of `dir`, and what was skipped before it. A file the
/// runtime would load but sluice cannot edit is an error naming it.
pub fn scan(dir: &Path) -> Result<Scan> {
    let mut scan = Scan::default();
    for name in candidates(dir)? {
        match load(dir, &name) {
            Ok(c) => {
                scan.primary = Some(c);
                break;
            }
            Err(Problem::Skip(why)) => scan.skipped.push((name.to_string_lossy().into_owned(), why)),
            Err(Problem::Unusable(why)) => bail!("{}: {why}", dir.join(&name).display()),
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_is_gos_filepath_ext() {
        assert_eq!(extension(OsStr::new("10-calico.conflist")), b".conflist");
        assert_eq!(extension(OsStr::new(".conf")), b".conf");
        assert_eq!(extension(OsStr::new("a.conf.bak")), b".bak");
        assert_eq!(extension(OsStr::new(".x.conflist.sluice-tmp.12")), b".12");
        assert_eq!(extension(OsStr::new("noext")), b"");
    }

    #[test]
    fn list_name_replaces_the_extension() {
        assert_eq!(list_name("10-flannel.conf"), "10-flannel.conflist");
        assert_eq!(list_name("87-podman.json"), "87-podman.conflist");
    }
}
