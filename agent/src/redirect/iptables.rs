//! The iptables capture backend, in istio-cni's in-pod shape: every rule lives
//! in the pod's own netns, so the node's tables (and the primary CNI's) are
//! never touched, and deleting the netns deletes the rules with it.
//!
//! Per family, one `iptables-restore --noflush` applies the mangle and nat
//! tables together: declaring `:SLUICE_PRERT - [0:0]` flushes only our chain,
//! and the whole input commits at once, so a pod never runs with half a
//! ruleset. The jumps from the builtin chains are added only when missing,
//! which is what makes enroll idempotent.

use std::{
    collections::BTreeMap,
    fmt,
    process::Command,
    sync::{Mutex, MutexGuard},
};

use anyhow::{bail, Result};
use serde::Serialize;

use super::{
    exec, route, Family, Mode, PodCapture, Redirect, AGENT_MARK, CONNMARK, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    MARK_MASK, OUTBOUND_PORT,
};
use crate::netns::Netns;

/// Our chain in PREROUTING, in both mangle and nat.
pub const PRERT_CHAIN: &str = "SLUICE_PRERT";
/// Our chain in OUTPUT, in both mangle and nat.
pub const OUTPUT_CHAIN: &str = "SLUICE_OUTPUT";
/// (builtin chain, our chain): the jumps, the same in both tables.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", PRERT_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];
const TABLES: [&str; 2] = ["mangle", "nat"];

/// Which iptables implementation writes the rules. Both can be loaded at once
/// and neither sees the other's rules, so the agent must use the one the node
/// already uses, or a CNI's later rules could silently bypass ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

impl Backend {
    /// e.g. `ip6tables-legacy-restore`.
    fn binary(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{base}-{self}-{tool}")
    }
}

/// The installed rules of one pod, for `/config_dump` and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RulesDump {
    /// `iptables-save` text of our chains and the jumps into them, per family.
    pub iptables: BTreeMap<String, String>,
    /// `ip rule` lines that route the connmark to our table, per family.
    pub ip_rules: BTreeMap<String, Vec<String>>,
    /// The routes in our table, per family.
    pub routes: BTreeMap<String, Vec<String>>,
}

pub struct IptablesRedirect {
    backend: Backend,
    /// Enroll looks at the current rules before writing; serializing calls
    /// keeps two enrolls of one pod from both adding the jump.
    lock: Mutex<()>,
}

impl IptablesRedirect {
    pub fn with_backend(backend: Backend) -> Self {
        IptablesRedirect { backend, lock: Mutex::new(()) }
    }

