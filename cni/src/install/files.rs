//! File operations with the guarantees install needs: reads that cannot be
//! made to swallow memory, and writes that a reader (the container runtime,
//! loading the config for a new pod) sees either entirely or not at all.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Largest config file read. Real ones are a few KiB; the limit is only
/// there so a hostile or broken file cannot exhaust the container's memory
/// (the install container is limited to 32 MiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Read at most `limit` bytes of `path`; a longer file is `InvalidData`.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {limit} bytes")));
    }
    Ok(buf)
}

/// The temp file beside `path`: hidden, and with an extension (the pid)
/// libcni never loads, so a runtime listing the dir meanwhile ignores it;
/// the pid keeps two installers (old and new pod during an upgrade) apart.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
    Ok(path.with_file_name(format!(".{}.sluice-tmp.{}", name.to_string_lossy(), std::process::id())))
}

/// Replace `path` with `bytes`: temp file in the same dir, fsync, `mode`,
/// rename over, fsync the dir.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_from(path, mode, |f| f.write_all(bytes))
}

fn write_atomic_from(path: &Path, mode: u32, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot write {}: {} is not a directory", path.display(), dir.display());
    }
    let tmp = temp_path(path)?;
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        fill(&mut f)?;
        // The umask may have cut bits from `mode` at creation.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {} (through {})", path.display(), tmp.display()));
    }
    // The rename is done and visible; a dir fsync only makes it durable
    // across a power loss, and some filesystems refuse it. Failing the
    // install over that would misreport a file that is in place.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn mode_of(path: &Path) -> Option<u32> {
    path.metadata().ok().map(|m| m.permissions().mode() & 0o7777)
}

/// Remove `path`; `Ok(false)` when it was not there.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Do the two files hold the same bytes? Streamed: the binary may be
/// larger than the install container's memory limit allows twice.
fn same_bytes(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Put the plugin binary at `dest`, mode 0755, unless the same bytes are
/// already there. `Ok(true)` when it was written.
///
/// Renaming over a running binary is safe: a plugin being executed keeps
/// its inode, the next exec gets the new one.
pub fn copy_binary(src: &Path, dest: &Path) -> Result<bool> {
    let mut from = File::open(src).with_context(|| format!("opening the plugin binary {}", src.display()))?;
    if !from.metadata().with_context(|| format!("{}", src.display()))?.is_file() {
        bail!("the plugin binary {} is not a regular file", src.display());
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("the CNI bin dir {} does not exist", dir.display());
    }
    if dest.symlink_metadata().is_ok_and(|m| m.is_file()) && same_bytes(src, dest).unwrap_or(false) {
        if mode_of(dest) != Some(0o755) {
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", dest.display()))?;
        }
        return Ok(false);
    }
    write_atomic_from(dest, 0o755, |f| io::copy(&mut from, f).map(|_| ()))
        .with_context(|| format!("copying the plugin binary {}", src.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_read_refuses_a_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.conflist");
        std::fs::write(&p, vec![b' '; 11]).unwrap();
        assert_eq!(read_bounded(&p, 11).unwrap().len(), 11);
        let e = read_bounded(&p, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("larger than 10 bytes"));
    }

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.conflist");
        std::fs::write(&p, "old").unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(mode_of(&p), Some(0o600));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.conflist")]);
        let e = write_atomic(&dir.path().join("missing/x.conf"), b"x", 0o644).unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
    }

    #[test]
    fn binary_copy_is_skipped_when_identical() {
        let dir = tempfile::tempdir().unwrap();
        let (src, bin) = (dir.path().join("src"), dir.path().join("bin"));
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(&src, b"\x7fELF one").unwrap();
        let dest = bin.join("sluice-cni");
        assert!(copy_binary(&src, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF one");
        assert_eq!(mode_of(&dest), Some(0o755));
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!copy_binary(&src, &dest).unwrap());
        assert_eq!(mode_of(&dest), Some(0o755));
        std::fs::write(&src, b"\x7fELF two").unwrap();
        assert!(copy_binary(&src, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x7fELF two");
        let e = copy_binary(&src, &dir.path().join("nope/sluice-cni")).unwrap_err();
        assert!(e.to_string().contains("bin dir"), "{e}");
        let e = copy_binary(&dir.path().join("absent"), &dest).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
