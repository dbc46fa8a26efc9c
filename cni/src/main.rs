//! `sluice-cni`: the chained CNI plugin. The runtime runs it once per
//! command with the `CNI_*` environment and the config on stdin; everything
//! it decides is in `sluice_cni::plugin`.

use std::io::{Read, Write};
use std::process::ExitCode;

use sluice_cni::plugin::{run, Env, SocketAgent, MAX_STDIN};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // One byte past the limit, so an oversized config is refused, not cut.
    let read = std::io::stdin().take(MAX_STDIN as u64 + 1).read_to_end(&mut stdin);
    let env = Env::from_process();
    let out = match read {
        Ok(_) => run(&env, &stdin, &SocketAgent, true),
        Err(e) => {
            let e =
                sluice_cni::spec::CniError::new(sluice_cni::spec::code::IO_FAILURE, "cannot read the config on stdin")
                    .with_details(e.to_string());
            sluice_cni::plugin::Output {
                stdout: serde_json::to_vec(&e.to_json(None)).unwrap_or_default(),
                success: false,
            }
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&out.stdout);
    let _ = stdout.flush();
    if out.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
