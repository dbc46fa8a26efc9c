//! Running the iptables and iproute2 tools inside a pod's netns, with errors
//! that say which pod, which netns and which command failed, and what it said.

use std::{
    io::Write,
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result};

use super::PodCapture;

/// What a finished command printed.
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, feeding it `stdin` if given. Only spawn
/// failures (binary missing, setns refused) are errors here.
pub(crate) fn output(mut cmd: Command, stdin: Option<&str>) -> std::io::Result<Output> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The rules are a few hundred bytes, far below the pipe buffer, so
        // writing everything before reading cannot deadlock. A tool that
        // dies before reading closes the pipe; its stderr says why, so that
        // is what the caller should see, not EPIPE.
        if let Err(e) = pipe.write_all(text.as_bytes()) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
    }
    let out = child.wait_with_output()?;
    Ok(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// `program args...` as a human would type it, for error messages.
pub(crate) fn display(program: &str, args: &[&str]) -> String {
    std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}

/// Runs `program args` in the pod's netns and returns what it printed,
/// whatever the exit status.
pub(crate) fn run_in(pod: &PodCapture<'_>, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut cmd = pod.netns.command(program);
    cmd.args(args);
    output(cmd, stdin).with_context(|| {
        format!("pod {}: cannot run `{}` in netns {}", pod.uid, display(program, args), pod.netns.path().display())
    })
}

/// Like [`run_in`], but a non-zero exit is an error carrying stderr (and the
/// input, for restores, since the line number in stderr refers to it).
pub(crate) fn check_in(pod: &PodCapture<'_>, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = run_in(pod, program, args, stdin)?;
    if !out.status.success() {
        let mut msg = format!(
            "pod {}: `{}` in netns {} failed ({}): {}",
            pod.uid,
            display(program, args),
            pod.netns.path().display(),
            out.status,
            out.stderr
        );
        if let Some(input) = stdin {
            msg.push_str("\ninput was:\n");
            msg.push_str(input);
        }
        anyhow::bail!(msg);
    }
    Ok(out.stdout)
}
