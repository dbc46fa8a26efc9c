//! Unique, parseable names for everything a topology creates.
//!
//! Every netns and cgroup name starts with `sl-<pid>-<n>` (pid and counter in
//! base 36). The pid lets [`crate::sweep_stale`] tell a leftover of a crashed
//! run (owner dead) from a live topology of a concurrently running test
//! process (owner alive), so sweeping never breaks a parallel run.

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU32, Ordering};

/// Every name the harness creates in shared places (netns names, cgroup dirs)
/// starts with this. Nothing without it is ever touched.
pub const HARNESS_PREFIX: &str = "sl-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(crate) fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ascii")
}

/// A fresh `sl-<pid36>-<n36>-<label>` prefix. Unique within this process by
/// the counter and across live processes by the pid; the caller still
/// claims it atomically (mkdir of the cgroup dir) in case a dead process
/// with a recycled pid left the same name behind.
pub(crate) fn next_prefix(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{HARNESS_PREFIX}{}-{}-{label}", base36(std::process::id().into()), base36(n.into()))
}

/// The pid encoded in a harness name, if it is one of ours.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(HARNESS_PREFIX)?;
    let pid36 = rest.split('-').next()?;
    u32::from_str_radix(pid36, 36).ok()
}

/// Names of topologies, nodes and pods end up in netns and cgroup names, so
/// keep them to a safe alphabet and a sane length.
pub(crate) fn validate(kind: &str, name: &str, max: usize) -> Result<()> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > max || !ok_chars || name.starts_with('-') {
        bail!("{kind} name {name:?} must be 1..={max} chars of [a-z0-9-], not starting with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips_pid() {
        let p = next_prefix("demo");
        assert!(p.starts_with(HARNESS_PREFIX));
        assert_eq!(owner_pid(&p), Some(std::process::id()));
        assert_ne!(next_prefix("demo"), p);
    }

    #[test]
    fn foreign_names_have_no_owner() {
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36), "10");
    }
}
