//! The return path for connections the agent opens with the *client's* source
//! IP (IP_TRANSPARENT), so the app sees its real peer. The app's replies go to
//! that foreign IP and would leave the pod; the capture backend connmarks such
//! connections, and this ip rule sends marked packets to a table whose only
//! route delivers everything locally, i.e. back to the agent's socket.

use anyhow::Result;

use super::{exec, Family, PodCapture, CONNMARK, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

fn fwmark() -> String {
    format!("{CONNMARK:#x}/{MARK_MASK:#x}")
}

/// `fwmark 0x111/0xfff pref 32764 lookup 133`, the arguments that name our rule.
fn rule_args(fwmark: &str) -> [String; 6] {
    ["fwmark".into(), fwmark.into(), "pref".into(), RULE_PRIORITY.to_string(), "lookup".into(), ROUTE_TABLE.to_string()]
}

/// Our rules as `ip rule show` prints them.
pub(crate) fn rules(pod: &PodCapture<'_>, family: Family) -> Result<Vec<String>> {
    let out = exec::check_in(pod, "ip", &[family.ip_flag(), "rule", "show"], None)?;
    let pref = format!("{RULE_PRIORITY}:");
    let want = format!("fwmark {} lookup {ROUTE_TABLE}", fwmark());
    Ok(out.lines().filter(|l| l.starts_with(&pref) && l.contains(&want)).map(|l| l.trim().to_owned()).collect())
}

/// The routes in our table, as `ip route show` prints them.
pub(crate) fn routes(pod: &PodCapture<'_>, family: Family) -> Result<Vec<String>> {
    let table = ROUTE_TABLE.to_string();
    let out = exec::check_in(pod, "ip", &[family.ip_flag(), "route", "show", "table", &table], None)?;
    Ok(out.lines().map(|l| l.trim().to_owned()).collect())
}

/// Installs the rule (once) and the local route; idempotent.
pub(crate) fn install(pod: &PodCapture<'_>, family: Family) -> Result<()> {
    let table = ROUTE_TABLE.to_string();
    // `ip rule add` of an existing rule fails with EEXIST on current kernels
    // but duplicates it on old ones, so look first.
    if rules(pod, family)?.is_empty() {
        let mark = fwmark();
        let args = rule_args(&mark);
        let mut argv = vec![family.ip_flag(), "rule", "add"];
        argv.extend(args.iter().map(String::as_str));
        exec::check_in(pod, "ip", &argv, None)?;
    }
    exec::check_in(
        pod,
        "ip",
        &[family.ip_flag(), "route", "replace", "local", family.any(), "dev", "lo", "table", &table],
        None,
    )?;
    Ok(())
}

/// Deletes every copy of the rule and flushes the table; absent is fine.
pub(crate) fn remove(pod: &PodCapture<'_>, family: Family) -> Result<()> {
    let mark = fwmark();
    let args = rule_args(&mark);
    let mut argv = vec![family.ip_flag(), "rule", "del"];
    argv.extend(args.iter().map(String::as_str));
    for _ in rules(pod, family)? {
        exec::check_in(pod, "ip", &argv, None)?;
    }
    let table = ROUTE_TABLE.to_string();
    // Flushing an empty or never-created table succeeds.
    exec::check_in(pod, "ip", &[family.ip_flag(), "route", "flush", "table", &table], None)?;
    Ok(())
}
