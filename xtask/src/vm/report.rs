//! Turning a kernel's console into table cells: parse the guest's lines,
//! hold each check against what that kernel is expected to do, and render
//! the matrix.

use std::{fmt::Write as _, path::Path, time::Duration};

use super::{
    checks::{Check, Expect, Run, PROBE},
    kernels::Kernel,
    qemu::Boot,
};

pub enum KernelResult {
    /// Fetching or packing failed, or qemu did not start.
    NotBooted(String),
    /// qemu ran; with the timeout it was given.
    Booted(Boot, Duration),
}

#[derive(PartialEq)]
pub enum State {
    /// The check's test target or subcommand is not in this tree: a failure,
    /// never "not applicable" (a landed feature must be checked).
    Missing,
    Pass,
    /// Failed the way the check list says this kernel fails.
    ExpectedFail,
    /// Failed although it should pass, or failed some other way than expected.
    Fail,
    /// Passed although the check list says it fails: the entry is stale.
    UnexpectedPass,
    /// The guest never reported it (boot failed, hang, panic).
    NoResult,
}

pub struct Cell {
    pub state: State,
    pub secs: Option<u64>,
    /// One line saying why, for failures and expected failures.
    pub detail: Option<String>,
    /// What the check printed in the guest.
    pub log: String,
}

impl Cell {
    fn ok(&self) -> bool {
        matches!(self.state, State::Pass | State::ExpectedFail)
    }
}

pub struct Row {
    pub kernel: &'static Kernel,
    /// `uname -r` as the guest printed it.
    pub release: Option<String>,
    /// Why the kernel as a whole failed: not fetched, timeout, panic, setup.
    pub problem: Option<String>,
    pub cells: Vec<Cell>,
    pub mode: String,
    pub elapsed: Option<Duration>,
    pub console: String,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.cells.iter().all(Cell::ok)
    }
}

/// Lines between `SLUICE-LOG-BEGIN name` and `SLUICE-LOG-END name`.
fn check_log(console: &str, name: &str) -> String {
    let begin = format!("SLUICE-LOG-BEGIN {name}");
    let end = format!("SLUICE-LOG-END {name}");
    let mut inside = false;
    let mut out = String::new();
    for line in console.lines() {
        if line == begin {
            inside = true;
        } else if line == end {
            break;
        } else if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// (passed, secs) from `SLUICE-CHECK <name> pass|fail rc=N secs=S`.
fn check_line(console: &str, name: &str) -> Option<(bool, Option<i32>, Option<u64>)> {
    let prefix = format!("SLUICE-CHECK {name} ");
    let line = console.lines().find_map(|l| l.strip_prefix(&prefix))?;
    let mut words = line.split_whitespace();
    let passed = words.next()? == "pass";
    let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key));
    Some((passed, field("rc=").and_then(|v| v.parse().ok()), field("secs=").and_then(|v| v.parse().ok())))
}

/// libtest's summary: `test result: ok. N passed; M failed; ...`.
fn libtest_passed(log: &str) -> Option<(bool, u64)> {
    let line = log.lines().find(|l| l.starts_with("test result: "))?;
    let ok = line.starts_with("test result: ok.");
    let passed = line.split(". ").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((ok, passed))
}

/// The line that best says why a check failed.
fn key_line(log: &str, signature: Option<&str>) -> Option<String> {
    let pick = |l: &str| {
        let l = l.trim();
        Some(if l.chars().count() > 220 {
            format!("{}…", l.chars().take(220).collect::<String>())
        } else {
            l.to_owned()
        })
    };
    if let Some(sig) = signature {
        if let Some(l) = log.lines().find(|l| l.contains(sig)) {
            return pick(l);
        }
    }
    let markers = ["Error:", "error:", "panicked at", "Caused by", "failed", "FAILED"];
    log.lines()
        .find(|l| markers.iter().any(|m| l.contains(m)))
        .and_then(pick)
        .or_else(|| log.lines().last().and_then(pick))
}

