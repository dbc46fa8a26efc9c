//! Pinned links: the attachments of a pod's cgroup programs outlive the
//! agent process.
//!
//! A bpf_link closes, and detaches its program, when its last fd closes;
//! an agent that dies (or restarts) would then leave its pods' connect()
//! uncaptured, going around the mesh. Pinned under
//! `<pin root>/links/pod-<netns cookie>/`, the links keep capture in place
//! while no agent runs: the pod's connections are refused (no listener on
//! 15001) rather than sent unencrypted, as with iptables rules. The next
//! agent swaps its own programs into the existing links (BPF_LINK_UPDATE,
//! 5.7), so no connect() goes uncaptured while it takes over, and removing
//! the pins on pod removal or `--cleanup` detaches them.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::PinRoot;

/// The pin directory of one pod's links.
pub fn pod_dir(pins: &PinRoot, netns_cookie: u64) -> PathBuf {
    pins.path().join("links").join(format!("pod-{netns_cookie}"))
}

/// Points the link pinned at `pin` at `program`, atomically.
pub fn update_pinned(pin: &Path, program: BorrowedFd<'_>) -> Result<()> {
    let link = obj_get(pin).with_context(|| format!("opening the pinned link {}", pin.display()))?;
    link_update(&link, program).with_context(|| format!("updating the pinned link {}", pin.display()))
}

// The attribute layouts of linux/bpf.h `union bpf_attr` for the two commands.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out bpf_attr prefix of the given size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link: &OwnedFd, program: BorrowedFd<'_>) -> std::io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}
