//! What install must remember for uninstall: the primary config as it was
//! (name, mode, exact text) and what sluice wrote in its place.
//!
//! Kept in `<conf-dir>/.sluice/state.json`: beside the config so it
//! survives with it (the conf dir is the host's, the container is not), in
//! a directory, which libcni's `ConfFiles` never loads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{conf_dir, files, Level, Log};

pub const STATE_DIR: &str = ".sluice";
const STATE_FILE: &str = "state.json";

/// Two configs of at most [`files::MAX_CONFIG_BYTES`], escaped.
const MAX_STATE_BYTES: u64 = 16 * files::MAX_CONFIG_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub original: Saved,
    pub installed: Written,
}

/// The file to give back on uninstall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    pub file: String,
    pub mode: u32,
    pub content: String,
    /// `content` is the file's bytes as they were; false when it had to be
    /// reconstructed (our entry was already in it and our state was gone).
    pub exact: bool,
}

/// The file sluice last wrote, to tell later whether anyone changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Written {
    pub file: String,
    pub content: String,
}

pub fn path(conf_dir: &Path) -> PathBuf {
    conf_dir.join(STATE_DIR).join(STATE_FILE)
}

/// A name we may join to the conf dir and write: a plain config file name.
fn plain_config_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".." && conf_dir::kind_of(name).is_some()
}

/// The saved state, if any. A state file that cannot be used is set aside
/// (`state.json.bad`) with a warning rather than blocking every install:
/// the cost is that uninstall then removes our entry instead of restoring
/// the exact original.
pub fn load(conf_dir: &Path, log: Log) -> Result<Option<State>> {
    let path = path(conf_dir);
    let bytes = match files::read_bounded(&path, MAX_STATE_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return set_aside(&path, &e.to_string(), log),
        Err(e) => return Err(e).with_context(|| format!("reading sluice's install state {}", path.display())),
    };
    let state: State = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => return set_aside(&path, &e.to_string(), log),
    };
    for name in [&state.original.file, &state.installed.file] {
        if !plain_config_name(name) {
            return set_aside(&path, &format!("{name:?} is not a config file name"), log);
        }
    }
    Ok(Some(state))
}

fn set_aside(path: &Path, why: &str, log: Log) -> Result<Option<State>> {
    let bad = path.with_extension("json.bad");
    std::fs::rename(path, &bad).with_context(|| format!("moving the unusable {} aside", path.display()))?;
    log(
        Level::Warn,
        &format!(
            "{}: unusable ({why}); moved to {}, the original config cannot be restored exactly",
            path.display(),
            bad.display()
        ),
    );
    Ok(None)
}

pub fn save(conf_dir: &Path, state: &State) -> Result<()> {
    let dir = conf_dir.join(STATE_DIR);
    if !dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| if dir.is_dir() { Ok(()) } else { Err(e) })
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(state).context("encoding the install state")?;
    bytes.push(b'\n');
    files::write_atomic(&path(conf_dir), &bytes, 0o600)
}

/// Forget the state; the directory goes too when nothing else is in it.
pub fn clear(conf_dir: &Path) -> Result<()> {
    files::remove_if_exists(&path(conf_dir))?;
    // Not empty (a `.bad` file kept for the operator) or absent: fine.
    let _ = std::fs::remove_dir(conf_dir.join(STATE_DIR));
    Ok(())
}
