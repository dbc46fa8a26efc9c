//! Reloads the config file when it changes, without ever replacing good
//! state with bad.
//!
//! The file is polled rather than watched with inotify: a ConfigMap mount
//! swaps a symlink, and editors replace the file by rename, both of which
//! leave an inotify watch on a dead inode. Polling the path by name sees
//! every one of those the same way.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::config::Config;
use super::error::ConfigError;
use super::snapshot::State;

pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Files modified this recently are re-read even if their metadata looks
/// unchanged: on filesystems with coarse timestamps, a same-size rewrite in
/// the same tick leaves mtime and size as they were (git's "racy" problem).
const RACY_WINDOW: Duration = Duration::from_secs(2);

pub struct ConfigWatcher;

impl ConfigWatcher {
    /// Loads `path` for `node` and then keeps the returned receiver up to date.
    ///
    /// The first load must succeed, so that a broken file stops the agent at
    /// start instead of leaving it running with nothing. Afterwards a change
    /// is acted on once the file has looked the same on two consecutive polls,
    /// so a file being written in place is not read half-done; a rename is
    /// picked up within about half a second.
    ///
    /// A reload that fails (unreadable file, bad YAML, invalid config) keeps
    /// the last good state, logs the path and reason at error level and calls
    /// `on_error` once per distinct failure, not once per poll.
    ///
    /// Successful reloads are counted by [`State::generation`]: 0 for the
    /// initial load, +1 for each published state, so a reload counter is the
    /// generation of the newest state and needs no second callback. A rewrite
    /// that parses to the same config (only comments or layout changed) is
    /// not a reload and publishes nothing.
    ///
    /// The task ends when every receiver has been dropped.
    ///
    /// # Panics
    /// When called outside a Tokio runtime, as `tokio::spawn` does.
    pub fn spawn<F>(
        path: impl Into<PathBuf>,
        node: impl Into<String>,
        on_error: F,
    ) -> Result<(watch::Receiver<Arc<State>>, JoinHandle<()>), ConfigError>
    where
        F: Fn(&ConfigError) + Send + Sync + 'static,
    {
        let path = path.into();
        let node = node.into();
        let file = path.display().to_string();
        let read_error = |source| ConfigError::Read { file: file.clone(), source };

        // Stat before reading: if the file changes in between, the first
        // poll sees a new fingerprint and reads it again.
        let fingerprint = std::fs::metadata(&path).map(|m| Fingerprint::of(&m)).map_err(read_error)?;
        let bytes = std::fs::read(&path).map_err(read_error)?;
        let config = Config::from_bytes_named(&bytes, &file)?;
        let state = State::from_config(&config, &node)?;

        let (tx, rx) = watch::channel(Arc::new(state));
        let watcher = Watcher {
            path,
            file,
            node,
            tx,
            on_error,
            previous: Ok(fingerprint),
            processed: Some(fingerprint),
            good_hash: content_hash(&bytes),
            good_config: config,
            reported: None,
            generation: 0,
        };
        Ok((rx, tokio::spawn(watcher.run())))
    }
}

/// Enough of the file's metadata to notice a rewrite or a rename-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint { dev: meta.dev(), ino: meta.ino(), len: meta.len(), modified: meta.modified().ok() }
    }

    fn is_recent(&self) -> bool {
        match self.modified {
            // An mtime in the future (clock step) counts as recent.
            Some(modified) => SystemTime::now().duration_since(modified).map_or(true, |age| age < RACY_WINDOW),
            None => true,
        }
    }
}

/// A failure already reported, so it is not reported again every poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Read(io::ErrorKind),
    Content(u64),
}

struct Watcher<F> {
    path: PathBuf,
    file: String,
    node: String,
    tx: watch::Sender<Arc<State>>,
    on_error: F,
    /// What the previous poll saw; a change must be seen twice to be acted on.
    previous: Result<Fingerprint, io::ErrorKind>,
    /// The fingerprint whose content was last read and handled.
    processed: Option<Fingerprint>,
    good_hash: u64,
    /// The config behind the published state, to tell real changes from
    /// edits that only touch comments or layout.
    good_config: Config,
    reported: Option<Failure>,
    generation: u64,
}

