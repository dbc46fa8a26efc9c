//! `cargo xtask vm-test [--kernel 5.10|6.1|6.12|all]`: the kernel matrix.
//!
//! Each pinned Debian kernel ([`kernels`]) boots under qemu with a small
//! initramfs ([`initramfs`]) that runs the checks of [`checks`] and reports
//! each on the console; the host compares what happened with what each
//! kernel is expected to do, prints a table and writes it to
//! `target/vm-test/matrix.md` (`cargo xtask vm-test --print` shows the last
//! one, ready for the README).

mod build;
mod checks;
mod fetch;
mod initramfs;
mod kernels;
mod modules;
mod qemu;
mod report;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{setup, step, target_dir};
use checks::{Check, Run, CHECKS};
use initramfs::GuestCheck;
use kernels::Kernel;
use report::{KernelResult, Row};

pub struct Options {
    /// `5.10`, `6.1`, `6.12`, a comma-separated list of those, or `all`.
    pub kernel: String,
    /// Seconds each kernel gets from qemu start to power-off.
    pub timeout: u64,
    /// Kernels booted at the same time.
    pub jobs: usize,
    /// Only print the last run's matrix.
    pub print: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    let out_dir = target_dir().join("vm-test");
    if opts.print {
        let file = out_dir.join("matrix.md");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("no matrix yet at {}: run cargo xtask vm-test first", file.display()))?;
        print!("{text}");
        return Ok(());
    }
    let kernels = kernels::select(&opts.kernel).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    setup::run()?;
    std::fs::create_dir_all(&out_dir)?;

    // What runs in the guest, and what is missing from the tree (a failure:
    // the table shows it, and the run fails once every kernel has run).
    let plan = build::plan(CHECKS)?;
    let built = build::build(&plan)?;
    let sluice_help = Command::new(&built.sluice).arg("--help").output().context("sluice --help")?;
    let sluice_help = String::from_utf8_lossy(&sluice_help.stdout).into_owned();
    let mut guest_checks = Vec::new();
    let mut missing = Vec::new();
    for check in CHECKS {
        match resolve(check, &sluice_help, &built) {
            Ok(argv) => {
                guest_checks.push(GuestCheck { name: check.name.into(), timeout_secs: check.timeout_secs, argv })
            }
            Err(reason) => missing.push((check.name, reason)),
        }
    }
    step("vm-test: building the initramfs");
    let work = out_dir.join("initramfs");
    std::fs::create_dir_all(&work)?;
    let tests: Vec<(String, PathBuf)> = built.tests.iter().map(|(t, p)| (t.clone(), p.clone())).collect();
    let common = initramfs::build_common(
        &work,
        &initramfs::Contents { sluice: &built.sluice, peer: &built.peer, tests, checks: &guest_checks },
    )?;

    // Fetch and pack every kernel first (apt runs one at a time), then boot.
    let mut fetcher = fetch::Fetcher::new()?;
    let mut ready = Vec::new();
    let mut results: Vec<(usize, KernelResult)> = Vec::new();
    for (i, k) in kernels.iter().enumerate() {
        // Nothing of an earlier run may pass for this one's.
        let _ = std::fs::remove_dir_all(out_dir.join(k.label));
        match prepare(&mut fetcher, k, &work, &common) {
            Ok(p) => ready.push((i, *k, p)),
            Err(e) => results.push((i, KernelResult::NotBooted(format!("{e:#}")))),
        }
    }
    let timeout = Duration::from_secs(opts.timeout);
    let jobs = opts.jobs.max(1);
    for batch in ready.chunks(jobs) {
        let booted: Vec<(usize, KernelResult)> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|(i, k, p)| {
                    let dir = out_dir.join(k.label);
                    s.spawn(move || (*i, boot_one(k, p, &dir, timeout)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("boot thread panicked")).collect()
        });
        results.extend(booted);
    }
    results.sort_by_key(|(i, _)| *i);

    let rows: Vec<Row> =
        results.into_iter().map(|(i, result)| report::evaluate(kernels[i], result, CHECKS, &missing)).collect();
    let matrix = report::markdown(&rows, CHECKS, &missing, &commit());
    std::fs::write(out_dir.join("matrix.md"), &matrix)?;
    for row in &rows {
        report::print_problems(row, CHECKS, &out_dir.join(row.kernel.label));
    }
    println!("\n{matrix}");
    eprintln!(
        "==> vm-test: {} kernel(s) in {:.0} s; table in {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        out_dir.join("matrix.md").display()
    );
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
        bail!(
            "vm-test: check(s) {} are MISSING: their test target or subcommand is not in the tree; a check of a \
             landed feature must run (fix the target name in xtask/src/vm/checks.rs or restore the test)",
            names.join(", ")
        );
    }
    let bad: Vec<&str> = rows.iter().filter(|r| !r.ok()).map(|r| r.kernel.label).collect();
    if !bad.is_empty() {
        bail!("vm-test: kernel(s) {} did not do what the check list expects (see above)", bad.join(", "));
    }
    Ok(())
}

