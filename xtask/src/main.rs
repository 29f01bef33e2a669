//! Ferroscope's build tasks: `cargo xtask setup|build|run|test|dist|bench|cpython-layouts|matrix`.

mod bench;
mod dist;
mod layouts;
mod matrix;
mod setup;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Ferroscope's build, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the tools the build needs (nightly's rust-src, bpf-linker); skip what is there.
    Setup {
        /// Also install the tools the tests and the benchmark need (Go's pprof, py-spy).
        #[arg(long)]
        test: bool,
    },
    /// Build the eBPF object and the agent that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `ferroscope agent ARGS` (by default, profile this host into ./profiles).
    Run {
        /// Run an unoptimized agent (for debugging the agent itself; it costs the host more).
        #[arg(long)]
        debug: bool,
        /// Arguments for `ferroscope agent`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then run `ferroscope view ARGS` (by default, the page over ./profiles on
    /// http://127.0.0.1:9465/).
    View {
        /// Arguments for `ferroscope view`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run the unit tests, then the end-to-end tests against the real kernel (as root).
    Test,
    /// Build the static agent (x86_64-unknown-linux-musl, release, the eBPF object embedded)
    /// and pack it with the deployment files into target/dist/ferroscope-VERSION-x86_64-linux.tar.gz.
    Dist,
    /// Measure the agent's overhead and accuracy against running bare and py-spy.
    Bench(bench::Options),
    /// Regenerate profiler-userspace/src/cpython/layouts.rs, the struct layouts of CPython 3.7
    /// to 3.12, from each version's headers.
    ///
    /// For each minor version, a C program printing `offsetof`/`sizeof` of the fields Ferroscope
    /// reads is compiled with gcc against the headers of the newest patch release in --builds,
    /// and run. Versions without headers keep their entry. 3.13 is probed and printed only, to
    /// cross-check its `_Py_DebugOffsets`.
    CpythonLayouts(layouts::Options),
    /// Boot Debian's kernels (5.10, 6.1, 6.12, sid's newest) one after another under qemu with
    /// virtme-ng, run a command in each (by default `ferroscope kernel-check`), and print a
    /// table of how it ended on each; everything downloaded is kept in target/matrix/.
    Matrix(matrix::Options),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { test } => {
            setup::build_tools()?;
            if test {
                setup::test_tools()?;
            }
        }
        Task::Build { release } => {
            build(release)?;
        }
        Task::Run { debug, args } => exec(&build(!debug)?, "agent", args)?,
        Task::View { args } => exec(&build(true)?, "view", args)?,
        Task::Test => test()?,
        Task::Dist => {
            let tarball = dist::dist()?;
            let size = std::fs::metadata(&tarball)?.len();
            println!("{} ({size} bytes)", tarball.display());
        }
        Task::Bench(options) => bench::run(&options)?,
        Task::CpythonLayouts(options) => layouts::generate(&options)?,
        Task::Matrix(options) => matrix::run(&options)?,
    }
    Ok(())
}

/// Replaces this process with `ferroscope SUBCOMMAND ARGS`.
fn exec(agent: &Path, subcommand: &str, args: Vec<OsString>) -> Result<()> {
    let error = Command::new(agent).arg(subcommand).args(args).exec();
    bail!("running {}: {error}", agent.display())
}

/// The workspace's root directory.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where setup installs the project's own tools.
fn tools_dir() -> PathBuf {
    target_dir().join("tools")
}

/// Prints one line for a step, as `xtask: STEP`.
fn step(message: impl std::fmt::Display) {
    eprintln!("xtask: {message}");
}

/// Runs `command`, failing if it does not succeed.
fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Whether an executable `command` is on `PATH`.
fn on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|dir| {
        std::fs::metadata(dir.join(command)).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

/// The workspace's cargo, the one running xtask.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// `cargo +nightly`, through rustup, without the settings that pin the stable toolchain
/// running xtask.
fn nightly_cargo() -> Command {
    let mut command = Command::new("cargo");
    command.arg("+nightly");
    for pinned in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "CARGO_TARGET_DIR"] {
        command.env_remove(pinned);
    }
    command
}

/// Builds the eBPF object (always optimized: the verifier needs it) and the agent embedding
/// it; returns the agent binary.
fn build(release: bool) -> Result<PathBuf> {
    let linker = setup::build_tools()?;
    let object = build_ebpf(&linker)?;
    let profile = if release { "release" } else { "debug" };
    step(format!("building the agent ({profile})"));
    let mut command = cargo();
    command.args(["build", "-p", "profiler-userspace"]).env(EBPF_OBJECT_VAR, &object);
    if release {
        command.arg("--release");
    }
    run(&mut command)?;
    let agent = target_dir().join(profile).join("ferroscope");
    step(format!("built {}", agent.display()));
    Ok(agent)
}

/// The variable that tells profiler-userspace's build script where the eBPF object is.
const EBPF_OBJECT_VAR: &str = "FERROSCOPE_EBPF_OBJECT";

