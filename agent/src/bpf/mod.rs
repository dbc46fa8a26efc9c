//! Loads Sluice's kernel programs, pins their maps under the pin root and
//! attaches them. The object is embedded in the binary at build time
//! (agent/build.rs), so the agent never looks for a file on the node.
//!
//! Maps are pinned by path through `EbpfLoader::map_pin_path`: on first start
//! the loader creates and pins them, and a restarted agent re-opens the same
//! pinned maps instead of creating empty ones, so state survives restarts.

mod counters;
mod log;
mod pins;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    maps::SockHash,
    programs::{CgroupAttachMode, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use tracing::info;

pub use counters::{read_counters, Counters};
pub use pins::{ensure_bpffs, PinRoot};

/// The kernel object, built from agent-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SLUICE_EBPF_OBJECT"));

/// Names of the maps in the object, and the file each is pinned as.
pub const PINNED_MAPS: [(&str, &str); 2] = [("SOCK_PAIRS", "sock_pairs"), ("COUNTERS", "counters")];

/// Names of the programs in the object.
pub const PROGRAMS: [&str; 2] = ["sluice_sockops", "sluice_sk_msg"];

/// The loaded object. Dropping it detaches every program it attached; call
/// [`Datapath::shutdown`] to also remove the pins.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinRoot,
    cgroups: Vec<PathBuf>,
    _logger: Option<log::LogForwarder>,
}

impl Datapath {
    /// Loads every program (so the verifier has accepted all of them before
    /// anything is attached), opens or creates the pinned maps, and attaches
    /// sk_msg to the socket-pair map.
    pub fn load(pins: PinRoot) -> Result<Self> {
        let adopting = pins.path().exists();
        pins.create()?;
        Self::load_into(pins.clone()).inspect_err(|_| {
            // A fresh start that failed must not leave empty pins behind; pins
            // that were already there belong to a running or earlier agent.
            if !adopting {
                let _ = pins.remove();
            }
        })
    }

    fn load_into(pins: PinRoot) -> Result<Self> {
        let paths: Vec<(&str, PathBuf)> =
            PINNED_MAPS.iter().map(|(name, file)| (*name, pins.path().join(file))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).with_context(|| {
            format!("loading Sluice's eBPF object with maps pinned under {}", pins.path().display())
        })?;
        let logger = log::LogForwarder::start(&mut ebpf);

        let sockops: &mut SockOps = program(&mut ebpf, "sluice_sockops")?;
        sockops.load().context("verifier rejected sluice_sockops")?;
        let skmsg: &mut SkMsg = program(&mut ebpf, "sluice_sk_msg")?;
        skmsg.load().context("verifier rejected sluice_sk_msg")?;

        let pairs: SockHash<_, agent_common::SockKey> =
            SockHash::try_from(ebpf.map("SOCK_PAIRS").context("the object has no SOCK_PAIRS map")?)
                .context("opening SOCK_PAIRS as a SOCKHASH")?;
        let pairs_fd = pairs.fd().try_clone().context("duplicating the SOCK_PAIRS fd")?;
        let skmsg: &mut SkMsg = program(&mut ebpf, "sluice_sk_msg")?;
        skmsg.attach(&pairs_fd).context("attaching sluice_sk_msg to SOCK_PAIRS")?;
        // A program added to the object but not loaded above would be silently
        // dead; refuse to run with one.
        if let Some((name, _)) = ebpf.programs().find(|(_, p)| p.fd().is_err()) {
            anyhow::bail!("program {name} is in the eBPF object but the agent does not load it");
        }
        info!(pin_root = %pins.path().display(), "eBPF datapath loaded");
        Ok(Datapath { ebpf, pins, cgroups: Vec::new(), _logger: logger })
    }

    /// Attaches sock_ops to a cgroup v2 directory: sockets created by
    /// processes in it (and below it) get the in-kernel bypass.
    pub fn enroll_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let sockops: &mut SockOps = program(&mut self.ebpf, "sluice_sockops")?;
        sockops
            .attach(dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching sluice_sockops to cgroup {}", cgroup.display()))?;
        info!(cgroup = %cgroup.display(), "cgroup enrolled");
        self.cgroups.push(cgroup.to_owned());
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters> {
        read_counters(&self.pins)
    }

    /// Every program in the object with its kernel program id: all of them
    /// were accepted by the verifier.
    pub fn loaded_programs(&self) -> Vec<(String, u32)> {
        self.ebpf.programs().filter_map(|(name, p)| Some((name.to_owned(), p.info().ok()?.id()))).collect()
    }

    pub fn pin_root(&self) -> &PinRoot {
        &self.pins
    }

    /// Detaches every program and, when `unpin`, removes the pinned maps so
    /// nothing of Sluice is left in bpffs.
    pub fn shutdown(self, unpin: bool) -> Result<()> {
        let Datapath { ebpf, pins, cgroups, _logger } = self;
        drop(ebpf); // closes the link fds: the kernel detaches the programs
        drop(_logger);
        info!(cgroups = cgroups.len(), "eBPF programs detached");
        if unpin {
            pins.remove()?;
        }
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}
