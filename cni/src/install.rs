//! `sluice cni install` / `uninstall`: putting `sluice-cni` into the node's
//! primary CNI config as the last plugin of its chain, and taking it out
//! again with the original file restored byte for byte.
//!
//! - `conf_dir`: which file the runtime loads, chosen as libcni's users do.
//! - `conflist`: the JSON edits (append, replace, remove, `.conf` to
//!   `.conflist`), pure functions on values.
//! - `state`: what was there before us (`<conf-dir>/.sluice/state.json`).
//! - `files`: bounded reads, atomic writes, the binary copy.
//! - `watch`: keeping the plugin in the chain while the primary CNI rewrites
//!   its file.
//!
//! The order of operations is chosen so the runtime never sees a chain that
//! names a plugin it cannot run: install copies the binary before editing
//! the config, uninstall edits the config before removing the binary.

mod conf_dir;
mod conflist;
mod files;
mod state;
mod watch;

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub use conf_dir::CONF_EXTENSIONS;
pub use files::MAX_CONFIG_BYTES;
pub use state::STATE_DIR;
pub use watch::watch;

use conf_dir::{Candidate, Kind};
use state::{Saved, State, Written};

/// The plugin's `type`, which is also the binary's name in the bin dir.
pub const PLUGIN_TYPE: &str = "sluice-cni";

pub const DEFAULT_LOG_FILE: &str = "/var/run/sluice/sluice-cni.log";

/// Namespaces the plugin lets through without asking the agent: the
/// control plane's own pods must start even when the agent cannot.
pub const DEFAULT_EXCLUDE_NAMESPACES: &[&str] = &["kube-system", "sluice-system"];

/// What goes into the plugin's entry in the conflist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub agent_socket: PathBuf,
    pub fail_closed: bool,
    pub exclude_namespaces: Vec<String>,
    pub log_file: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent_socket: crate::protocol::DEFAULT_SOCKET.into(),
            fail_closed: true,
            exclude_namespaces: DEFAULT_EXCLUDE_NAMESPACES.iter().map(|s| s.to_string()).collect(),
            log_file: DEFAULT_LOG_FILE.into(),
        }
    }
}