/// The mode `sluice probe` chose: from a JSON `"mode"` field, a `mode: X`
/// / `mode=X` line, or the one of ebpf/iptables it names.
pub fn parse_mode(log: &str) -> Option<String> {
    for line in log.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) {
            if let Some(m) = v["mode"].as_str() {
                return Some(m.to_owned());
            }
        }
    }
    for line in log.lines() {
        let lower = line.to_ascii_lowercase();
        // `sluice probe` ends with "--redirect auto would choose: ebpf".
        if let Some((pos, key)) = ["choose", "mode"].iter().find_map(|k| lower.find(k).map(|p| (p, k.len()))) {
            let rest =
                lower[pos + key..].trim_start_matches(|c: char| c == ':' || c == '=' || c == '"' || c.is_whitespace());
            let word: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if word == "ebpf" || word == "iptables" {
                return Some(word);
            }
        }
    }
    let lower = log.to_ascii_lowercase();
    match (lower.contains("ebpf"), lower.contains("iptables")) {
        (true, false) => Some("ebpf".into()),
        (false, true) => Some("iptables".into()),
        _ => None,
    }
}

pub fn evaluate(kernel: &'static Kernel, result: KernelResult, checks: &[Check], missing: &[(&str, String)]) -> Row {
    let (console, problem, elapsed) = match result {
        KernelResult::NotBooted(why) => (String::new(), Some(why), None),
        KernelResult::Booted(boot, timeout) => {
            let c = &boot.console;
            let setup_fail = c.lines().find_map(|l| l.strip_prefix("SLUICE-SETUP fail ")).map(str::to_owned);
            let done = c.lines().any(|l| l.starts_with("SLUICE-DONE "));
            let problem = match boot.status {
                None => Some(format!("no power-off within {} s: the guest hung (timeout)", timeout.as_secs())),
                Some(0) => Some("qemu exited without an exit code: kernel panic (panic=-1) or triple fault".into()),
                Some(5) => Some(format!("the guest could not be set up: {}", setup_fail.unwrap_or_default())),
                Some(1 | 3) if done => None,
                Some(1 | 3) => Some("the guest exited before all checks reported".into()),
                Some(s) => Some(format!("qemu failed with status {s}")),
            };
            (boot.console, problem, Some(boot.elapsed))
        }
    };
    let release = console.lines().find_map(|l| l.strip_prefix("SLUICE-VM kernel ")).map(|s| s.trim().to_owned());
    let mut cells = Vec::new();
    for check in checks {
        if let Some((_, why)) = missing.iter().find(|(n, _)| *n == check.name) {
            cells.push(Cell { state: State::Missing, secs: None, detail: Some(why.clone()), log: String::new() });
            continue;
        }
        let log = check_log(&console, check.name);
        let Some((mut passed, rc, secs)) = check_line(&console, check.name) else {
            cells.push(Cell { state: State::NoResult, secs: None, detail: None, log });
            continue;
        };
        let mut detail = None;
        if passed && matches!(check.run, Run::Test { .. }) {
            // rc 0 alone is not enough: a test that skipped or ran nothing also exits 0.
            match libtest_passed(&log) {
                Some((true, n)) if n > 0 && !log.lines().any(|l| l.starts_with("SKIPPED: ")) => {}
                other => {
                    passed = false;
                    detail =
                        Some(format!("exit 0 but libtest summary {other:?} or a SKIPPED line: nothing was proved"));
                }
            }
        }
        let state = match (check.expect_on(kernel.label), passed) {
            (Expect::Pass, true) => State::Pass,
            (Expect::Pass, false) => {
                detail = detail.or_else(|| key_line(&log, None)).map(|d| format!("rc={} {d}", rc.unwrap_or(-1)));
                State::Fail
            }
            (Expect::Fail { signature, why }, false) => {
                if log.contains(signature) {
                    detail = Some(format!("{why}: `{}`", key_line(&log, Some(signature)).unwrap_or_default()));
                    State::ExpectedFail
                } else {
                    detail = Some(format!(
                        "expected to fail with `{signature}` ({why}) but failed otherwise: {}",
                        key_line(&log, None).unwrap_or_default()
                    ));
                    State::Fail
                }
            }
            (Expect::Fail { why, .. }, true) => {
                detail = Some(format!(
                    "passed, but the check list expects this kernel to fail ({why}); update xtask/src/vm/checks.rs"
                ));
                State::UnexpectedPass
            }
        };
        cells.push(Cell { state, secs, detail, log });
    }
    let probe = checks.iter().position(|c| c.name == PROBE);
    let mode = match probe.map(|i| &cells[i]) {
        None | Some(Cell { state: State::Missing | State::NoResult, .. }) => "?".to_owned(),
        Some(cell) => parse_mode(&cell.log).unwrap_or_else(|| "?".into()),
    };
    Row { kernel, release, problem, cells, mode, elapsed, console }
}

