//! Reading and writing the PEM files of a CA directory.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::Path,
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use super::CaError;

/// Reads every certificate in a PEM file, in order; an empty file is an error.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = fs::read(path).map_err(|e| CaError::io(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::invalid(path, format!("unparsable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CaError::invalid(
            path,
            "no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks with valid base64)",
        ));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file,
/// refusing a file that others may read (see [`check_key_mode`]). The mode
/// is that of the file read, not of the path looked at before.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CaError> {
    let mut file = fs::File::open(path).map_err(|e| CaError::io(path, e))?;
    let meta = file.metadata().map_err(|e| CaError::io(path, e))?;
    check_key_mode(path, meta.mode(), meta.gid(), nix::unistd::getegid().as_raw())?;
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(|e| CaError::io(path, e))?;
    // The generic parser skips blocks it does not know, so an encrypted key
    // would otherwise be reported as "no key found", which misleads.
    if pem.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(CaError::invalid(path, "the key is encrypted; decrypt it first"));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        CaError::invalid(
            path,
            format!(
                "no private key found (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" \
                 or \"EC PRIVATE KEY\" block): {e}"
            ),
        )
    })
}

/// A CA key must be its owner's alone: no permission for others, and none
/// for the group, except reading when the group is this process's own
/// effective group. That exception is how Kubernetes hands a secret to a
/// non-root container: with `fsGroup` the files are `0440 root:<fsGroup>`,
/// and the container runs with that group.
pub(crate) fn check_key_mode(path: &Path, mode: u32, file_gid: u32, our_gid: u32) -> Result<(), CaError> {
    let (group, others) = (mode & 0o070, mode & 0o007);
    let group_ok = group == 0 || (group == 0o040 && file_gid == our_gid);
    if others == 0 && group_ok {
        return Ok(());
    }
    // Refused: describe every permission beyond the owner's.
    let open = group | others;
    let how = match (open & 0o044 != 0, open & 0o022 != 0) {
        (true, true) => "readable and writable",
        (true, false) => "readable",
        (false, true) => "writable",
        (false, false) => "accessible",
    };
    let whom = match (group != 0, others != 0) {
        (true, true) => "group/others",
        (true, false) if group == 0o040 => "group (not this process's group)",
        (true, false) => "group",
        _ => "others",
    };
    Err(CaError::KeyExposed { path: path.to_owned(), mode: mode & 0o7777, detail: format!("{how} by {whom}") })
}

/// Creates `path` with `mode`, failing if it exists, so that a second
/// `ca init` can never replace a CA that workloads already trust.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CaError::Exists { path: path.to_owned() },
            _ => CaError::io(path, e),
        })?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(|e| CaError::io(path, e))
}

pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    const LINE: usize = 64;
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(LINE) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_may_have_the_key() {
        let path = Path::new("/ca/ca-key.pem");
        let check = |mode, gid, ours| check_key_mode(path, mode, gid, ours).map_err(|e| e.to_string());
        for mode in [0o600, 0o400, 0o700] {
            assert_eq!(check(mode, 0, 0), Ok(()), "{mode:o}");
        }
        assert_eq!(
            check(0o644, 0, 0).unwrap_err(),
            "/ca/ca-key.pem has mode 0644: readable by group/others; chmod 600 /ca/ca-key.pem"
        );
        assert!(check(0o604, 0, 0).unwrap_err().contains("mode 0604: readable by others"));
        assert!(check(0o620, 0, 0).unwrap_err().contains("writable by group"));
        assert!(check(0o666, 0, 0).unwrap_err().contains("readable and writable by group/others"));
        // Kubernetes' fsGroup: 0440 root:<our group> is ours; another group's is not.
        assert_eq!(check(0o440, 65532, 65532), Ok(()));
        assert_eq!(check(0o640, 65532, 65532), Ok(()));
        assert!(check(0o440, 100, 65532).unwrap_err().contains("readable by group (not this process's group)"));
        assert!(check(0o460, 65532, 65532).unwrap_err().contains("by group"), "group write is never ours");
        assert!(check(0o444, 65532, 65532).unwrap_err().contains("mode 0444: readable by group/others"));
    }

    #[test]
    fn pem_round_trips_through_the_parser() {
        for len in [1usize, 2, 3, 47, 48, 49, 500] {
            let der: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let pem = to_pem("CERTIFICATE", &der);
            let parsed = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(parsed.as_ref(), der.as_slice());
        }
    }
}