impl Settings {
    /// The plugin's entry, with the keys in the order the plugin's docs
    /// list them (the conflist is read by people too).
    pub fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket.to_string_lossy(),
            "failClosed": self.fail_closed,
            "excludeNamespaces": self.exclude_namespaces,
            "logFile": self.log_file.to_string_lossy(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The `sluice-cni` binary to copy into `bin_dir`.
    pub plugin: PathBuf,
    pub settings: Settings,
}

#[derive(Debug, Clone)]
pub struct UninstallOptions {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Leave `bin_dir/sluice-cni` in place.
    pub keep_binary: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// Where install and uninstall say what they did and what they skipped;
/// the `sluice` binary sends it to its log.
pub type Log<'a> = &'a mut dyn FnMut(Level, &str);

/// Copy the binary, then put the plugin last in the primary config.
pub fn install(opts: &InstallOptions, log: Log) -> Result<()> {
    install_binary(opts, log)?;
    install_conf(&opts.conf_dir, &opts.settings.entry(), log)
}

fn install_binary(opts: &InstallOptions, log: Log) -> Result<()> {
    let dest = opts.bin_dir.join(PLUGIN_TYPE);
    if files::copy_binary(&opts.plugin, &dest)? {
        log(Level::Info, &format!("copied {} to {}", opts.plugin.display(), dest.display()));
    } else {
        log(Level::Info, &format!("{} is already this binary", dest.display()));
    }
    Ok(())
}

/// Take the plugin out of every config file, restoring what it was before
/// install where that is still possible, then remove the binary.
pub fn uninstall(opts: &UninstallOptions, log: Log) -> Result<()> {
    let dir = &opts.conf_dir;
    let mut changed = false;
    if let Some(st) = state::load(dir, log)? {
        restore(dir, &st, log)?;
        changed = true;
    }
    // Without state (lost, or written by another copy that crashed before
    // saving it) an entry may still be in a file: no byte-exact promise
    // there, but the plugin must not stay in a chain without its binary.
    for name in conf_dir::candidates(dir)? {
        let Ok(c) = conf_dir::load(dir, &name) else { continue };
        if c.kind == Kind::List && conflist::has_entry(&c.value) {
            let stripped = conflist::without_entry(&c.value);
            if conflist::plugins(&stripped).is_empty() {
                log(Level::Warn, &format!("{}: sluice-cni is its only plugin; left as it is", c.path.display()));
                continue;
            }
            files::write_atomic(&c.path, &conflist::render(&stripped), c.mode)?;
            log(Level::Warn, &format!("{}: removed sluice-cni (no saved original for this file)", c.path.display()));
            changed = true;
        }
    }
    state::clear(dir)?;
    if !opts.keep_binary {
        let bin = opts.bin_dir.join(PLUGIN_TYPE);
        if files::remove_if_exists(&bin)? {
            log(Level::Info, &format!("removed {}", bin.display()));
            changed = true;
        }
    }
    if !changed {
        log(Level::Info, &format!("sluice-cni is not installed in {}; nothing to do", dir.display()));
    }
    Ok(())
}

/// Put `entry` last in the primary config of `dir`. Idempotent: a second
/// run with the same settings writes nothing; with new settings it replaces
/// the entry.
fn install_conf(dir: &Path, entry: &Value, log: Log) -> Result<()> {
    let mut state = state::load(dir, log)?;
    let mut primary = pick(dir, log)?;
    if let Some(st) = &state {
        if st.installed.file != primary.name {
            // A new, lexically earlier config appeared (or the owner of a
            // `.conf` we converted wrote it again): the file we edited is no
            // longer the one the runtime loads. Put it back as it was, then
            // start over on the new primary.
            log(
                Level::Info,
                &format!("the primary config is now {}, not {}; restoring the latter", primary.name, st.installed.file),
            );
            restore(dir, st, log)?;
            state::clear(dir)?;
            state = None;
            // The files skipped before were reported a moment ago.
            primary = pick(dir, &mut |_, _| {})?;
        }
    }
    conflist::check_version(&primary.value).with_context(|| format!("{}", primary.path.display()))?;
    if conflist::only_ours(&primary.value, primary.kind) {
        bail!("{}: its only plugin is sluice-cni; there is no primary CNI to chain after", primary.path.display());
    }

    let original = original_of(&primary, state.as_ref());
    let (target, value) = match primary.kind {
        Kind::List => (primary.name.clone(), conflist::with_entry(&primary.value, entry)),
        Kind::Conf => {
            let target = conf_dir::list_name(&primary.name);
            let ours = state.as_ref().is_some_and(|st| st.installed.file == target);
            if !ours && dir.join(&target).symlink_metadata().is_ok() {
                bail!(
                    "{}: cannot turn it into {target}: that file exists and sluice did not write it",
                    primary.path.display()
                );
            }
            (target, conflist::with_entry(&conflist::conf_to_list(&primary.value), entry))
        }
    };
    let content = String::from_utf8(conflist::render(&value)).context("rendered config is not UTF-8")?;
    let new_state = State { original, installed: Written { file: target.clone(), content } };
    if target == primary.name && new_state.installed.content == primary.text {
        if state.as_ref() != Some(&new_state) {
            state::save(dir, &new_state)?;
        }
        log(Level::Info, &format!("{}: sluice-cni is already last, with these settings", primary.path.display()));
        return Ok(());
    }
    // The state goes first: if we die between the two writes, uninstall
    // still knows the original, and finds the primary not as "last written"
    // and falls back to removing our entry (of which there is none).
    state::save(dir, &new_state)?;
    let target_path = dir.join(&target);
    files::write_atomic(&target_path, new_state.installed.content.as_bytes(), primary.mode)?;
    if target != primary.name {
        // libcni would load both, and the `.conf` (lexically first) without us.
        files::remove_if_exists(&primary.path)?;
        log(
            Level::Info,
            &format!("{}: converted to {} with sluice-cni last", primary.path.display(), target_path.display()),
        );
    } else {
        log(Level::Info, &format!("{}: sluice-cni is the last plugin", target_path.display()));
    }
    Ok(())
}

/// The first valid config of `dir`, logging the ones skipped before it.
fn pick(dir: &Path, log: Log) -> Result<Candidate> {
    let scan = conf_dir::scan(dir)?;
    for (name, why) in &scan.skipped {
        log(Level::Warn, &format!("{}: skipped, as the runtime skips it: {why}", dir.join(name).display()));
    }
    match scan.primary {
        Some(c) => Ok(c),
        None if scan.skipped.is_empty() => {
            bail!("no CNI config in {} yet (no *.conf, *.conflist or *.json file)", dir.display())
        }
        None => {
            let all: Vec<String> = scan.skipped.iter().map(|(name, why)| format!("{name}: {why}")).collect();
            bail!("no valid CNI config in {}: {}", dir.display(), all.join("; "))
        }
    }
}

/// What uninstall should put back for `primary`.
fn original_of(primary: &Candidate, state: Option<&State>) -> Saved {
    if let Some(st) = state {
        if primary.text == st.installed.content {
            return st.original.clone();
        }
    }
    if !conflist::has_entry(&primary.value) {
        // Never seen by us, or rewritten by its owner since: this is the
        // file to give back.
        return Saved { file: primary.name.clone(), mode: primary.mode, content: primary.text.clone(), exact: true };
    }
    // Our entry is there but these are not the bytes we wrote (reformatted,
    // or our state is gone). If it is otherwise what we saved, keep that.
    let stripped = conflist::without_entry(&primary.value);
    if let Some(st) = state {
        if saved_matches(&st.original, &stripped) {
            return st.original.clone();
        }
    }
    let rendered = String::from_utf8(conflist::render(&stripped)).unwrap_or_default();
    Saved { file: primary.name.clone(), mode: primary.mode, content: rendered, exact: false }
}

/// `list` (a conflist without our entry) is, as JSON, the saved original
/// (converted to a list when the original was a `.conf`).
fn saved_matches(saved: &Saved, list: &Value) -> bool {
    let Ok(orig) = serde_json::from_str::<Value>(&saved.content) else { return false };
    match conf_dir::kind_of(&saved.file) {
        Some(Kind::Conf) => conflist::conf_to_list(&orig) == *list,
        Some(Kind::List) => orig == *list,
        None => false,
    }
}

/// Undo what `st` records: the original bytes when the file is still what
/// we wrote, otherwise only our entry taken out of whatever is there now.
fn restore(dir: &Path, st: &State, log: Log) -> Result<()> {
    let written = dir.join(&st.installed.file);
    let orig_path = dir.join(&st.original.file);
    let how = if st.original.exact { "byte for byte" } else { "as reconstructed at install (not byte-exact)" };
    let current = match files::read_bounded(&written, files::MAX_CONFIG_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Whoever removed it meant it; recreating the original would
            // resurrect a config its owner took away.
            log(Level::Info, &format!("{}: gone since install; nothing to restore", written.display()));
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {} to restore it", written.display())),
    };
    let converted = st.installed.file != st.original.file;
    if current == st.installed.content.as_bytes() {
        if converted {
            put_back_converted(&orig_path, &written, &st.original, how, log)?;
        } else {
            files::write_atomic(&orig_path, st.original.content.as_bytes(), st.original.mode)?;
            log(Level::Info, &format!("{}: restored {how}", orig_path.display()));
        }
        return Ok(());
    }

    // Rewritten since we wrote it: leave everything but our entry alone.
    let value = match conflist::parse(Kind::List, &current) {
        Ok(v) => v,
        Err(why) => {
            log(Level::Warn, &format!("{}: changed since install and {why}; left as it is", written.display()));
            return Ok(());
        }
    };
    if !conflist::has_entry(&value) {
        log(Level::Info, &format!("{}: rewritten by its owner without sluice-cni; left as it is", written.display()));
        return Ok(());
    }
    let stripped = conflist::without_entry(&value);
    if saved_matches(&st.original, &stripped) {
        // Only our entry (or formatting) differs from the original: give
        // back the original bytes after all.
        if converted {
            put_back_converted(&orig_path, &written, &st.original, how, log)?;
        } else {
            files::write_atomic(&orig_path, st.original.content.as_bytes(), st.original.mode)?;
            log(Level::Info, &format!("{}: restored {how} (it had been reformatted)", orig_path.display()));
        }
        return Ok(());
    }
    let mode = files::mode_of(&written).unwrap_or(st.original.mode);
    files::write_atomic(&written, &conflist::render(&stripped), mode)?;
    log(
        Level::Info,
        &format!("{}: changed since install; removed only sluice-cni from it (not byte-exact)", written.display()),
    );
    Ok(())
}

/// The original was a `.conf` we replaced with a `.conflist`: bring the
/// `.conf` back (unless its owner already wrote a new one) and drop ours.
fn put_back_converted(orig_path: &Path, written: &Path, saved: &Saved, how: &str, log: Log) -> Result<()> {
    if orig_path.symlink_metadata().is_ok() {
        log(Level::Info, &format!("{}: written again by its owner since; kept", orig_path.display()));
    } else {
        files::write_atomic(orig_path, saved.content.as_bytes(), saved.mode)?;
        log(Level::Info, &format!("{}: restored {how}", orig_path.display()));
    }
    files::remove_if_exists(written)?;
    log(Level::Info, &format!("{}: removed (sluice made it from the .conf)", written.display()));
    Ok(())
}
