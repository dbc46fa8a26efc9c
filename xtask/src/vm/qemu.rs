//! Booting one kernel under qemu (TCG: this machine has no KVM) and
//! collecting what its console printed.

use std::{
    fs::File,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

pub struct Boot {
    /// qemu's exit status; `None` when it was killed at the timeout.
    pub status: Option<i32>,
    pub elapsed: Duration,
    /// The console, `\r` removed.
    pub console: String,
}

pub fn command(vmlinuz: &Path, initrd: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init"]);
    cmd
}

/// Boots and waits at most `timeout`; the console goes to `log` as it comes.
pub fn boot(vmlinuz: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<Boot> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let start = Instant::now();
    let mut child = command(vmlinuz, initrd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("could not start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s.code();
        }
        if start.elapsed() > timeout {
            // Only the qemu this function started.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = start.elapsed();
    let console = String::from_utf8_lossy(&std::fs::read(log)?).replace('\r', "");
    Ok(Boot { status, elapsed, console })
}
