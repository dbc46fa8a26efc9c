//! `cargo xtask fuzz [--seconds N] [--target NAME]...`: builds the cargo-fuzz
//! project in fuzz/ and runs each libFuzzer target for N seconds, starting
//! from its seed corpus (fuzz/corpus/<target>/, never written to; new inputs
//! go to fuzz/target/corpus/<target>/). Prints executions and coverage per
//! target and fails when any target crashed, hung or leaked, naming the saved
//! input (fuzz/artifacts/<target>/) and the command that replays it.
//!
//! cargo-fuzz passes nightly-only flags to rustc (`-Zsanitizer=address`);
//! the project's toolchain is stable, so the build runs with
//! `RUSTC_BOOTSTRAP=1`, which lets stable rustc accept them. The stable
//! toolchain ships the ASan runtime (librustc-stable_rt.asan.a); libFuzzer
//! itself is C++, built by libfuzzer-sys with the machine's `c++`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{ebpf, exec, setup, step, workspace};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub struct Options {
    pub seconds: u64,
    pub targets: Vec<String>,
    pub sanitizer: String,
}

/// One target's run, from libFuzzer's own final report.
#[derive(Default)]
struct Outcome {
    target: String,
    seconds: f64,
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    cov: Option<u64>,
    features: Option<u64>,
    corpus: Option<String>,
    new_units: Option<u64>,
    peak_rss_mb: Option<u64>,
    failure: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    // The agent's build script builds the eBPF programs: same toolchain as
    // every other build.
    setup::run()?;
    cargo_fuzz()?;
    cxx()?;
    let dir = workspace().join("fuzz");
    let all = list_targets(&dir)?;
    let targets: Vec<String> = if opts.targets.is_empty() { all.clone() } else { opts.targets.clone() };
    for t in &targets {
        if !all.contains(t) {
            bail!("fuzz: no target {t:?}; targets: {}", all.join(", "));
        }
    }

    step(&format!("fuzz: building {} targets (release, debug assertions, sanitizer {})", all.len(), opts.sanitizer));
    let started = Instant::now();
    let mut build = cargo_fuzz_cmd(&dir, "build", &opts.sanitizer);
    exec("fuzz: cargo fuzz build", &mut build)?;
    eprintln!("==> fuzz: built in {:.0} s", started.elapsed().as_secs_f64());

    let logs = dir.join("target/fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for t in &targets {
        step(&format!("fuzz: {t} for {} s", opts.seconds));
        let outcome = run_target(&dir, t, opts, &logs.join(format!("{t}.log")))?;
        eprintln!("    {}", one_line(&outcome));
        outcomes.push(outcome);
    }

