//! `--watch`: keep sluice-cni in the chain after installing it.
//!
//! Primary CNIs rewrite their config (at their own pod's start, on upgrade,
//! on a settings change), which drops our entry; and another CNI may put a
//! lexically earlier file in the dir, which the runtime then loads instead.
//! Either way new pods would start uncaptured, so install runs again.
//!
//! Polling, not inotify: once a second the dir's listing is compared
//! (names, sizes, mtimes, inodes), which sees writes in place and renames
//! alike, and also sees the dir being created after us; every
//! [`FULL_CHECK_EVERY`] polls the files are read regardless, for a rewrite
//! that kept size and mtime. A second of delay is well under a pod's start.
//!
//! On SIGTERM/SIGINT it returns and leaves the plugin installed, on
//! purpose: in a DaemonSet upgrade the next pod's copy is already running
//! (maxSurge 1), and a node whose chain lacks the plugin starts pods
//! without capture. `sluice cni uninstall` is the explicit way out.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::Result;

use super::{conf_dir, conflist, state, InstallOptions, Level, Log, PLUGIN_TYPE};

/// Polls between reads of the files when the listing did not change.
pub const FULL_CHECK_EVERY: u32 = 30;

/// Install, then keep the plugin installed until `stop` fires (or its
/// sender is dropped). Only a plugin binary that cannot be copied ends it
/// early with an error: the image is broken and no retry helps. Config
/// problems (none yet, invalid, unsupported version) are logged, once per
/// distinct problem, and retried on every poll.
pub fn watch(opts: &InstallOptions, stop: &Receiver<()>, every: Duration, log: Log) -> Result<()> {
    super::install_binary(opts, log)?;
    let entry = opts.settings.entry();
    let bin = opts.bin_dir.join(PLUGIN_TYPE);
    let mut last_seen = None;
    let mut quiet_lines: Option<Vec<(Level, String)>> = None;
    let mut failing = false;
    let mut first = true;
    let mut polls_since_read = 0;
    loop {
        let seen = listing(&opts.conf_dir, &bin);
        if first || failing || last_seen.as_ref() != Some(&seen) || polls_since_read >= FULL_CHECK_EVERY {
            polls_since_read = 0;
            let mut lines = Vec::new();
            let result = check(opts, &entry, first, &mut |level, msg: &str| lines.push((level, msg.to_owned())));
            let changed = matches!(result, Ok(true));
            if let Err(e) = &result {
                lines.push((Level::Warn, format!("{e:#}; retrying every {}s", every.as_secs_f32())));
            }
            // A problem that persists is said once, not every second; what
            // was done is always said.
            if changed || quiet_lines.as_ref() != Some(&lines) {
                for (level, msg) in &lines {
                    log(*level, msg);
                }
            }
            if failing && result.is_ok() {
                log(Level::Info, "sluice-cni is in the chain again");
            }
            failing = result.is_err();
            quiet_lines = if changed { None } else { Some(lines) };
            first = false;
            // After our own writes, so they do not look like someone else's.
            last_seen = Some(listing(&opts.conf_dir, &bin));
        } else {
            polls_since_read += 1;
        }
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                log(
                    Level::Info,
                    "stopping; sluice-cni stays in the CNI chain (run `sluice cni uninstall` to remove it)",
                );
                return Ok(());
            }
        }
    }
}

/// One look. `Ok(true)` when something was written.
fn check(opts: &InstallOptions, entry: &serde_json::Value, first: bool, log: Log) -> Result<bool> {
    let mut changed = false;
    let bin = opts.bin_dir.join(PLUGIN_TYPE);
    let want = opts.plugin.metadata().map(|m| m.len()).ok();
    if !first && bin.metadata().map(|m| m.len()).ok() != want {
        // Gone (a node cleanup) or replaced: put ours back.
        super::install_binary(opts, log)?;
        changed = true;
    }
    let scan = conf_dir::scan(&opts.conf_dir)?;
    if !first {
        // Only a missing entry is acted on: when another chained plugin
        // also wants to be last, two watchers moving their entries behind
        // each other would rewrite the file forever.
        if let Some(p) = &scan.primary {
            let ours = state::load(&opts.conf_dir, log)?.is_some_and(|s| s.installed.file == p.name);
            if p.kind == conf_dir::Kind::List && conflist::has_entry(&p.value) && ours {
                return Ok(changed);
            }
        }
    }
    let before = fingerprint(&opts.conf_dir);
    super::install_conf(&opts.conf_dir, entry, log)?;
    Ok(changed || fingerprint(&opts.conf_dir) != before)
}

/// What the conf dir holds, cheaply: every entry's name, size, mtime and
/// inode, plus the binary's. An unreadable dir is its error text.
fn listing(conf_dir: &Path, bin: &Path) -> (Fingerprint, Option<u64>) {
    (fingerprint(conf_dir), bin.metadata().ok().map(|m| m.len()))
}

/// (name, size, mtime s, mtime ns, inode) of each entry, sorted.
type Fingerprint = Result<Vec<(OsString, u64, i64, i64, u64)>, String>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Err(e.to_string()),
    };
    for entry in entries.flatten() {
        if let Ok(m) = entry.metadata() {
            out.push((entry.file_name(), m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
        }
    }
    out.sort();
    Ok(out)
}
