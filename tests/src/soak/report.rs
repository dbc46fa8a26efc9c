//! The soak's tables: one row per agent on each path, then the eBPF maps.

use std::fmt::Write as _;

use crate::run::{map_names, Path, PathReport, SoakReport};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// 12345 -> "12,345".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The agents a path goes through: node1's for both, node2's for cross-node.
fn on_path(r: &PathReport) -> usize {
    if r.path == Path::Cross {
        2
    } else {
        1
    }
}

/// "cross-node", or "cross-node (round 2)" with `--rounds`.
fn label(p: &PathReport) -> String {
    if p.round > 1 {
        format!("{} (round {})", p.path.label(), p.round)
    } else {
        p.path.label().into()
    }
}

/// "PASS (16 s)", or "FAIL: VmRSS" naming what did not come back.
fn verdict(settle_s: f64, excess: &[String]) -> String {
    if excess.is_empty() {
        return format!("PASS ({settle_s:.0} s)");
    }
    let what: Vec<&str> = excess.iter().filter_map(|e| e.split(' ').next()).collect();
    format!("FAIL: {}", what.join(", "))
}

pub fn markdown(r: &SoakReport) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| mode | path | agent | held at once | opened/s | short conns | conn/s | peak RSS (MiB) | RSS / held conn (KiB) | VmRSS before / after (MiB) | fds before / held / after | conn map entries before / held / after | back within 10% |"
    );
    let _ = writeln!(t, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for p in &r.paths {
        for a in p.agents.iter().take(on_path(p)) {
            let entries = |s: &crate::probe::Snapshot| s.maps.values().sum::<u64>();
            let maps = if a.before.maps.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{} / {} / {}",
                    thousands(entries(&a.before)),
                    thousands(entries(&a.held)),
                    thousands(entries(&a.after))
                )
            };
            let peak = a.held.hwm_kib.max(a.after.hwm_kib);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {:.0} | {} | {:.0} | {:.1} | {:.1} | {:.1} / {:.1}{} | {} / {} / {} | {} | {} |",
                p.mode,
                label(p),
                a.agent,
                thousands(p.concurrent.ok),
                p.concurrent.per_sec,
                thousands(p.short.ok),
                p.short.per_sec,
                mib(peak),
                a.rss_per_conn_kib,
                mib(a.before.rss_kib),
                mib(a.after.rss_kib),
                a.rss_after_trim_kib.map_or(String::new(), |t| format!(" ({:.1} after malloc_trim)", mib(t))),
                a.before.fds,
                thousands(a.held.fds),
                a.after.fds,
                maps,
                verdict(p.settle_s, &a.excess),
            );
        }
    }
    let ebpf: Vec<&PathReport> =
        r.paths.iter().filter(|p| p.agents.iter().any(|a| !a.before.maps.is_empty())).collect();
    if !ebpf.is_empty() {
        let _ = writeln!(t, "\neBPF map entries, node1's agent: before / all held / right after the short connections / after settling\n");
        let _ = writeln!(t, "| path | map | before | held | after short | after |");
        let _ = writeln!(t, "|---|---|--:|--:|--:|--:|");
        for p in ebpf {
            let a = &p.agents[0];
            for name in map_names(p) {
                let get = |s: &crate::probe::Snapshot| thousands(s.maps.get(&name).copied().unwrap_or(0));
                let _ = writeln!(
                    t,
                    "| {} | {name} | {} | {} | {} | {} |",
                    label(p),
                    get(&a.before),
                    get(&a.held),
                    get(&a.after_short),
                    get(&a.after)
                );
            }
        }
    }
    for p in &r.paths {
        for a in &p.agents {
            if !a.excess.is_empty() {
                let _ = writeln!(t, "\nFAIL {} {} {} agent: {}", p.mode, label(p), a.agent, a.excess.join("; "));
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(200_000), "200,000");
        assert_eq!(super::thousands(1_234_567), "1,234,567");
    }
}
