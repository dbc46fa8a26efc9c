//! Kernel modules for the guest: the ones the checks need and their
//! `depends=` closure, decompressed, in an order `insmod` can load them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// What the guest loads before the checks. Everything else the checks use
/// (BPF, cgroup-bpf, sockmap, IPv6, netns, clsact's core, policy routing)
/// is built into Debian's kernels. The guest has no modprobe, so the kernel
/// cannot load a module on demand: whatever a check needs must be here.
pub const WANTED: &[&str] = &[
    "veth",        // pod and node links of the harness
    "bridge",      // the harness's "wire" between nodes
    "sch_ingress", // clsact qdisc, for tc programs
    "cls_bpf",     // tc BPF classifier
    // iptables capture, both backends: the tables, the matches and targets
    // of the in-pod rules (mark, connmark, tcp, REDIRECT) and conntrack/NAT.
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_redir",
    "ip_tables",
    "ip6_tables",
    "iptable_nat",
    "iptable_mangle",
    "ip6table_nat",
    "ip6table_mangle",
    "xt_mark",
    "xt_connmark",
    "xt_tcpudp",
    "xt_comment",
    "xt_REDIRECT",
];

/// Loaded where the kernel has them as modules; newer kernels build them
/// into another module (nft_counter is part of nf_tables from 5.14).
pub const WANTED_IF_PRESENT: &[&str] = &["nft_counter"];

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

/// A field of a module's .modinfo (NUL-separated `key=value` strings).
fn modinfo<'a>(bytes: &'a [u8], key: &str) -> Option<std::borrow::Cow<'a, str>> {
    let key = format!("{key}=");
    let key = key.as_bytes();
    let mut at = 0;
    while let Some(pos) = bytes[at..].windows(key.len()).position(|w| w == key) {
        let start = at + pos;
        if start == 0 || bytes[start - 1] == 0 {
            let value = &bytes[start + key.len()..];
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]));
        }
        at = start + 1;
    }
    None
}

/// `depends=`: modules whose symbols this one uses.
fn depends(bytes: &[u8]) -> Vec<String> {
    modinfo(bytes, "depends")
        .map(|v| v.split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect())
        .unwrap_or_default()
}

/// The `pre:` part of `softdep=`: modules this one asks for at init (e.g.
/// libcrc32c allocates the "crc32c" hash, which without modprobe in the
/// guest must already be loaded).
fn soft_pre(bytes: &[u8]) -> Vec<String> {
    let Some(v) = modinfo(bytes, "softdep") else { return Vec::new() };
    let mut out = Vec::new();
    let mut pre = false;
    for word in v.split_whitespace() {
        match word {
            "pre:" => pre = true,
            "post:" => pre = false,
            w if pre => out.push(w.replace('-', "_")),
            _ => {}
        }
    }
    out
}

/// Soft dependencies name aliases, which only depmod resolves; the ones
/// the wanted modules use, mapped to the module that provides them.
const ALIASES: &[(&str, &str)] = &[("crc32c", "crc32c_generic")];

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
    for want in WANTED_IF_PRESENT.iter().map(|w| w.replace('-', "_")) {
        if files.contains_key(&want) {
            visit(&want, &files, &builtin, &mut seen, &mut order, 0)?;
        }
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
    for soft in soft_pre(&bytes) {
        let soft = ALIASES.iter().find(|(a, _)| *a == soft).map(|(_, m)| m.to_string()).unwrap_or(soft);
        // Soft: an alias this table does not know is left to the kernel.
        if files.contains_key(&soft) {
            visit(&soft, files, builtin, seen, order, depth + 1)?;
        }
    }
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
        assert_eq!(soft_pre(b"\0softdep=pre: crc32c post: foo\0depends=\0"), vec!["crc32c"]);
        assert_eq!(soft_pre(b"\0depends=x\0"), Vec::<String>::new());
        assert_eq!(module_name("sch_ingress.ko.xz").as_deref(), Some("sch_ingress"));
        assert_eq!(module_name("nf-nat.ko").as_deref(), Some("nf_nat"));
        assert_eq!(module_name("README"), None);
    }
}