    /// Picks the backend the node already uses, by reading (never writing)
    /// the node's rules in the agent's own netns: nft unless only legacy has
    /// rules. A backend whose tools are missing or fail is not a candidate.
    pub fn detect() -> Result<Self> {
        let mut found = Vec::new();
        let mut errors = Vec::new();
        for backend in [Backend::Nft, Backend::Legacy] {
            match count_node_rules(backend) {
                Ok(n) => found.push((backend, n)),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        let backend = match found.as_slice() {
            [] => bail!("no usable iptables backend: {}", errors.join("; ")),
            [(only, _)] => *only,
            [(_, nft), (legacy, l)] if *nft == 0 && *l > 0 => *legacy,
            [(nft, _), ..] => *nft,
        };
        tracing::info!(%backend, ?found, "iptables backend detected");
        Ok(Self::with_backend(backend))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The current rules of the pod, as the kernel has them.
    pub fn dump(&self, pod: &PodCapture<'_>) -> Result<RulesDump> {
        let mut dump = RulesDump::default();
        for family in Family::present() {
            let key = family.name().to_owned();
            let saved = self.save(pod, family)?;
            dump.iptables.insert(key.clone(), saved.ours());
            dump.ip_rules.insert(key.clone(), route::rules(pod, family)?);
            dump.routes.insert(key, route::routes(pod, family)?);
        }
        Ok(dump)
    }

    /// Like [`dump`](Self::dump) for a netns alone, e.g. from a debug command.
    pub fn dump_netns(&self, netns: &Netns) -> Result<RulesDump> {
        self.dump(&PodCapture { uid: "-", netns, ips: &[], identity: "", cgroup: None, inbound_listeners: &[] })
    }

    fn save(&self, pod: &PodCapture<'_>, family: Family) -> Result<Saved> {
        let bin = self.backend.binary(family, "save");
        Ok(Saved::parse(&exec::check_in(pod, &bin, &[], None)?))
    }

    fn restore(&self, pod: &PodCapture<'_>, family: Family, input: &str) -> Result<()> {
        let bin = self.backend.binary(family, "restore");
        // Legacy takes a node-wide file lock; wait for it rather than fail
        // when another tool holds it for a moment. nft needs no lock.
        let args: &[&str] = match self.backend {
            Backend::Legacy => &["--noflush", "--wait=10"],
            Backend::Nft => &["--noflush"],
        };
        exec::check_in(pod, &bin, args, Some(input)).map(drop)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded state is in the kernel, so a panic elsewhere leaves
        // nothing here to repair.
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Redirect for IptablesRedirect {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn enroll(&self, pod: &PodCapture<'_>) -> Result<()> {
        let _guard = self.lock();
        for family in Family::for_pod(pod.ips) {
            let saved = self.save(pod, family)?;
            self.restore(pod, family, &enroll_input(family, &saved))?;
            route::install(pod, family)?;
        }
        tracing::info!(uid = pod.uid, netns = %pod.netns.path().display(), backend = %self.backend, "capture enrolled");
        Ok(())
    }

    fn unenroll(&self, pod: &PodCapture<'_>) -> Result<()> {
        let _guard = self.lock();
        // Every family, not just the pod's current IPs': the pod may have
        // been enrolled with other IPs, and absent rules cost one save.
        for family in Family::present() {
            let saved = self.save(pod, family)?;
            if let Some(input) = unenroll_input(&saved) {
                self.restore(pod, family, &input)?;
            }
            route::remove(pod, family)?;
        }
        tracing::info!(uid = pod.uid, netns = %pod.netns.path().display(), "capture removed");
        Ok(())
    }
}

/// Counts the rules of one backend on the node (both families).
fn count_node_rules(backend: Backend) -> Result<usize> {
    let mut n = 0;
    for family in [Family::V4, Family::V6] {
        let bin = backend.binary(family, "save");
        let out = exec::output(Command::new(&bin), None)
            .map_err(|e| anyhow::anyhow!("running {bin} in the agent netns: {e}"))?;
        if !out.status.success() {
            bail!("{bin} failed ({}): {}", out.status, out.stderr);
        }
        n += out.stdout.lines().filter(|l| l.starts_with("-A ")).count();
    }
    Ok(n)
}

/// The rules of our chains, in `iptables-save` syntax, as the tools print
/// them back (so a dump compares equal to what was written).
fn chain_rules(family: Family, table: &str) -> Vec<String> {
    let lo = family.loopback();
    let agent = format!("{AGENT_MARK:#x}/{MARK_MASK:#x}");
    let conn = format!("{CONNMARK:#x}/{MARK_MASK:#x}");
    match table {
        // Connections the agent opens (mark 0x539) that come back in over
        // lo, i.e. to the pod's own app with a transparent client source,
        // get the connmark; the app's replies restore it as their mark, and
        // the ip rule routes them back to the agent instead of off-pod.
        "mangle" => vec![
            format!("-A {PRERT_CHAIN} -m mark --mark {agent} -j CONNMARK --set-xmark {conn}"),
            format!(
                "-A {OUTPUT_CHAIN} -m connmark --mark {conn} -j CONNMARK --restore-mark \
                 --nfmask 0xffffffff --ctmask 0xffffffff"
            ),
        ],
        "nat" => vec![
            // Inbound: everything but HBONE and the agent's own traffic.
            format!(
                "-A {PRERT_CHAIN} ! -d {lo} -p tcp -m tcp ! --dport {HBONE_PORT} -m mark ! \
                 --mark {agent} -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}"
            ),
            // Replies of the transparent return path: leave them alone.
            format!("-A {OUTPUT_CHAIN} -p tcp -m mark --mark {conn} -j ACCEPT"),
            // The pod talking to its own IP goes over lo: not outbound.
            format!("-A {OUTPUT_CHAIN} ! -d {lo} -o lo -j ACCEPT"),
            format!(
                "-A {OUTPUT_CHAIN} ! -d {lo} -p tcp -m mark ! --mark {agent} -j REDIRECT \
                 --to-ports {OUTBOUND_PORT}"
            ),
        ],
        _ => unreachable!("unknown table {table}"),
    }
}

/// Restore input that (re)writes our chains and leaves exactly one jump
/// into each: a missing jump is added, extra copies are deleted.
fn enroll_input(family: Family, saved: &Saved) -> String {
    let mut out = String::new();
    for table in TABLES {
        out.push_str(&format!("*{table}\n"));
        for (_, chain) in JUMPS {
            // With --noflush this flushes an existing chain, creates a new one.
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for (builtin, chain) in JUMPS {
            let jump = format!("-A {builtin} -j {chain}");
            match saved.count(table, &jump) {
                0 => out.push_str(&format!("{jump}\n")),
                n => (1..n).for_each(|_| out.push_str(&format!("-D {builtin} -j {chain}\n"))),
            }
        }
        for rule in chain_rules(family, table) {
            out.push_str(&rule);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Restore input that deletes every jump into our chains, then the chains;
/// `None` when nothing of ours is there.
fn unenroll_input(saved: &Saved) -> Option<String> {
    let mut out = String::new();
    for table in TABLES {
        let lines = saved.lines(table);
        let jumps: Vec<&String> =
            lines.iter().filter(|l| l.starts_with("-A ") && !is_ours(chain_of(l)) && targets_ours(l)).collect();
        let chains: Vec<&str> = [PRERT_CHAIN, OUTPUT_CHAIN]
            .into_iter()
            .filter(|c| lines.iter().any(|l| l.starts_with(&format!(":{c} "))))
            .collect();
        if jumps.is_empty() && chains.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for j in jumps {
            out.push_str(&format!("-D{}\n", &j[2..]));
        }
        for c in &chains {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in &chains {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    }
    (!out.is_empty()).then_some(out)
}

fn is_ours(chain: &str) -> bool {
    chain == PRERT_CHAIN || chain == OUTPUT_CHAIN
}

/// The chain an `-A CHAIN ...` line appends to.
fn chain_of(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

/// Whether a rule jumps (`-j`) or goes (`-g`) to one of our chains.
fn targets_ours(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).any(|w| (w[0] == "-j" || w[0] == "-g") && is_ours(w[1]))
}

/// `iptables-save` output, by table, without comments and table markers.
struct Saved {
    tables: BTreeMap<String, Vec<String>>,
}

impl Saved {
    fn parse(text: &str) -> Saved {
        let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut current = None;
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                current = Some(name.to_owned());
                tables.entry(name.to_owned()).or_default();
            } else if line == "COMMIT" || line.starts_with('#') || line.is_empty() {
                continue;
            } else if let Some(t) = &current {
                tables.entry(t.clone()).or_default().push(line.to_owned());
            }
        }
        Saved { tables }
    }

    fn lines(&self, table: &str) -> &[String] {
        self.tables.get(table).map(Vec::as_slice).unwrap_or(&[])
    }

    fn count(&self, table: &str, line: &str) -> usize {
        self.lines(table).iter().filter(|l| *l == line).count()
    }

    /// Our chains and the jumps into them, in `iptables-save` form.
    fn ours(&self) -> String {
        let mut out = String::new();
        for table in TABLES {
            let mine: Vec<&String> = self
                .lines(table)
                .iter()
                .filter(|l| {
                    let decl = l.strip_prefix(':').and_then(|d| d.split_whitespace().next());
                    decl.is_some_and(is_ours) || (l.starts_with("-A ") && (is_ours(chain_of(l)) || targets_ours(l)))
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            out.push_str(&format!("*{table}\n"));
            for l in mine {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-nft-save
*mangle
:PREROUTING ACCEPT [0:0]
:SLUICE_PRERT - [0:0]
-A PREROUTING -j SLUICE_PRERT
-A PREROUTING -j SLUICE_PRERT
-A SLUICE_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p udp -j ACCEPT
COMMIT
";

    #[test]
    fn enroll_adds_missing_jumps_and_drops_duplicates() {
        let input = enroll_input(Family::V4, &Saved::parse(SAVED));
        let mangle = input.split("*nat").next().unwrap();
        assert!(mangle.contains("-D PREROUTING -j SLUICE_PRERT\n"));
        assert!(!mangle.contains("-A PREROUTING"));
        assert!(mangle.contains("-A OUTPUT -j SLUICE_OUTPUT\n"));
        let nat = input.split("*nat").nth(1).unwrap();
        assert!(nat.contains("-A PREROUTING -j SLUICE_PRERT\n"));
        assert!(nat.contains("! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008"));
    }

    #[test]
    fn unenroll_deletes_only_ours() {
        let input = unenroll_input(&Saved::parse(SAVED)).unwrap();
        assert_eq!(
            input,
            "*mangle\n-D PREROUTING -j SLUICE_PRERT\n-D PREROUTING -j SLUICE_PRERT\n\
             -F SLUICE_PRERT\n-X SLUICE_PRERT\nCOMMIT\n"
        );
        assert!(unenroll_input(&Saved::parse("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")).is_none());
    }

    #[test]
    fn v6_uses_v6_loopback() {
        let rules = chain_rules(Family::V6, "nat").join("\n");
        assert!(rules.contains("! -d ::1/128"));
        assert!(!rules.contains("127.0.0.1"));
    }
}
