//! Real processes inside a pod's (or node's) netns and cgroup.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Somewhere a process can run: a netns plus a cgroup v2 directory.
/// Implemented by [`crate::Node`] and [`crate::Pod`].
pub trait Place {
    fn netns_name(&self) -> &str;
    fn netns_path(&self) -> PathBuf {
        crate::netns::netns_path(self.netns_name())
    }
    fn cgroup_path(&self) -> PathBuf;
    /// The owning topology's child list, so that dropping the topology kills
    /// children whose guards are still alive elsewhere.
    #[doc(hidden)]
    fn registry(&self) -> Option<Arc<Registry>> {
        None
    }
}

type Slot = Arc<Mutex<Option<Child>>>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test must not turn cleanup into a second panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Children spawned into one topology (weak: the guards own them).
#[doc(hidden)]
#[derive(Default)]
pub struct Registry {
    closed: AtomicBool,
    slots: Mutex<Vec<Weak<Mutex<Option<Child>>>>>,
}

impl Registry {
    /// Refuse new children and SIGKILL + reap the ones still alive.
    pub(crate) fn close_and_kill(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in lock(&self.slots).drain(..).filter_map(|w| w.upgrade()) {
            reap(&mut lock(&slot));
        }
    }
}

/// SIGKILL by the pid we own (std's Child, not yet reaped, so the pid cannot
/// have been recycled) and reap it.
fn reap(slot: &mut Option<Child>) {
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Run `cmd` inside `place`'s netns and cgroup. stdout and stderr are always
/// piped (read them through the guard); stdin is left as the caller set it.
/// The child is SIGKILLed and reaped when the guard (or the topology) drops.
pub fn spawn_in(place: &(impl Place + ?Sized), mut cmd: Command) -> Result<ChildGuard> {
    let registry = place.registry();
    if registry.as_ref().is_some_and(|r| r.closed.load(Ordering::SeqCst)) {
        bail!("netns {}: its topology was already dropped", place.netns_name());
    }
    // Open both before fork: only async-signal-safe calls after it.
    let ns_path = place.netns_path();
    let ns = File::open(&ns_path).with_context(|| format!("open netns {}", ns_path.display()))?;
    let procs_path = place.cgroup_path().join("cgroup.procs");
    let procs =
        OpenOptions::new().write(true).open(&procs_path).with_context(|| format!("open {}", procs_path.display()))?;
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    // SAFETY: the closure only calls write(2) and setns(2), both
    // async-signal-safe, on fds that stay open until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process, i.e. the child itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let what = format!("{:?} in netns {}", cmd.get_program(), place.netns_name());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what} (cgroup {})", procs_path.display()))?;
    drop((ns, procs));

    let pid = child.id();
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_buf = Arc::new(Mutex::new(Vec::new()));
    let err_sink = err_buf.clone();
    let stderr_thread = std::thread::spawn(move || {
        let mut reader = stderr;
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut chunk) {
            lock(&err_sink).extend_from_slice(&chunk[..n]);
        }
    });

    let slot: Slot = Arc::new(Mutex::new(Some(child)));
    if let Some(r) = &registry {
        let mut slots = lock(&r.slots);
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
    }
    Ok(ChildGuard { slot, pid, what, lines, seen: Vec::new(), stderr: err_buf, stderr_thread: Some(stderr_thread) })
}

/// Spawn in `place`, wait up to `timeout` for exit, return its output. The
/// process is killed (and an error returned) if it does not finish in time.
pub fn output_in(place: &(impl Place + ?Sized), cmd: Command, timeout: Duration) -> Result<Output> {
    spawn_in(place, cmd)?.finish(timeout)
}

/// Owns a spawned child: SIGKILL + reap by pid on drop.
pub struct ChildGuard {
    slot: Slot,
    pid: u32,
    what: String,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's stdin, if the caller configured `Stdio::piped()`.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        lock(&self.slot).as_mut().and_then(|c| c.stdin.take())
    }

    /// Next stdout line; `Ok(None)` at EOF, error on timeout.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => {
                bail!("{}: no stdout line within {timeout:?}; stderr: {}", self.what, self.stderr_text())
            }
        }
    }

    /// Read stdout until a line starting with `prefix` (e.g. "LISTENING")
    /// and return it. Fails on timeout or if the child closes stdout first.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left).with_context(|| format!("waiting for {prefix:?}"))? {
                Some(line) if line.starts_with(prefix) => return Ok(line),
                Some(_) => {}
                None => bail!(
                    "{} closed stdout before printing {prefix:?} (status {:?}); stderr: {}",
                    self.what,
                    self.try_status().ok().flatten(),
                    self.stderr_text()
                ),
            }
        }
    }

    /// Every stdout line read so far by [`Self::next_line`]/[`Self::wait_for_line`].
    pub fn lines_seen(&self) -> &[String] {
        &self.seen
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    /// Exit status if the child has exited (reaps it), else `None`.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        match lock(&self.slot).as_mut() {
            Some(c) => c.try_wait().with_context(|| format!("waitpid {}", self.pid)),
            None => bail!("{} was already killed", self.what),
        }
    }

    /// Wait up to `timeout` for exit and return status, all stdout (including
    /// lines already read) and stderr. Kills the child and fails on timeout.
    pub fn finish(mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.try_status()? {
                break s;
            }
            if Instant::now() > deadline {
                reap(&mut lock(&self.slot));
                bail!("{} did not exit within {timeout:?}; stderr: {}", self.what, self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The pipes close at exit unless a grandchild inherited them.
        while let Ok(Some(_)) = self.next_line(Duration::from_secs(2)) {}
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let mut stdout = self.seen.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Ok(Output { status, stdout: stdout.into_bytes(), stderr: lock(&self.stderr).clone() })
    }

    /// SIGKILL and reap now.
    pub fn kill(&mut self) {
        reap(&mut lock(&self.slot));
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