    let table = table(&outcomes, opts);
    println!("{table}");
    let summary = dir.join("target/fuzz-summary.md");
    std::fs::write(&summary, &table).with_context(|| format!("writing {}", summary.display()))?;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if !failed.is_empty() {
        for o in &failed {
            eprintln!("fuzz: {}: {}", o.target, o.failure.as_deref().unwrap_or_default());
        }
        bail!(
            "fuzz: {} of {} targets failed: {}",
            failed.len(),
            outcomes.len(),
            failed.iter().map(|o| o.target.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// `cargo fuzz <sub>` in fuzz/, with the flags every build and run shares
/// (they must match, or `run` rebuilds everything).
fn cargo_fuzz_cmd(dir: &Path, sub: &str, sanitizer: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .args(["fuzz", sub, "--release", "--debug-assertions", "--sanitizer", sanitizer])
        .env("RUSTC_BOOTSTRAP", "1")
        // fuzz/ has its own target dir; a CARGO_TARGET_DIR meant for the
        // workspace would mix instrumented and plain builds.
        .env_remove("CARGO_TARGET_DIR");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(ebpf::cargo_bin_dir());
    if let Ok(joined) = std::env::join_paths(dirs) {
        cmd.env("PATH", joined);
    }
    cmd
}

/// Runs the binary `cargo fuzz build` made, not `cargo fuzz run`: that would
/// rebuild first whenever a source changed since, and the time would go to
/// the compiler instead of the target.
fn run_target(dir: &Path, target: &str, opts: &Options, log: &Path) -> Result<Outcome> {
    // cargo fuzz builds for the host triple: fuzz/target/<triple>/release/.
    let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let bin = dir.join("target").join(host).join("release").join(target);
    let seeds = dir.join("corpus").join(target);
    let work = dir.join("target/corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&work, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&bin);
    cmd.current_dir(dir).arg(&work);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.args([
        format!("-artifact_prefix={}/", artifacts.display()),
        format!("-max_total_time={}", opts.seconds),
        // The harnesses report their own hangs after 5-10 s with a message
        // naming the phase; this is the backstop.
        "-timeout=30".into(),
        "-max_len=65536".into(),
        "-print_final_stats=1".into(),
    ]);
    // As cargo fuzz run sets it: Rust's std is not instrumented, and its
    // globals would otherwise be reported as ODR violations.
    let asan = std::env::var("ASAN_OPTIONS").map(|o| format!("{o}:")).unwrap_or_default();
    cmd.env("ASAN_OPTIONS", format!("{asan}detect_odr_violation=0"));
    cmd.stdout(Stdio::from(log_file.try_clone()?)).stderr(Stdio::from(log_file));
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("fuzz: could not start {}", bin.display()))?;
    remove_scratch();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut outcome = parse_log(target, &text);
    outcome.seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let artifact = text
            .lines()
            .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_string()))
            .next_back();
        let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        eprintln!("---- last lines of {} ----\n{}\n----", log.display(), tail.join("\n"));
        outcome.failure = Some(match artifact {
            Some(a) => format!(
                "crashed ({status}); input saved as {a}; replay: {} {a} (SLUICE_FUZZ_DEBUG=1 says what the harness did); log: {}",
                bin.display(),
                log.display()
            ),
            None => format!("{} exited with {status}; log: {}", bin.display(), log.display()),
        });
    }
    Ok(outcome)
}

/// The conf dirs the cni_conflist target leaves (one per process; libFuzzer
/// exits without unwinding) and the cni_plugin target's log.
fn remove_scratch() {
    for base in [Path::new("/dev/shm").to_path_buf(), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&base) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("sluice-fuzz-cni-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join("sluice-fuzz"));
}

/// Reads libFuzzer's `stat::` lines and its last status line
/// (`#N DONE cov: C ft: F corp: U/S ...`).
fn parse_log(target: &str, text: &str) -> Outcome {
    let mut o = Outcome { target: target.to_string(), ..Default::default() };
    let stat = |name: &str| -> Option<u64> {
        text.lines().filter_map(|l| l.strip_prefix(name)).filter_map(|v| v.trim().parse().ok()).next_back()
    };
    o.execs = stat("stat::number_of_executed_units:");
    o.execs_per_sec = stat("stat::average_exec_per_sec:");
    o.new_units = stat("stat::new_units_added:");
    o.peak_rss_mb = stat("stat::peak_rss_mb:");
    if let Some(line) = text.lines().rfind(|l| l.starts_with('#') && l.contains(" cov: ")) {
        let field = |key: &str| -> Option<&str> {
            let mut words = line.split_whitespace();
            words.find(|w| *w == key)?;
            words.next()
        };
        o.cov = field("cov:").and_then(|v| v.parse().ok());
        o.features = field("ft:").and_then(|v| v.parse().ok());
        o.corpus = field("corp:").map(str::to_string);
    }
    o
}

fn show<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), T::to_string)
}

fn one_line(o: &Outcome) -> String {
    format!(
        "{}: {} execs ({}/s) in {:.0} s, cov {} ft {} corpus {}, {}",
        o.target,
        show(&o.execs),
        show(&o.execs_per_sec),
        o.seconds,
        show(&o.cov),
        show(&o.features),
        show(&o.corpus),
        if o.failure.is_some() { "FAILED" } else { "no crash" }
    )
}

fn table(outcomes: &[Outcome], opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| target | seconds | execs | execs/s | cov | features | corpus (units/bytes) | new units | peak RSS MB | result |");
    let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for o in outcomes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            o.target,
            opts.seconds,
            show(&o.execs),
            show(&o.execs_per_sec),
            show(&o.cov),
            show(&o.features),
            show(&o.corpus),
            show(&o.new_units),
            show(&o.peak_rss_mb),
            if o.failure.is_some() { "CRASH" } else { "no crash" }
        );
    }
    s
}

fn list_targets(dir: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .current_dir(dir)
        .args(["fuzz", "list"])
        .output()
        .context("fuzz: could not run `cargo fuzz list`")?;
    if !out.status.success() {
        bail!("fuzz: `cargo fuzz list` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// cargo-fuzz from crates.io, pinned, installed when missing.
fn cargo_fuzz() -> Result<()> {
    let bin = ebpf::cargo_bin_dir().join("cargo-fuzz");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    step(&format!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 2 minutes)"));
    exec(
        "fuzz: cargo install cargo-fuzz",
        Command::new("cargo").args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]),
    )
}

/// libfuzzer-sys compiles libFuzzer (C++) with the `cc` crate.
fn cxx() -> Result<()> {
    let found = Command::new("c++").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if found.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    if !setup::nix_is_root() {
        bail!("fuzz: no C++ compiler (c++) to build libFuzzer; install Debian's g++");
    }
    step("fuzz: installing Debian's g++ (libFuzzer is C++)");
    exec(
        "fuzz: apt-get install g++",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "g++"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
