//! The bpffs directory that holds Sluice's pinned maps. One directory per
//! agent instance; tests give each run its own so they never share state.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Clone, Debug)]
pub struct PinRoot(PathBuf);

impl PinRoot {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PinRoot(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Creates the directory; its parent must be on bpffs.
    pub fn create(&self) -> Result<()> {
        let parent = self.0.parent().unwrap_or(Path::new("/"));
        ensure_bpffs(parent)?;
        fs::create_dir_all(&self.0).with_context(|| format!("creating the pin directory {}", self.0.display()))
    }

    /// Removes every pin Sluice made and the directory itself.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_dir_all(&self.0) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing pins under {}", self.0.display())),
        }
    }
}

/// Fails with the fix when `dir` is not on a bpf filesystem: pins written
/// elsewhere would silently not be pins.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let st = nix::sys::statfs::statfs(dir).with_context(|| format!("statfs {} (is bpffs mounted?)", dir.display()))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not a bpf filesystem; mount it with `mount -t bpf bpf /sys/fs/bpf` (or run `cargo xtask setup`)",
            dir.display()
        );
    }
    Ok(())
}
