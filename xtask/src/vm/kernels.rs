//! The kernels of the matrix: one pinned Debian package each, and the private
//! apt sources they are fetched from. This file is the only place a pin lives.
//!
//! Moving a pin (see README "Supported kernels"): list what the suite has
//! now, e.g.
//!
//! ```text
//! apt-get -o Dir::Etc::sourcelist=~/.cache/sluice/kernels/apt/sources.list \
//!   -o Dir::Etc::sourceparts=- -o Dir::State::Lists=~/.cache/sluice/kernels/apt/lists \
//!   -o Dir::Cache=~/.cache/sluice/kernels/apt/cache policy linux-image-6.1.0-NN-amd64
//! ```
//!
//! then change `package` and `version` below together and run
//! `cargo xtask vm-test --kernel <label>`: a pin that is not in the list any
//! more fails the run with the reason, it is never skipped.

/// Debian's archive key ring; it holds the keys of bullseye, bookworm and trixie.
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suites the private apt list reads (`deb` lines, without options).
/// Only the suites that hold a pinned package are needed; keep them in step
/// with [`KERNELS`].
pub const SUITES: &[&str] = &[
    "http://deb.debian.org/debian bullseye main",
    "http://deb.debian.org/debian bookworm main",
    "http://deb.debian.org/debian-security bookworm-security main",
    "http://deb.debian.org/debian trixie main",
    "http://deb.debian.org/debian-security trixie-security main",
];

pub struct Kernel {
    /// What `--kernel` takes and the row of the table.
    pub label: &'static str,
    /// The Debian binary package holding vmlinuz and the modules.
    pub package: &'static str,
    /// Its exact version; `apt-get download package=version`.
    pub version: &'static str,
    /// Where it comes from, for the table and the error messages.
    pub suite: &'static str,
}

/// The matrix rows, oldest first. Each package is in the point-release suite
/// of its distribution (not only in -security, which drops superseded
/// versions sooner), so a pin stays downloadable as long as possible.
pub const KERNELS: &[Kernel] = &[
    Kernel { label: "5.10", package: "linux-image-5.10.0-32-amd64", version: "5.10.223-1", suite: "bullseye" },
    Kernel { label: "6.1", package: "linux-image-6.1.0-50-amd64", version: "6.1.176-1", suite: "bookworm" },
    Kernel { label: "6.12", package: "linux-image-6.12.117+deb13-amd64", version: "6.12.117-1", suite: "trixie" },
];

/// `--kernel` values: the labels, or `all`.
pub fn select(which: &str) -> Result<Vec<&'static Kernel>, String> {
    if which == "all" {
        return Ok(KERNELS.iter().collect());
    }
    let mut out = Vec::new();
    for label in which.split(',') {
        match KERNELS.iter().find(|k| k.label == label.trim()) {
            Some(k) => out.push(k),
            None => {
                let labels: Vec<&str> = KERNELS.iter().map(|k| k.label).collect();
                return Err(format!("unknown kernel {label:?}; choose from {} or all", labels.join(", ")));
            }
        }
    }
    Ok(out)
}
