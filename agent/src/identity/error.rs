//! Errors from loading a CA and issuing certificates. Every variant that
//! comes from a file names it, because an operator fixing a mounted secret
//! needs to know which of the four files is wrong.

use std::{io, path::PathBuf};

/// Smallest RSA CA key we accept, in bits (NIST SP 800-57; ring refuses less).
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: file not found", .path.display())]
    Missing { path: PathBuf },

    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{}: already exists; refusing to overwrite an existing CA", .path.display())]
    Exists { path: PathBuf },

    /// The file exists but its contents are unusable; `reason` says how.
    #[error("{}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },

    #[error("{}: certificate \"{subject}\" expired at {not_after}", .path.display())]
    Expired { path: PathBuf, subject: String, not_after: String },

    #[error("{}: certificate \"{subject}\" is not valid until {not_before}", .path.display())]
    NotYetValid { path: PathBuf, subject: String, not_before: String },

    #[error("{}: the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required", .path.display())]
    KeyTooSmall { path: PathBuf, bits: usize },

    #[error("{}: private key does not match the certificate in {}: {detail}", .key.display(), .cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf, detail: String },

    /// The CA key can be read (or written) by more than its owner.
    #[error("{} has mode {mode:04o}: {detail}; chmod 600 {}", .path.display(), .path.display())]
    KeyExposed { path: PathBuf, mode: u32, detail: String },

    #[error("cannot issue a certificate for {id}: {reason}")]
    Issue { id: String, reason: String },
}

impl CaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::NotFound {
            CaError::Missing { path }
        } else {
            CaError::Io { path, source }
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CaError::Invalid { path: path.into(), reason: reason.into() }
    }
}
