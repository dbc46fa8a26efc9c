//! Loads Sluice's kernel programs, pins their maps under the pin root and
//! attaches them. The object is embedded in the binary at build time
//! (agent/build.rs), so the agent never looks for a file on the node.
//!
//! Maps are pinned by path through `EbpfLoader::map_pin_path`: on first start
//! the loader creates and pins them, and a restarted agent re-opens the same
//! pinned maps instead of creating empty ones, so state survives restarts.

mod counters;
mod links;
mod log;
mod pins;
mod splice;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agent_common::{Config, IpKey, PodInfo, WorkloadInfo};
use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, SockHash},
    programs::{
        links::FdLink,
        tc::{self, NlOptions, TcAttachOptions},
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SchedClassifier, SkMsg, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};

use crate::netns::Netns;
use tracing::info;

pub use counters::{read_counters, Counters, DatapathCollector};
pub use pins::{ensure_bpffs, PinRoot};
pub use splice::{ip_words, sock_key, SpliceMaps};

/// Where the tc ingress filter sits on a pod's eth0 (`tc filter show dev
/// eth0 ingress` lists it as pref 1337, handle 0x1).
const TC_PRIORITY: u16 = 1337;
const TC_HANDLE: tc::TcHandle = tc::TcHandle::new(0, 1);

/// The kernel object, built from agent-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SLUICE_EBPF_OBJECT"));

/// Names of the maps in the object, and the file each is pinned as.
pub const PINNED_MAPS: [(&str, &str); 12] = [
    ("SOCK_PAIRS", "sock_pairs"),
    ("COUNTERS", "counters"),
    ("ENROLLED", "enrolled"),
    ("ORIG_DST_BY_COOKIE", "orig_dst_by_cookie"),
    ("ORIG_DST_BY_TUPLE", "orig_dst_by_tuple"),
    ("LISTENERS", "listeners"),
    ("SPLICE_COUNTS", "splice_counts"),
    ("SPLICE_WRITTEN", "splice_written"),
    ("SPLICE_ROUTES", "splice_routes"),
    ("SPLICE_SERVICES", "splice_services"),
    ("WORKLOADS", "workloads"),
    ("CONFIG", "config"),
];

/// Names of the programs in the object.
pub const PROGRAMS: [&str; 6] =
    ["sluice_sockops", "sluice_sk_msg", "sluice_connect4", "sluice_connect6", "sluice_getsockopt", "sluice_tc_ingress"];

