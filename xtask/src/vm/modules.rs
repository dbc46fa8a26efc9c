//! Kernel modules for the guest: the ones the checks need and their
//! `depends=` closure, decompressed, in an order `insmod` can load them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// What the guest loads before the checks. Everything else the checks use
/// (BPF, cgroup-bpf, sockmap, IPv6, netns, clsact's core) is built into
/// Debian's kernels.
pub const WANTED: &[&str] = &[
    "veth",        // pod and node links of the harness
    "bridge",      // the harness's "wire" between nodes
    "sch_ingress", // clsact qdisc, for tc programs
    "cls_bpf",     // tc BPF classifier
];

/// One module to load: its name and its decompressed bytes.
pub struct Module {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// `name` of a module file (`a-b.ko.xz` -> `a_b`); the kernel treats - and _ alike.
fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| [".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|s| file.strip_suffix(s)))?;
    Some(stem.replace('-', "_"))
}

fn index(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index(&path, out)?;
        } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
            out.entry(name).or_insert(path);
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("read {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .args(["-d", "-c"])
                .arg(path)
                .output()
                .with_context(|| format!("could not start {tool} to decompress {}", path.display()))?;
            if !out.status.success() {
                bail!("{tool} -d {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` field of a module's .modinfo (NUL-separated key=value strings).
fn depends(bytes: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let mut at = 0;
    while let Some(pos) = bytes[at..].windows(key.len()).position(|w| w == key) {
        let start = at + pos;
        if start == 0 || bytes[start - 1] == 0 {
            let value = &bytes[start + key.len()..];
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            return String::from_utf8_lossy(&value[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect();
        }
        at = start + 1;
    }
    Vec::new()
}

/// [`WANTED`] and everything they depend on, dependencies first. A wanted
/// module that is built in (`modules.builtin`) is left out.
pub fn closure(modules_dir: &Path) -> Result<Vec<Module>> {
    let mut files = BTreeMap::new();
    index(&modules_dir.join("kernel"), &mut files)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for want in WANTED {
        visit(&want.replace('-', "_"), &files, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<Module>,
    depth: usize,
) -> Result<()> {
    if depth > 32 {
        bail!("module dependencies nest deeper than 32 at {name}");
    }
    if !seen.insert(name.to_owned()) || builtin.contains(name) {
        return Ok(());
    }
    let path = files.get(name).with_context(|| format!("module {name} is neither built in nor in the package"))?;
    let bytes = read_module(path)?;
    for dep in depends(&bytes) {
        visit(&dep, files, builtin, seen, order, depth + 1)?;
    }
    order.push(Module { name: name.to_owned(), bytes });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_and_names() {
        let info = b"\0license=GPL\0depends=stp,llc\0retpoline=Y\0";
        assert_eq!(depends(info), vec!["stp", "llc"]);
        assert_eq!(depends(b"\0depends=\0name=veth\0"), Vec::<String>::new());
        assert_eq!(module_name("sch_ingress.ko.xz").as_deref(), Some("sch_ingress"));
        assert_eq!(module_name("nf-nat.ko").as_deref(), Some("nf_nat"));
        assert_eq!(module_name("README"), None);
    }
}