impl<F: Fn(&ConfigError)> Watcher<F> {
    async fn run(mut self) {
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => self.poll().await,
                _ = self.tx.closed() => return,
            }
        }
    }

    async fn poll(&mut self) {
        let observed = tokio::fs::metadata(&self.path).await.map(|m| Fingerprint::of(&m));
        let key = observed.as_ref().map(|f| *f).map_err(io::Error::kind);
        let settled = self.previous == key;
        self.previous = key;
        if !settled {
            return;
        }
        let fingerprint = match observed {
            Ok(fingerprint) => fingerprint,
            Err(source) => return self.read_failed(source),
        };
        let unchanged = self.processed == Some(fingerprint) && !fingerprint.is_recent();
        let recovering_from_read_error = matches!(self.reported, Some(Failure::Read(_)));
        if unchanged && !recovering_from_read_error {
            return;
        }
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                self.processed = Some(fingerprint);
                self.handle(&bytes);
            }
            Err(source) => self.read_failed(source),
        }
    }

    fn handle(&mut self, bytes: &[u8]) {
        let hash = content_hash(bytes);
        if hash == self.good_hash {
            if self.reported.take().is_some() {
                tracing::info!(
                    path = %self.file,
                    generation = self.generation,
                    "config file is back to the last good content; nothing to reload"
                );
            }
            return;
        }
        if self.reported == Some(Failure::Content(hash)) {
            return;
        }
        let loaded = Config::from_bytes_named(bytes, &self.file).and_then(|config| {
            let state = State::from_config(&config, &self.node)?;
            Ok((config, state))
        });
        if let Ok((config, _)) = &loaded {
            let fields = fixed_at_start(&self.good_config, config);
            if !fields.is_empty() {
                let err = ConfigError::NeedsRestart { file: self.file.clone(), fields };
                return self.report(Failure::Content(hash), &err);
            }
        }
        match loaded {
            // Comments, formatting or key order changed, nothing else: do
            // not make every subscriber re-apply the same state.
            Ok((config, _)) if config == self.good_config => {
                self.good_hash = hash;
                self.reported = None;
                tracing::debug!(path = %self.file, "config file rewritten without changes");
            }
            Ok((config, state)) => {
                self.generation += 1;
                self.good_hash = hash;
                self.good_config = config;
                self.reported = None;
                tracing::info!(
                    path = %self.file,
                    generation = self.generation,
                    workloads = state.workloads().count(),
                    "reloaded config"
                );
                self.tx.send_replace(Arc::new(state.with_generation(self.generation)));
            }
            Err(err) => self.report(Failure::Content(hash), &err),
        }
    }

    fn read_failed(&mut self, source: io::Error) {
        let failure = Failure::Read(source.kind());
        let err = ConfigError::Read { file: self.file.clone(), source };
        self.report(failure, &err);
    }

    fn report(&mut self, failure: Failure, err: &ConfigError) {
        if self.reported == Some(failure) {
            return;
        }
        self.reported = Some(failure);
        tracing::error!(
            path = %self.file,
            reason = %err,
            generation = self.generation,
            "config reload failed; keeping the last good config"
        );
        (self.on_error)(err);
    }
}

/// The settings of `new` that differ from `old` and that the agent reads
/// only at start, by their names in the file.
fn fixed_at_start(old: &Config, new: &Config) -> Vec<String> {
    let mut fields = Vec::new();
    if old.trust_domain != new.trust_domain {
        fields.push("trustDomain".to_string());
    }
    let (a, b) = (&old.ca, &new.ca);
    for (name, changed) in [
        ("ca.dir", a.dir != b.dir),
        ("ca.address", a.address != b.address),
        ("ca.rootCert", a.root_cert != b.root_cert),
        ("ca.tokenFile", a.token_file != b.token_file),
        ("ca.certTtl", a.cert_ttl != b.cert_ttl),
    ] {
        if changed {
            fields.push(name.to_string());
        }
    }
    fields
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}