/// Attachments that detach when dropped (aya's owned link types).
pub struct Links(#[allow(dead_code)] Vec<Box<dyn std::any::Any + Send + Sync>>); // held only to be dropped

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

        load_all(&mut ebpf)?;
        // After loading: the programs now hold the log map, so the logger may
        // be dropped (no runtime, as in `sluice probe`) without breaking them.
        let logger = log::LogForwarder::start(&mut ebpf);

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

    /// Outbound capture and splice counting for one pod's cgroup:
    /// connect4/connect6 and sock_ops, on links pinned per pod (links.rs), so
    /// capture stays while no agent runs; links a previous agent pinned get
    /// this agent's programs swapped in. `Single` means flags 0: with
    /// bpf_link (5.7+) links to one cgroup always stack, and
    /// `BPF_F_ALLOW_MULTI` is rejected with EINVAL.
    pub fn attach_pod_cgroup(&mut self, cgroup: &Path, netns_cookie: u64) -> Result<()> {
        let dir = links::pod_dir(&self.pins, netns_cookie);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the link pin directory {}", dir.display()))?;
        let cg = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        for name in ["sluice_connect4", "sluice_connect6", "sluice_sockops"] {
            let pin = dir.join(name);
            let prog = self.ebpf.program_mut(name).with_context(|| format!("the eBPF object has no program {name}"))?;
            if pin.exists() {
                let fd = std::os::fd::AsFd::as_fd(prog.fd().with_context(|| format!("{name} is not loaded"))?);
                match links::update_pinned(&pin, fd) {
                    Ok(()) => continue,
                    // A link whose cgroup is gone: start over.
                    Err(e) => {
                        tracing::debug!(error = format!("{e:#}"), pin = %pin.display(), "replacing a stale pinned link");
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
            let link = match prog {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single)?;
                    FdLink::try_from(p.take_link(id)?)?
                }
                aya::programs::Program::SockOps(p) => {
                    let id = p.attach(&cg, CgroupAttachMode::Single)?;
                    FdLink::try_from(p.take_link(id)?)?
                }
                _ => anyhow::bail!("program {name} has an unexpected type"),
            };
            link.pin(&pin).with_context(|| {
                format!("pinning {name}'s link for cgroup {} at {}", cgroup.display(), pin.display())
            })?;
        }
        Ok(())
    }

    /// Removes a pod's pinned cgroup links, which detaches its programs.
    pub fn detach_pod_cgroup(&mut self, netns_cookie: u64) -> Result<()> {
        let dir = links::pod_dir(&self.pins, netns_cookie);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing the pinned links in {}", dir.display())),
        }
    }

    /// The agent's own cgroup: sock_ops (so the agent's end of each captured
    /// connection joins SOCK_PAIRS) and getsockopt (SO_ORIGINAL_DST).
    pub fn attach_agent_cgroup(&mut self, cgroup: &Path) -> Result<Links> {
        let dir = File::open(cgroup).with_context(|| format!("opening the agent's cgroup {}", cgroup.display()))?;
        let sockops: &mut SockOps = program(&mut self.ebpf, "sluice_sockops")?;
        let id = sockops.attach(&dir, CgroupAttachMode::Single).context("attaching sluice_sockops to the agent")?;
        let first: Box<dyn std::any::Any + Send + Sync> = Box::new(sockops.take_link(id)?);
        let getsockopt: &mut CgroupSockopt = program(&mut self.ebpf, "sluice_getsockopt")?;
        let id =
            getsockopt.attach(&dir, CgroupAttachMode::Single).context("attaching sluice_getsockopt to the agent")?;
        Ok(Links(vec![first, Box::new(getsockopt.take_link(id)?)]))
    }

    /// Inbound capture: the tc ingress classifier on `iface` inside `netns`
    /// (netlink attach, with a clsact qdisc, works from 5.7 on; aya cannot
    /// reach another netns, so the attach runs after setns).
    pub fn attach_tc(&mut self, netns: &Netns, iface: &str) -> Result<Links> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, "sluice_tc_ingress")?;
        let link = netns.run(|| {
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                // EEXIST: a clsact qdisc is already there (ours or the CNI's).
                if !format!("{e:?}").contains("17") && !e.to_string().contains("exists") {
                    return Err(std::io::Error::other(format!("adding clsact on {iface}: {e}")));
                }
            }
            // One filter per pod at a fixed priority and handle: a new
            // agent replaces the old one's filter in place (atomically, so
            // no SYN finds the pod without it), instead of stacking one
            // more per restart, and whoever removes capture knows where it is.
            let options = NlOptions { priority: TC_PRIORITY, handle: TC_HANDLE, ..Default::default() };
            let id = match prog.attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::Netlink(options)) {
                Ok(id) => id,
                Err(e) if format!("{e:?}").contains("17") || e.to_string().contains("exists") => {
                    let old =
                        tc::SchedClassifierLink::attached(iface, TcAttachType::Ingress, TC_PRIORITY, TC_HANDLE, None)
                            .map_err(|e| std::io::Error::other(format!("finding the tc filter on {iface}: {e}")))?;
                    prog.attach_to_link(old)
                        .map_err(|e| std::io::Error::other(format!("replacing the tc filter on {iface}: {e}")))?
                }
                Err(e) => return Err(std::io::Error::other(format!("attaching tc ingress on {iface}: {e}"))),
            };
            prog.take_link(id).map_err(|e| std::io::Error::other(e.to_string()))
        })?;
        Ok(Links(vec![Box::new(NetnsBound { netns: netns.clone_handle()?, link: Some(link) })]))
    }

    /// Marks a pod's netns as enrolled, with the addresses capture redirects to.
    pub fn enroll_netns(&mut self, cookie: u64, pod: PodInfo) -> Result<()> {
        let mut map: BpfHashMap<_, u64, PodInfo> =
            BpfHashMap::try_from(self.ebpf.map_mut("ENROLLED").context("no ENROLLED map")?)?;
        map.insert(cookie, pod, 0).context("writing ENROLLED")
    }

    /// Mirrors an enrolled pod's address in WORKLOADS (for operators).
    pub fn set_workload(&mut self, ip: IpKey, info: WorkloadInfo) -> Result<()> {
        let mut map: BpfHashMap<_, IpKey, WorkloadInfo> =
            BpfHashMap::try_from(self.ebpf.map_mut("WORKLOADS").context("no WORKLOADS map")?)?;
        map.insert(ip, info, 0).context("writing WORKLOADS")
    }

    pub fn remove_workload(&mut self, ip: IpKey) -> Result<()> {
        let mut map: BpfHashMap<_, IpKey, WorkloadInfo> =
            BpfHashMap::try_from(self.ebpf.map_mut("WORKLOADS").context("no WORKLOADS map")?)?;
        match map.remove(&ip) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from WORKLOADS"),
        }
    }

    /// Writes the programs' settings (`agent_common::CONFIG_*` flags).
    pub fn set_config(&mut self, config: Config) -> Result<()> {
        let mut map: Array<_, Config> = Array::try_from(self.ebpf.map_mut("CONFIG").context("no CONFIG map")?)?;
        map.set(0, config, 0).context("writing CONFIG")
    }

    pub fn unenroll_netns(&mut self, cookie: u64) -> Result<()> {
        let mut map: BpfHashMap<_, u64, PodInfo> =
            BpfHashMap::try_from(self.ebpf.map_mut("ENROLLED").context("no ENROLLED map")?)?;
        match map.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from ENROLLED"),
        }
    }

    /// Points tc's `bpf_sk_assign` for `ip` at a 15006 listener.
    pub fn set_listener(&mut self, ip: IpKey, listener: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let mut map: SockHash<_, IpKey> =
            SockHash::try_from(self.ebpf.map_mut("LISTENERS").context("no LISTENERS map")?)?;
        map.insert(ip, std::os::fd::AsRawFd::as_raw_fd(&listener), 0).context("writing LISTENERS")
    }

    pub fn remove_listener(&mut self, ip: IpKey) -> Result<()> {
        let mut map: SockHash<_, IpKey> =
            SockHash::try_from(self.ebpf.map_mut("LISTENERS").context("no LISTENERS map")?)?;
        match map.remove(&ip) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from LISTENERS"),
        }
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

/// Loads every program of the object, so the verifier has judged all of
/// them before anything is attached.
fn load_all(ebpf: &mut Ebpf) -> Result<()> {
    program::<SockOps>(ebpf, "sluice_sockops")?.load().context("verifier rejected sluice_sockops")?;
    program::<SkMsg>(ebpf, "sluice_sk_msg")?.load().context("verifier rejected sluice_sk_msg")?;
    for name in ["sluice_connect4", "sluice_connect6"] {
        program::<CgroupSockAddr>(ebpf, name)?.load().with_context(|| format!("verifier rejected {name}"))?;
    }
    program::<CgroupSockopt>(ebpf, "sluice_getsockopt")?.load().context("verifier rejected sluice_getsockopt")?;
    program::<SchedClassifier>(ebpf, "sluice_tc_ingress")?.load().context("verifier rejected sluice_tc_ingress")?;
    Ok(())
}

/// A tc link whose detach (netlink) must run inside its netns.
struct NetnsBound {
    netns: Netns,
    link: Option<aya::programs::tc::SchedClassifierLink>,
}

impl Drop for NetnsBound {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            // If the netns is gone, so is the qdisc and the filter with it.
            let _ = self.netns.run(move || {
                drop(link);
                Ok(())
            });
        }
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