/// The guest command of a check, or why it is missing from this tree.
fn resolve(check: &Check, sluice_help: &str, built: &build::Built) -> Result<Vec<String>, String> {
    match &check.run {
        Run::Sluice { subcommand, args } => {
            if !lists_subcommand(sluice_help, subcommand) {
                return Err(format!("`sluice {subcommand}` is not in `sluice --help`"));
            }
            let mut argv = vec![initramfs::GUEST_SLUICE.to_owned(), subcommand.to_string()];
            argv.extend(args.iter().map(|a| a.to_string()));
            Ok(argv)
        }
        Run::Test { package, target, args } => {
            if !built.tests.contains_key(*target) {
                return Err(format!(
                    "package {package} has no test target {target} (cargo metadata), so nothing was built to run"
                ));
            }
            let mut argv = vec![format!("{}/{target}", initramfs::GUEST_TESTS)];
            argv.extend(args.iter().map(|a| a.to_string()));
            Ok(argv)
        }
    }
}

/// Whether clap's `--help` lists `name` among the subcommands (`  name  About...`).
fn lists_subcommand(help: &str, name: &str) -> bool {
    let mut in_commands = false;
    for line in help.lines() {
        if !line.starts_with(' ') {
            in_commands = line.trim_end() == "Commands:";
        } else if in_commands && line.split_whitespace().next() == Some(name) {
            return true;
        }
    }
    false
}

/// A kernel ready to boot.
struct Prepared {
    vmlinuz: PathBuf,
    initrd: PathBuf,
    modules: Vec<String>,
}

fn prepare(fetcher: &mut fetch::Fetcher, k: &Kernel, work: &Path, common: &Path) -> Result<Prepared> {
    let unpacked = fetcher.ensure(k)?;
    let modules =
        modules::closure(&unpacked.modules).with_context(|| format!("kernel {}: collecting modules", k.label))?;
    let names = modules.iter().map(|m| m.name.clone()).collect();
    let part = initramfs::build_modules(work, k.label, &unpacked.release, &modules)?;
    let initrd = work.join(format!("initrd-{}.gz", k.label));
    initramfs::concat(&[common, &part], &initrd)?;
    Ok(Prepared { vmlinuz: unpacked.vmlinuz, initrd, modules: names })
}

fn boot_one(k: &Kernel, p: &Prepared, dir: &Path, timeout: Duration) -> KernelResult {
    let _ = std::fs::create_dir_all(dir);
    step(&format!("vm-test: booting {} {} (modules: {})", k.label, k.version, p.modules.join(" ")));
    match qemu::boot(&p.vmlinuz, &p.initrd, &dir.join("console.log"), timeout) {
        Ok(boot) => {
            eprintln!(
                "==> vm-test: {} finished in {:.0} s (qemu status {:?})",
                k.label,
                boot.elapsed.as_secs_f64(),
                boot.status
            );
            KernelResult::Booted(boot, timeout)
        }
        Err(e) => KernelResult::NotBooted(format!("{e:#}")),
    }
}

/// `git describe`-like id of the tree the matrix ran on.
fn commit() -> String {
    let out = Command::new("git").current_dir(crate::workspace()).args(["rev-parse", "--short=12", "HEAD"]).output();
    let mut id = out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let dirty = Command::new("git")
        .current_dir(crate::workspace())
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        id = id.map(|i| format!("{i}+changes"));
    }
    id.unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_subcommands_in_clap_help() {
        let help = "Sluice node agent\n\nUsage: sluice <COMMAND>\n\nCommands:\n  run      Run the node agent\n  \
                    inspect  Print counters\n  help     Print this message\n\nOptions:\n  -h, --help  Print help\n";
        assert!(super::lists_subcommand(help, "run"));
        assert!(super::lists_subcommand(help, "inspect"));
        assert!(!super::lists_subcommand(help, "probe"));
        assert!(!super::lists_subcommand(help, "-h,"));
    }
}