fn cell_text(cell: &Cell, note: Option<usize>) -> String {
    let secs = cell.secs.map(|s| format!(" ({s} s)")).unwrap_or_default();
    let note = note.map(|n| format!(" [{n}]")).unwrap_or_default();
    match cell.state {
        State::Missing => format!("**MISSING**{note}"),
        State::Pass => format!("pass{secs}"),
        State::ExpectedFail => format!("fail, expected{note}{secs}"),
        State::Fail => format!("**FAIL**{note}{secs}"),
        State::UnexpectedPass => format!("**PASS, expected fail**{note}{secs}"),
        State::NoResult => format!("**no result**{note}"),
    }
}

/// The matrix as Markdown: the table, then numbered notes for every cell
/// that is not a plain pass, then which checks are missing and why.
pub fn markdown(rows: &[Row], checks: &[Check], missing: &[(&str, String)], commit: &str) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "| kernel | Debian package | mode |{} time |",
        checks.iter().map(|c| format!(" {} |", c.column)).collect::<String>()
    )
    .unwrap();
    writeln!(s, "|---|---|---|{}---|", "---|".repeat(checks.len())).unwrap();
    let mut notes: Vec<String> = Vec::new();
    let mut note = |text: String| match notes.iter().position(|n| *n == text) {
        Some(i) => i + 1,
        None => {
            notes.push(text);
            notes.len()
        }
    };
    for row in rows {
        let k = row.kernel;
        let release = row.release.as_deref().map(|r| format!(" (`{r}`)")).unwrap_or_default();
        let time = row.elapsed.map(|e| format!("{:.0} s", e.as_secs_f64())).unwrap_or_else(|| "-".into());
        // A kernel that failed as a whole: its note is on the kernel and on every cell without a result.
        let problem = row.problem.as_ref().map(|p| note(format!("{}: **{}**", k.label, p.trim().replace('\n', " — "))));
        let flag = problem.map(|n| format!(" **FAILED** [{n}]")).unwrap_or_default();
        let mut line =
            format!("| {}{release}{flag} | `{}` {} ({}) | {} |", k.label, k.package, k.version, k.suite, row.mode);
        for cell in &row.cells {
            let n = match (&cell.state, &cell.detail) {
                (State::NoResult, _) => problem,
                (State::Pass, _) | (_, None) => None,
                (_, Some(d)) => Some(note(format!("{}: {d}", k.label))),
            };
            write!(line, " {} |", cell_text(cell, n)).unwrap();
        }
        writeln!(s, "{line} {time} |").unwrap();
    }
    writeln!(s).unwrap();
    for (i, n) in notes.iter().enumerate() {
        writeln!(s, "[{}] {n}\n", i + 1).unwrap();
    }
    for (name, why) in missing {
        let column = checks.iter().find(|c| c.name == *name).map(|c| c.column).unwrap_or(name);
        writeln!(s, "- **MISSING** *{column}* (a failure): {why}").unwrap();
    }
    writeln!(
        s,
        "\n`cargo xtask vm-test` at {commit}: qemu TCG, 1 vCPU, 1 GiB; time is boot to power-off, (N s) one check."
    )
    .unwrap();
    s
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes each check's log to `dir/<check>.log` and prints, for whatever
/// went wrong, the end of the relevant log.
pub fn print_problems(row: &Row, checks: &[Check], dir: &Path) {
    let _ = std::fs::create_dir_all(dir);
    for (check, cell) in checks.iter().zip(&row.cells) {
        if !cell.log.is_empty() {
            let _ = std::fs::write(dir.join(format!("{}.log", check.name)), &cell.log);
        }
    }
    let label = row.kernel.label;
    if let Some(p) = &row.problem {
        eprintln!("\n==> vm-test {label}: {p}");
        if !row.console.is_empty() {
            eprintln!(
                "--- last console lines ({}) ---\n{}\n---",
                dir.join("console.log").display(),
                tail(&row.console, 60)
            );
        }
    }
    for (check, cell) in checks.iter().zip(&row.cells) {
        if !cell.ok() && cell.state != State::NoResult {
            eprintln!("\n==> vm-test {label} {}: {}", check.name, cell.detail.as_deref().unwrap_or("failed"));
            eprintln!(
                "--- end of its output ({}) ---\n{}\n---",
                dir.join(format!("{}.log", check.name)).display(),
                tail(&cell.log, 40)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "[ 1.0] boot\nSLUICE-VM kernel 6.1.0-50-amd64\nSLUICE-LOG-BEGIN t\n\nrunning 1 test\n\
        test x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored\n\nSLUICE-LOG-END t\n\
        SLUICE-CHECK t pass rc=0 secs=7\nSLUICE-CHECK u fail rc=101 secs=3\n";

    #[test]
    fn reads_the_guest_lines() {
        assert_eq!(check_line(CONSOLE, "t"), Some((true, Some(0), Some(7))));
        assert_eq!(check_line(CONSOLE, "u"), Some((false, Some(101), Some(3))));
        assert_eq!(check_line(CONSOLE, "v"), None);
        let log = check_log(CONSOLE, "t");
        assert!(log.contains("test x ... ok") && !log.contains("SLUICE"));
        assert_eq!(libtest_passed(&log), Some((true, 1)));
        assert_eq!(libtest_passed("test result: FAILED. 0 passed; 2 failed;"), Some((false, 0)));
        assert_eq!(libtest_passed("nothing"), None);
    }

    #[test]
    fn finds_the_mode_in_any_shape() {
        assert_eq!(parse_mode("{\"mode\":\"ebpf\",\"kernel\":\"6.1\"}").as_deref(), Some("ebpf"));
        assert_eq!(
            parse_mode("kernel 5.10\nmode: iptables (sock_ops lacks bpf_get_netns_cookie)").as_deref(),
            Some("iptables")
        );
        assert_eq!(parse_mode("Redirect mode = eBPF").as_deref(), Some("ebpf"));
        let probe = "INFO sluice::bpf: eBPF datapath loaded\nkernel 5.10.0-32-amd64\n\
                     load sluice programs (verifier) NO everything verifier rejected sluice_sockops\n\
                     --redirect auto would choose: iptables\n";
        assert_eq!(parse_mode(probe).as_deref(), Some("iptables"));
        assert_eq!(parse_mode("cgroup/connect4: ok\nsk_assign: ok\nusing ebpf").as_deref(), Some("ebpf"));
        assert_eq!(parse_mode("nothing useful"), None);
    }

    /// A kernel that booted and reported `console` (exit 1: all checks ran).
    fn booted(console: &str) -> KernelResult {
        let boot = Boot {
            status: Some(1),
            elapsed: Duration::from_secs(9),
            console: format!("{console}SLUICE-DONE status=1\n"),
        };
        KernelResult::Booted(boot, Duration::from_secs(600))
    }

    fn test_check(name: &'static str, expect: &'static [(&'static str, Expect)]) -> Check {
        Check { name, column: name, run: Run::Test { package: "p", target: name, args: &[] }, expect, timeout_secs: 9 }
    }

    fn reported(name: &str, body: &str, pass: bool) -> String {
        let verdict = if pass { "pass rc=0" } else { "fail rc=101" };
        format!("SLUICE-LOG-BEGIN {name}\n{body}SLUICE-LOG-END {name}\nSLUICE-CHECK {name} {verdict} secs=3\n")
    }

    const OK_1: &str = "test x ... ok\ntest result: ok. 1 passed; 0 failed; 0 ignored\n";

    #[test]
    fn a_missing_check_fails_the_kernel() {
        let kernel = &crate::vm::kernels::KERNELS[1];
        let checks = [test_check("t", &[]), test_check("gone", &[])];
        let missing = [("gone", "package p has no test target gone".to_owned())];
        let row = evaluate(kernel, booted(&reported("t", OK_1, true)), &checks, &missing);
        assert!(row.cells[0].ok(), "the check that ran passed");
        assert!(!row.cells[1].ok() && !row.ok(), "a missing check must fail the row");
        let md = markdown(&[row], &checks, &missing, "abc");
        assert!(md.contains("**MISSING** [1]") && md.contains("has no test target gone"), "{md}");
        assert!(!md.contains("n/a"), "{md}");
        // The same check present and passing: the row is fine.
        let row = evaluate(kernel, booted(&(reported("t", OK_1, true) + &reported("gone", OK_1, true))), &checks, &[]);
        assert!(row.ok());
    }

    #[test]
    fn a_skip_or_no_test_is_not_a_pass() {
        let kernel = &crate::vm::kernels::KERNELS[1];
        let checks = [test_check("t", &[])];
        let skipped = format!("SKIPPED: t::x needs root (CAP_NET_ADMIN, bpf)\n{OK_1}");
        let none = "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out\n";
        for (what, log) in [("skipped", skipped.as_str()), ("no test ran", none), ("no summary", "")] {
            let row = evaluate(kernel, booted(&reported("t", log, true)), &checks, &[]);
            assert!(row.cells[0].state == State::Fail && !row.ok(), "{what} must fail");
        }
        // Not reported at all (the guest stopped early): no result, a failure.
        let row = evaluate(kernel, booted(""), &checks, &[]);
        assert!(row.cells[0].state == State::NoResult && !row.ok());
    }

    #[test]
    fn an_expected_failure_holds_only_with_its_signature() {
        const CANNOT: &[(&str, Expect)] = &[("5.10", Expect::Fail { signature: "unknown func", why: "5.10 cannot" })];
        let old = &crate::vm::kernels::KERNELS[0];
        let checks = [test_check("t", CANNOT)];
        let row = evaluate(old, booted(&reported("t", "Error: unknown func bpf_x#1\n", false)), &checks, &[]);
        assert!(row.cells[0].state == State::ExpectedFail && row.ok());
        let row = evaluate(old, booted(&reported("t", "thread panicked at timeout\n", false)), &checks, &[]);
        assert!(row.cells[0].state == State::Fail, "another failure is a failure");
        let row = evaluate(old, booted(&reported("t", OK_1, true)), &checks, &[]);
        assert!(row.cells[0].state == State::UnexpectedPass && !row.ok(), "a stale expectation fails");
    }

    #[test]
    fn key_line_prefers_the_signature() {
        let log =
            "Error: verifier rejected x\n6: call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n";
        assert_eq!(key_line(log, Some("unknown func")).as_deref(), Some("unknown func bpf_get_netns_cookie#122"));
        assert_eq!(key_line(log, None).as_deref(), Some("Error: verifier rejected x"));
    }
}
