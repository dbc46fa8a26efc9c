//! Runtime skipping of tests that need root.
//!
//! libtest has no runtime "skipped" outcome, so a test that cannot run would
//! otherwise show up as `ok`. The convention here:
//!
//! * root (euid 0): the test runs.
//! * not root and `SLUICE_REQUIRE_ROOT=1` (CI sets it): the test **panics**,
//!   so a CI box that lost its privileges fails loudly instead of going green.
//! * not root otherwise: the test prints exactly one line
//!   `SKIPPED: <test path> needs root (CAP_NET_ADMIN, bpf)` to the real
//!   stderr (fd 2, bypassing libtest's capture so it is visible even for
//!   passing tests), appends the same line to `$SLUICE_SKIP_LOG` if that is
//!   set, and returns early. The xtask runner counts skips by grepping for
//!   `^SKIPPED: ` in the output (or reading the log file).
//!
//! Use it as the first statement of a test:
//!
//! ```no_run
//! #[test]
//! fn pods_talk_root() {
//!     sluice_tests::require_root!();
//!     // ...
//! }
//!
//! #[test]
//! fn returns_result() -> anyhow::Result<()> {
//!     sluice_tests::require_root!(Ok(()));
//!     Ok(())
//! }
//! ```

use std::io::Write;

/// The marker the test runner greps for.
pub const SKIP_MARKER: &str = "SKIPPED: ";

/// `true` when running as root. Otherwise either panics (with
/// `SLUICE_REQUIRE_ROOT=1`) or reports the skip and returns `false`.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("SLUICE_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!("{test} needs root (CAP_NET_ADMIN, bpf) and SLUICE_REQUIRE_ROOT=1 forbids skipping");
    }
    let line = format!("{SKIP_MARKER}{test} needs root (CAP_NET_ADMIN, bpf)\n");
    // Straight to fd 2: eprintln! would be swallowed by libtest's capture.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os("SLUICE_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            let _ = writeln!(std::io::stderr(), "could not append to SLUICE_SKIP_LOG {log:?}: {e}");
        }
    }
    false
}

/// Skip (or, under `SLUICE_REQUIRE_ROOT=1`, fail) the current test unless
/// running as root. `require_root!()` for `()` tests, `require_root!(expr)`
/// to return `expr` (e.g. `Ok(())`) from a test returning a value.
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require_root!(())
    };
    ($ret:expr) => {{
        fn __sluice_here() {}
        let name = ::std::any::type_name_of_val(&__sluice_here);
        let name = name.strip_suffix("::__sluice_here").unwrap_or(name);
        // In an async test (`#[tokio::test]`) the body is a closure.
        let name = name.replace("::{{closure}}", "");
        if !$crate::skip::root_or_skip(&name) {
            return $ret;
        }
    }};
}