/// Builds profiler-ebpf for `bpfel-unknown-none` with nightly and `bpf-linker`.
fn build_ebpf(linker: &Path) -> Result<PathBuf> {
    step("building the eBPF object (release)");
    let crate_dir = workspace_root().join("profiler-ebpf");
    let linker_dir = linker.parent().unwrap();
    let path = std::env::join_paths(
        std::iter::once(linker_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    run(nightly_cargo()
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .current_dir(&crate_dir)
        .env("PATH", path))?;
    let object = ebpf_object();
    step(format!("built {}", object.display()));
    Ok(object)
}

/// The eBPF object `build_ebpf` makes.
fn ebpf_object() -> PathBuf {
    workspace_root().join("profiler-ebpf/target/bpfel-unknown-none/release/profiler-ebpf")
}

/// Setup, a release build, the unit tests, the end-to-end tests, then the kernel matrix (the
/// end-to-end tests of the known answers in each guest kernel); ends with one
/// `N passed, N failed` line for the whole run, after a line listing the tests skipped
/// because something they need is missing (only with `FERROSCOPE_ALLOW_SKIP=1`: without it
/// they fail).
fn test() -> Result<()> {
    setup::test_tools()?;
    // Each skipped test adds a line here (see e2e::skip_or_fail).
    let skip_log = target_dir().join("test-skips.log");
    match std::fs::remove_file(&skip_log) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            bail!("cannot remove {}: {error}", skip_log.display())
        }
        _ => {}
    }
    let agent = build(true)?;
    // The release tarball, for the test of the static agent. A failed build is that test's
    // failure, not the end of the run.
    let dist = dist::dist().map_err(|error| {
        step(format!("cargo xtask dist failed: {error:#}"));
        format!("{error:#}")
    });
    // Release for both, so the tests reuse the agent's build; no doctests (there are none).
    let targets = ["--lib", "--bins", "--tests", "--release", "--no-fail-fast"];
    step("running the unit tests");
    // Here, as root, the unit tests that load eBPF programs must run: not be left out.
    let unit = run_tests(
        cargo()
            .args(["test", "--workspace", "--exclude", "e2e"])
            .args(targets)
            .env(EBPF_OBJECT_VAR, ebpf_object())
            .env("FERROSCOPE_REQUIRE_ROOT_TESTS", "1")
            .env(e2e::SKIP_LOG_VAR, &skip_log),
    )?;
    step("running the end-to-end tests");
    let mut e2e = cargo();
    e2e.args(["test", "-p", "e2e"])
        .args(targets)
        .args(["--", "--test-threads=1"])
        .env("FERROSCOPE_BIN", &agent)
        .env(e2e::SKIP_LOG_VAR, &skip_log);
    match &dist {
        Ok(tarball) => e2e.env("FERROSCOPE_DIST", tarball),
        Err(error) => e2e.env("FERROSCOPE_DIST_ERROR", error),
    };
    let e2e = run_tests(&mut e2e)?;
    step("running the kernel matrix (docs/kernels.md)");
    let matrix = matrix::run_counting(&matrix::Options::test_plan()).unwrap_or_else(|error| {
        step(format!("the kernel matrix could not run: {error:#}"));
        (0, 1)
    });
    // `ferroscope-skip: TEST: WHAT IS MISSING (HOW TO INSTALL IT)`, one line per skip.
    let log = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let mut skipped: Vec<&str> = Vec::new();
    for (test, reason) in log.lines().filter_map(|line| line.strip_prefix("ferroscope-skip: ")?.split_once(": ")) {
        step(format!("skipped {test}: {reason}"));
        if !skipped.contains(&test) {
            skipped.push(test);
        }
    }
    if !skipped.is_empty() || std::env::var_os(e2e::ALLOW_SKIP_VAR).is_some_and(|allow| allow == "1") {
        // A skipped test counts as passed in the counts below, as the test harness counts it.
        let names = if skipped.is_empty() { "none".to_owned() } else { skipped.join(", ") };
        println!("xtask: {} skipped ({}=1, counted as passed): {names}", skipped.len(), e2e::ALLOW_SKIP_VAR);
    }
    let (passed, failed) = (unit.passed + e2e.passed + matrix.0, unit.failed + e2e.failed + matrix.1);
    if failed > 0 || !unit.success || !e2e.success {
        // A build that failed before its tests ran still counts as a failure.
        println!("{passed} passed, {} failed", failed.max(1));
        bail!("tests failed");
    }
    println!("{passed} passed, 0 failed");
    Ok(())
}

/// What one `cargo test` run reported.
struct TestCounts {
    passed: u64,
    failed: u64,
    success: bool,
}

/// Runs a `cargo test` command, passing its output through, and adds up the counts of its
/// `test result:` lines.
fn run_tests(command: &mut Command) -> Result<TestCounts> {
    use std::io::{BufRead, BufReader};
    let mut child =
        command.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("starting {command:?}"))?;
    let mut counts = TestCounts { passed: 0, failed: 0, success: false };
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                result
                    .split(';')
                    .find_map(|part| {
                        part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            counts.passed += count(" passed");
            counts.failed += count(" failed");
        }
    }
    counts.success = child.wait()?.success();
    Ok(counts)
}
