//! `cargo xtask matrix`: boots Debian's kernels one after another under qemu with virtme-ng,
//! runs one command in each, and prints a table of how it ended on each kernel.
//!
//! The guest's root is the host's own filesystem (over 9p, read-only, with writable overlays
//! that vanish with the guest), so the command runs what was built on the host, from the
//! repository's root, as root. qemu emulates the CPU (TCG): KVM hangs the boot here, and a
//! boot with a trivial command takes 35 to 90 s.
//!
//! By default each guest runs the test plan: `ferroscope kernel-check`, then end-to-end tests
//! of the known answers (`GUEST_TESTS`) against the real agent and real CPython processes,
//! and the table of what works where is written into docs/kernels.md. `cargo xtask test`
//! runs that plan after the tests on the host's own kernel.
//!
//! Everything downloaded or made lives under target/matrix/: virtme-ng's venv, apt's lists of
//! each Debian suite, the kernels' packages and the kernels unpacked, and each kernel's output
//! in results/KERNEL.log (its kernel's console in KERNEL.console.log). A second run downloads
//! nothing; `rm -r target/matrix/apt/sid` makes the next run take sid's newest kernel.
//!
//! One file of over 600 lines on purpose: it is one procedure (find a kernel, fetch it, boot
//! it, read the outcome, write the table) whose steps share its constants and nothing else.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{setup, step, target_dir, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// The kernels to boot: 5.10, 6.1, 6.12, sid (the newest of Debian unstable) and host
    /// (the running kernel, if /boot has its image).
    #[arg(long, value_delimiter = ',', default_value = "5.10,6.1,6.12,sid,host")]
    kernels: Vec<String>,
    /// Seconds each guest may take, boot included, before it is killed.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The command each guest runs (words joined with spaces, run by bash, as root, in the
    /// repository's root); by default the test plan (kernel-check and the end-to-end tests
    /// of the known answers), which needs `cargo xtask build --release` first.
    #[arg(last = true)]
    command: Vec<String>,
}

impl Options {
    /// The whole matrix with the test plan, as `cargo xtask test` runs it.
    pub fn test_plan() -> Self {
        let kernels = KERNELS.iter().map(|kernel| kernel.name.to_owned()).chain([HOST.to_owned()]).collect();
        Options { kernels, timeout: 900, command: Vec::new() }
    }
}

/// The end-to-end tests each guest runs: (test binary, tests). Kernels before 5.17 run the
/// first only: without `bpf_loop` the agent does not start, and that test checks that it
/// says why (docs/kernels.md). Native unwinding is checked by kernel-check's loading of the
/// sampler only: under TCG the unwind tables load after the short test programs have run.
const GUEST_TESTS: [(&str, &[&str]); 4] = [
    ("kernel", &["every_program_loads_with_a_margin_on_this_kernel", "the_agent_runs_every_dimension_or_says_why_not"]),
    ("known_split", &["known_split_on_pyenv_python_3_11_7_shared_libpython"]),
    ("wall_time", &["waiting_threads_add_up_to_their_wall_time_with_their_reasons"]),
    ("memory", &["allocated_and_live_bytes_by_function_on_3_11"]),
];

/// A Debian kernel of the matrix: its name for `--kernels`, its suite, and its package
/// (`None`: the suite's newest amd64 kernel).
struct Kernel {
    name: &'static str,
    suite: &'static str,
    package: Option<&'static str>,
}

/// The generic flavours: `-cloud` kernels have no 9p, which virtme-ng's root needs.
const KERNELS: [Kernel; 4] = [
    Kernel { name: "5.10", suite: "bullseye", package: Some("linux-image-5.10.0-32-amd64") },
    Kernel { name: "6.1", suite: "bookworm", package: Some("linux-image-6.1.0-47-amd64") },
    Kernel { name: "6.12", suite: "trixie", package: Some("linux-image-6.12.107+deb13-amd64-unsigned") },
    Kernel { name: "sid", suite: "sid", package: None },
];

/// The name of the host's running kernel in `--kernels`.
const HOST: &str = "host";

const VIRTME_NG_VERSION: &str = "1.42";

/// The guest's size: 2 CPUs as on this machine, and room for the agent's maps.
const CPUS: &str = "2";
const MEMORY: &str = "4G";

/// Run in the guest before the command. The command's stderr joins its stdout, so that the
/// host's stderr carries the guest's kernel console only. virtme-ng's init mounts proc,
/// sysfs (with /sys/kernel/btf/vmlinux), debugfs, tracefs and cgroup2, but not the BPF
/// filesystem that systemd mounts on a real host (looked up in /proc/mounts: on 5.10,
/// `mountpoint` takes the bare directory for a mount point). The line it prints tells which
/// kernel answered.
const GUEST_PREAMBLE: &str = "exec 2>&1
grep -q ' /sys/fs/bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf
echo \"matrix: guest kernel $(uname -r), $(nproc) CPUs, BTF $(ls /sys/kernel/btf/vmlinux 2>&1)\"";

/// Said of a guest that printed not even the preamble's line.
const NO_ANSWER: &str = " (no answer from the guest)";

/// The prefix of the preamble's line, which the summary reads the kernel's release from.
const GUEST_LINE: &str = "matrix: guest kernel ";

/// The Debian packages the host needs, as `(command, package, why)`.
const HOST_TOOLS: [(&str, &str, &str); 5] = [
    ("qemu-system-x86_64", "qemu-system-x86", "boots the kernels"),
    ("depmod", "kmod", "virtme-ng indexes the unpacked kernels' modules"),
    ("busybox", "busybox-static", "virtme-ng's initramfs"),
    // Without udevd in the guest there is no /dev/virtio-ports/: virtme-ng then runs the
    // command on the serial console, which it does not show, and loses its exit status.
    ("udevadm", "udev", "names the guest's ports for the command's output and exit status"),
    ("file", "file", "virtme-ng reads a kernel image's release with it"),
];

/// How the command ended on one kernel.
struct Outcome {
    kernel: String,
    /// The release the guest reported, or the expected one and why there is no answer.
    release: String,
    /// `exit N`, `timed out`, `skipped: ...`, ...
    status: String,
    /// From starting qemu to its end: boot, command and power-off.
    seconds: Option<f64>,
    failed: bool,
    /// The end-to-end tests that passed and failed in the guest.
    tests: (u64, u64),
}

impl Outcome {
    /// The guest ended without its command's exit status (virtme-ng's 255: a kernel
    /// panic, or qemu gone). A guest that timed out is not booted again: that costs
    /// the whole timeout once more.
    fn lost(&self) -> bool {
        self.status == "exit 255"
    }
}

/// Prints the end of a guest's kernel console, where a panic or an oops says why it was lost.
fn print_console_tail(name: &str) {
    let console = fs::read_to_string(results_dir().join(format!("{name}.console.log"))).unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    for line in &lines[lines.len().saturating_sub(CONSOLE_TAIL)..] {
        println!("matrix: {name}: console: {line}");
    }
}

/// Lines of a lost guest's console printed.
const CONSOLE_TAIL: usize = 40;

/// A kernel image ready to boot, and its release (`uname -r`).
struct Image {
    vmlinuz: PathBuf,
    release: String,
}

/// Sets up the host, then boots each kernel in turn and runs the command; fails if it failed
/// on any kernel.
pub fn run(options: &Options) -> Result<()> {
    let (_, failed) = run_counting(options)?;
    if failed > 0 {
        bail!("{failed} tests or commands failed in the matrix");
    }
    Ok(())
}

/// Runs the matrix; returns the tests that passed and failed in all guests, a kernel whose
/// command failed with no test failing counting as one failure.
pub fn run_counting(options: &Options) -> Result<(u64, u64)> {
    for name in &options.kernels {
        if name != HOST && !KERNELS.iter().any(|kernel| kernel.name == name) {
            let known: Vec<&str> = KERNELS.iter().map(|kernel| kernel.name).chain([HOST]).collect();
            bail!("unknown kernel {name}: the matrix has {}", known.join(", "));
        }
    }
    let plan = options.command.is_empty();
    let command = if plan { test_plan()? } else { options.command.join(" ") };
    setup::debian_packages(&HOST_TOOLS)?;
    let vng = vng()?;
    fs::create_dir_all(results_dir())?;
    let timeout = Duration::from_secs(options.timeout);
    let mut outcomes = Vec::new();
    for name in &options.kernels {
        let outcome = if name == HOST {
            match host_image()? {
                Ok(image) => boot(&vng, name, &image, &command, timeout)?,
                Err(skipped) if plan => kernel_check_natively(skipped)?,
                Err(skipped) => skipped,
            }
        } else {
            match debian_image(name) {
                Ok(image) => {
                    let outcome = boot(&vng, name, &image, &command, timeout)?;
                    // A guest lost before the command's end with no test failed (seen: qemu
                    // gone after 11 s; once in CI, a guest gone mid-plan, virtme-ng's 255) is
                    // booted once more, and the table says so; one whose tests failed is not.
                    if outcome.failed
                        && outcome.tests.1 == 0
                        && (outcome.release.ends_with(NO_ANSWER) || outcome.lost())
                    {
                        step(format!("matrix: {name}: the guest was lost ({}), booting it once more", outcome.status));
                        print_console_tail(name);
                        let first = outcome.status;
                        let mut again = boot(&vng, name, &image, &command, timeout)?;
                        again.status = format!("{} (booted twice; first: {first})", again.status);
                        again
                    } else {
                        outcome
                    }
                }
                Err(error) => {
                    step(format!("matrix: {name}: no kernel to boot: {error:#}"));
                    let status = format!("no kernel: {error:#}");
                    Outcome {
                        kernel: name.clone(),
                        release: "-".into(),
                        status,
                        seconds: None,
                        failed: true,
                        tests: (0, 0),
                    }
                }
            }
        };
        outcomes.push(outcome);
    }
    print_summary(&outcomes);
    if plan {
        write_docs(&outcomes)?;
    }
    let passed = outcomes.iter().map(|outcome| outcome.tests.0).sum();
    let failed = outcomes.iter().map(|outcome| outcome.tests.1.max(u64::from(outcome.failed))).sum();
    Ok((passed, failed))
}

/// Writes the guest's script of the test plan (kernel-check's table for the log, then the
/// tests of `GUEST_TESTS` from their binaries, as built on the host; it fails if any failed)
/// and returns the command that runs it: the command travels on the guest kernel's command
/// line, which a long script overflows (6.1 panics at boot).
fn test_plan() -> Result<String> {
    let agent = target_dir().join("release/ferroscope");
    if !agent.is_file() {
        bail!("{} is missing: build it first with `cargo xtask build --release`", agent.display());
    }
    let binaries = test_binaries()?;
    let mut script = format!(
        "export FERROSCOPE_BIN={agent} FERROSCOPE_E2E_FREQUENCY=200\nstatus=0\n{agent} kernel-check\n\
         case $(uname -r) in [1-4].*|5.[0-9].*|5.1[0-6].*) old=1;; *) old=0;; esac\n",
        agent = agent.display()
    );
    for (index, (binary, tests)) in GUEST_TESTS.iter().enumerate() {
        let path = binaries.get(*binary).with_context(|| format!("no test binary {binary}"))?;
        let run = format!("{} --exact {} --test-threads=1 || status=1", path.display(), tests.join(" "));
        script += &if index == 0 { format!("{run}\n") } else { format!("[ $old = 1 ] || {run}\n") };
    }
    script += "exit $status\n";
    let path = matrix_dir().join("test-plan.sh");
    fs::create_dir_all(matrix_dir())?;
    fs::write(&path, script)?;
    Ok(format!("bash {}", path.display()))
}

/// The e2e crate's test binaries by name, built (release, as `cargo xtask test` builds them)
/// if they are not.
fn test_binaries() -> Result<std::collections::HashMap<String, PathBuf>> {
    step("matrix: building the end-to-end tests");
    let output = crate::cargo()
        .args(["test", "-p", "e2e", "--release", "--tests", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !output.status.success() {
        bail!("cannot build the end-to-end tests");
    }
    let mut binaries = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let (Some(name), Some(executable)) = (message["target"]["name"].as_str(), message["executable"].as_str()) {
            binaries.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    Ok(binaries)
}

/// The tests that passed and failed, from the `test result:` lines of a guest's output.
fn test_counts(output: &str) -> (u64, u64) {
    let count = |result: &str, word: &str| -> u64 {
        result
            .split(';')
            .find_map(|part| part.trim().rsplit(". ").next()?.strip_suffix(word)?.trim().parse().ok())
            .unwrap_or(0)
    };
    output
        .lines()
        .filter_map(|line| line.strip_prefix("test result: "))
        .fold((0, 0), |(passed, failed), result| (passed + count(result, " passed"), failed + count(result, " failed")))
}

/// What kernel-check printed in a guest's output: programs loaded (`N of M`), and the
/// largest shares of the verifier's instruction and stack limits.
fn kernel_check_figures(output: &str) -> Option<(String, String, String)> {
    let rows = kernel_check_lines(output)?;
    let loaded = rows.iter().filter(|row| row.ends_with("loaded")).count();
    let percentage = |text: &str| -> Option<u32> { text.split('%').next()?.parse().ok() };
    let stack = |row: &&str| percentage(row.split(" B (").nth(1)?);
    let instructions = |row: &&str| percentage(row.split(" B (").next()?.split('(').nth(1)?);
    let largest = |share: &dyn Fn(&&str) -> Option<u32>| {
        rows.iter().filter_map(share).max().map_or("-".to_owned(), |share| format!("{share}%"))
    };
    Some((format!("{loaded} of {}", rows.len()), largest(&instructions), largest(&stack)))
}

/// The rows of kernel-check's table in a guest's output: `NAME FEATURE N (P%) S B (Q%) loaded`,
/// or `NAME FEATURE - S B (Q%) REFUSED: ...`; None without the table.
fn kernel_check_lines(output: &str) -> Option<Vec<&str>> {
    let start = output.lines().position(|line| line.starts_with("program "))?;
    let rows = output.lines().skip(start + 1);
    Some(rows.take_while(|line| line.ends_with("loaded") || line.contains("REFUSED")).collect())
}

/// kernel-check's rows in a guest's output: (program, verified instructions or `refused`,
/// combined stack).
fn kernel_check_rows(output: &str) -> Vec<(String, String, String)> {
    kernel_check_lines(output)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|row| {
            let mut words = row.split_whitespace();
            let (program, _feature, verified) = (words.next()?, words.next()?, words.next()?);
            let stack = row.split(" B (").next()?.rsplit(' ').next()?;
            let verified = if row.contains("REFUSED") { "refused".to_owned() } else { verified.to_owned() };
            Some((program.to_owned(), verified, format!("{stack} B")))
        })
        .collect()
}

/// Per program, the instructions each kernel's verifier processed, and its combined stack.
fn program_table(outcomes: &[Outcome]) -> String {
    let checked: Vec<(&str, Vec<(String, String, String)>)> = outcomes
        .iter()
        .filter_map(|outcome| {
            let output = fs::read_to_string(results_dir().join(format!("{}.log", outcome.kernel))).ok()?;
            let rows = kernel_check_rows(&output);
            (!rows.is_empty()).then_some((outcome.kernel.as_str(), rows))
        })
        .collect();
    let Some((_, first)) = checked.first() else { return String::new() };
    let mut table =
        String::from("\nPer program (`ferroscope kernel-check`; verified instructions, of 1,000,000):\n\n| program |");
    for (kernel, _) in &checked {
        table += &format!(" {kernel} |");
    }
    table += " combined stack |\n|---|";
    table += &"---|".repeat(checked.len() + 1);
    table += "\n";
    for (program, _, stack) in first {
        table += &format!("| {program} |");
        for (_, rows) in &checked {
            let verified = rows.iter().find(|(name, ..)| name == program).map_or("-", |(_, verified, _)| verified);
            table += &format!(" {verified} |");
        }
        table += &format!(" {stack} |\n");
    }
    table
}

/// Rewrites the table between the markers of docs/kernels.md with this run's outcomes.
fn write_docs(outcomes: &[Outcome]) -> Result<()> {
    let path = workspace_root().join("docs/kernels.md");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (begin, end) = ("<!-- matrix:begin -->", "<!-- matrix:end -->");
    let (Some(start), Some(stop)) = (text.find(begin), text.find(end)) else {
        bail!("{} has no {begin} ... {end} markers", path.display());
    };
    let mut table = String::from(
        "\n| kernel | release | programs loaded | verified instructions, largest | combined stack, largest \
         | end-to-end tests in the guest | status | time |\n|---|---|---|---|---|---|---|---|\n",
    );
    for outcome in outcomes {
        let output = fs::read_to_string(results_dir().join(format!("{}.log", outcome.kernel))).unwrap_or_default();
        let (loaded, instructions, stack) =
            kernel_check_figures(&output).unwrap_or_else(|| ("-".into(), "-".into(), "-".into()));
        let (passed, failed) = outcome.tests;
        let tests = match outcome.seconds {
            None if outcome.kernel == HOST => "run natively by `cargo xtask test`".to_owned(),
            _ => format!("{passed} passed, {failed} failed"),
        };
        let time = outcome.seconds.map_or("-".to_owned(), |seconds| format!("{seconds:.0} s"));
        table += &format!(
            "| {} | {} | {loaded} | {instructions} | {stack} | {tests} | {} | {time} |\n",
            outcome.kernel, outcome.release, outcome.status
        );
    }
    table += "\nMade by `cargo xtask matrix` (each guest 2 CPUs under TCG, on a 2-core host; the host's \
              end-to-end tests run natively in `cargo xtask test`).\n";
    table += &program_table(outcomes);
    fs::write(&path, format!("{}{begin}{table}{}", &text[..start], &text[stop..]))?;
    step(format!("matrix: wrote the table into {}", path.display()));
    Ok(())
}

/// Everything the matrix downloads or makes.
fn matrix_dir() -> PathBuf {
    target_dir().join("matrix")
}

/// Each kernel's output, as KERNEL.log.
fn results_dir() -> PathBuf {
    matrix_dir().join("results")
}

/// virtme-ng, pinned, in a venv of its own (Debian 12 has no package of it).
fn vng() -> Result<PathBuf> {
    let venv = matrix_dir().join("venv");
    let vng = venv.join("bin/vng");
    let version = Command::new(&vng).arg("--version").output().ok();
    let wanted = format!("virtme-ng {VIRTME_NG_VERSION}");
    if version.is_some_and(|output| String::from_utf8_lossy(&output.stdout).trim() == wanted) {
        step(format!("matrix: {wanted}: present, skipped"));
        return Ok(vng);
    }
    step(format!("matrix: installing {wanted} into {}", venv.display()));
    if !venv.join("bin/pip").is_file() {
        crate::run(Command::new(e2e::PYENV_PYTHON_3_11).args(["-m", "venv"]).arg(&venv))?;
    }
    let package = format!("virtme-ng=={VIRTME_NG_VERSION}");
    crate::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", &package]))?;
    Ok(vng)
}

/// The running kernel's image, from /boot; `Err`, the outcome of a skipped kernel, when /boot
/// does not have it, as in a container: `cargo xtask test` tests that kernel natively anyway.
fn host_image() -> Result<Result<Image, Outcome>> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_owned();
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if vmlinuz.is_file() {
        return Ok(Ok(Image { vmlinuz, release }));
    }
    step(format!(
        "matrix: host: no {} for the running kernel {release}: skipped (cargo xtask test tests it natively)",
        vmlinuz.display()
    ));
    let skipped = Outcome {
        kernel: HOST.into(),
        release,
        status: format!("skipped: no {}", vmlinuz.display()),
        seconds: None,
        failed: false,
        tests: (0, 0),
    };
    Ok(Err(skipped))
}

/// The host's kernel without an image to boot: `ferroscope kernel-check` run natively, its
/// output in results/host.log as a guest's would be (the end-to-end tests ran natively before).
fn kernel_check_natively(mut skipped: Outcome) -> Result<Outcome> {
    let agent = target_dir().join("release/ferroscope");
    let output = Command::new(&agent).arg("kernel-check").output().with_context(|| format!("running {agent:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    fs::write(results_dir().join(format!("{HOST}.log")), &text)?;
    skipped.status += "; kernel-check natively";
    skipped.failed = !output.status.success();
    Ok(skipped)
}

/// The image of one of `KERNELS`: its packages downloaded and unpacked, unless done before.
fn debian_image(name: &str) -> Result<Image> {
    let kernel = KERNELS.iter().find(|kernel| kernel.name == name).expect("checked by run");
    apt_lists(kernel.suite)?;
    let packages = match kernel.package {
        Some(package) => vec![package.to_owned()],
        None => newest_kernel(kernel.suite)?,
    };
    let debs = download(kernel, &packages)?;
    let dir = unpack(name, &debs)?;
    find_image(&dir)
}

/// The files of apt's view of one Debian suite: apt-get and apt-cache run with them read
/// their own sources, lists and cache instead of the host's, which stay as they are.
fn apt_dir(suite: &str) -> PathBuf {
    matrix_dir().join("apt").join(suite)
}

/// `program` (apt-get or apt-cache) on `suite`'s files.
fn apt(program: &str, suite: &str) -> Command {
    let dir = apt_dir(suite);
    let mut command = Command::new(program);
    for (option, path) in [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", dir.join("sources.list.d")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ] {
        command.arg("-o").arg(format!("{option}={}", path.display()));
    }
    // sid's Release is valid for a week only, and a mirror may be older than that. apt's
    // unprivileged user cannot write into the target directory.
    command.args(["-o", "Acquire::Check-Valid-Until=false", "-o", "APT::Sandbox::User=root"]);
    command
}

/// Fetches `suite`'s package lists, once, from the Debian mirror the host's apt uses.
fn apt_lists(suite: &str) -> Result<()> {
    let dir = apt_dir(suite);
    let lists = dir.join("lists");
    let fetched = fs::read_dir(&lists)
        .map(|entries| entries.flatten().any(|entry| entry.file_name().to_string_lossy().contains("_Packages")))
        .unwrap_or(false);
    if fetched {
        step(format!("matrix: apt lists of {suite}: present, skipped"));
        return Ok(());
    }
    let mirror = setup::debian_mirror()?;
    step(format!("matrix: apt lists of {suite}: fetching from {mirror}"));
    for subdir in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        fs::create_dir_all(dir.join(subdir))?;
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    fs::write(dir.join("sources.list"), format!("deb [signed-by={keyring}] {mirror} {suite} main\n"))?;
    crate::run(apt("apt-get", suite).arg("update"))
}

/// The packages of `suite`'s newest generic amd64 kernel, unsigned: since 7.x Debian splits
/// it into `linux-binary-unsigned-RELEASE` (the image) and `linux-modules-RELEASE`; before,
/// `linux-image-RELEASE-unsigned` held both.
fn newest_kernel(suite: &str) -> Result<Vec<String>> {
    let output = apt("apt-cache", suite)
        .args(["search", "--names-only", "^linux-(binary-unsigned|image)-[0-9]"])
        .output()
        .context("apt-cache search")?;
    let listed = String::from_utf8_lossy(&output.stdout).into_owned();
    let generic = |release: &&str| !release.contains("-cloud") && !release.contains("-rt");
    let mut kernels: Vec<(Vec<u64>, Vec<String>)> = listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|package| {
            if let Some(release) = package.strip_prefix("linux-binary-unsigned-").filter(generic) {
                let release = release.strip_suffix("-amd64")?;
                Some((release, vec![package.to_owned(), format!("linux-modules-{release}-amd64")]))
            } else {
                let release = package.strip_prefix("linux-image-").filter(generic)?.strip_suffix("-amd64-unsigned")?;
                Some((release, vec![package.to_owned()]))
            }
        })
        .map(|(release, packages)| {
            let numbers = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
            (numbers, packages)
        })
        .collect();
    kernels.sort();
    let (_, packages) = kernels.pop().with_context(|| format!("no amd64 kernel in {suite}'s lists"))?;
    Ok(packages)
}

/// Downloads `packages` into debs/, those not there already; returns their files.
fn download(kernel: &Kernel, packages: &[String]) -> Result<Vec<PathBuf>> {
    let dir = matrix_dir().join("debs");
    fs::create_dir_all(&dir)?;
    // `apt-get download` names the file PACKAGE_VERSION_ARCH.deb.
    let find = |package: &str| -> Option<PathBuf> {
        let prefix = format!("{package}_");
        fs::read_dir(&dir).ok()?.flatten().map(|entry| entry.path()).find(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
    };
    let missing: Vec<&String> = packages.iter().filter(|package| find(package).is_none()).collect();
    let names = packages.join(" ");
    if missing.is_empty() {
        step(format!("matrix: {}: {names}: present, skipped", kernel.name));
    } else {
        step(format!("matrix: {}: downloading {names} from {}", kernel.name, kernel.suite));
        crate::run(apt("apt-get", kernel.suite).arg("download").args(&missing).current_dir(&dir))?;
    }
    packages.iter().map(|package| find(package).with_context(|| format!("no .deb of {package}"))).collect()
}

/// The packages unpacked into kernels/NAME/, image and modules side by side, where
/// virtme-ng finds the modules of an image (it runs depmod there itself); redone when the
/// packages change (a newer sid kernel).
fn unpack(name: &str, debs: &[PathBuf]) -> Result<PathBuf> {
    let dir = matrix_dir().join("kernels").join(name);
    let stamp = dir.join(".unpacked-from");
    let files: String = debs.iter().map(|deb| format!("{}\n", deb.file_name().unwrap().to_string_lossy())).collect();
    if fs::read_to_string(&stamp).ok().as_deref() == Some(files.as_str()) {
        step(format!("matrix: {name}: unpacked in {}: present, skipped", dir.display()));
        return Ok(dir);
    }
    step(format!("matrix: {name}: unpacking into {}", dir.display()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    for deb in debs {
        crate::run(Command::new("dpkg").arg("-x").arg(deb).arg(&dir))?;
    }
    fs::write(&stamp, files)?;
    Ok(dir)
}

/// The image in an unpacked kernel: boot/vmlinuz-RELEASE, or since 7.x
/// usr/lib/modules/RELEASE/vmlinuz.unsigned.
fn find_image(dir: &Path) -> Result<Image> {
    let entries = |path: PathBuf| -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = match fs::read_dir(path) {
            Ok(entries) => entries.flatten().map(|entry| entry.path()).collect(),
            Err(_) => Vec::new(),
        };
        paths.sort();
        paths
    };
    let name = |path: &Path| path.file_name().unwrap().to_string_lossy().into_owned();
    for path in entries(dir.join("boot")) {
        if let Some(release) = name(&path).strip_prefix("vmlinuz-") {
            return Ok(Image { release: release.to_owned(), vmlinuz: path });
        }
    }
    for modules in entries(dir.join("usr/lib/modules")) {
        if let Some(vmlinuz) = entries(modules.clone()).into_iter().find(|path| name(path).starts_with("vmlinuz")) {
            return Ok(Image { release: name(&modules), vmlinuz });
        }
    }
    bail!("no vmlinuz in {}", dir.display())
}

/// Boots `image` and runs `command` in it, its output going to results/NAME.log and the
/// guest's kernel console (boot messages, oopses, a panic) to results/NAME.console.log; kills
/// the guest after `timeout`.
fn boot(vng: &Path, name: &str, image: &Image, command: &str, timeout: Duration) -> Result<Outcome> {
    let log_path = results_dir().join(format!("{name}.log"));
    let log = fs::File::create(&log_path)?;
    let console = fs::File::create(results_dir().join(format!("{name}.console.log")))?;
    step(format!("matrix: {name}: booting {} to run `{command}` (output in {})", image.release, log_path.display()));
    // virtme-ng's own commands are beside it.
    let path = std::env::join_paths(
        std::iter::once(vng.parent().unwrap().to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    // Pipes, not the files: qemu reopens its stdout and stderr through /proc/self/fd/ for
    // several ports each, which on a file would start each at offset 0 over the others.
    let (output, output_writer) = std::io::pipe()?;
    let (console_output, console_writer) = std::io::pipe()?;
    let mut vng = Command::new(vng);
    vng.arg("--run")
        .arg(&image.vmlinuz)
        // --verbose: the kernel's console on stderr.
        .args(["--disable-kvm", "--verbose", "--cpus", CPUS, "--memory", MEMORY, "--user", "root", "--cwd"])
        .arg(workspace_root())
        .arg("--")
        .arg(format!("{GUEST_PREAMBLE}\n{command}"))
        .current_dir(workspace_root())
        .env("PATH", path)
        // Not the terminal: qemu would switch it to raw mode.
        .stdin(Stdio::null())
        .stdout(output_writer)
        .stderr(console_writer)
        // Its own process group, so that a timeout kills qemu with it.
        .process_group(0);
    let start = Instant::now();
    let mut child = vng.spawn().with_context(|| format!("starting {vng:?}"))?;
    // Drop the parent's ends of the pipes, so that the copies end with qemu.
    drop(vng);
    let copies = [(output, log), (console_output, console)]
        .map(|(mut from, mut to)| std::thread::spawn(move || std::io::copy(&mut from, &mut to)));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            // SAFETY: kill(2) on the process group of a child still there (not yet waited for).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let seconds = start.elapsed().as_secs_f64();
    for copy in copies {
        copy.join().expect("a copy of the guest's output panicked")?;
    }
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let release = output
        .lines()
        .find_map(|line| line.strip_prefix(GUEST_LINE))
        .and_then(|rest| rest.split(',').next())
        .map_or_else(|| format!("{}{NO_ANSWER}", image.release), str::to_owned);
    let (status, failed) = match status {
        None => ("timed out".to_owned(), true),
        Some(status) => match status.code() {
            Some(code) => (format!("exit {code}"), code != 0),
            None => (format!("{status}"), true),
        },
    };
    let tests = test_counts(&output);
    step(format!("matrix: {name}: {status} in {seconds:.0} s; tests: {} passed, {} failed", tests.0, tests.1));
    Ok(Outcome { kernel: name.to_owned(), release, status, seconds: Some(seconds), failed, tests })
}

/// One line per kernel: name, release, how the command ended, time.
fn print_summary(outcomes: &[Outcome]) {
    let header = Outcome {
        kernel: "kernel".into(),
        release: "release".into(),
        status: "status".into(),
        seconds: None,
        failed: false,
        tests: (0, 0),
    };
    let width = |field: fn(&Outcome) -> &str| {
        outcomes.iter().chain([&header]).map(|outcome| field(outcome).len()).max().unwrap_or(0)
    };
    let (kernel_width, release_width, status_width) =
        (width(|o| &o.kernel), width(|o| &o.release), width(|o| &o.status));
    for (index, outcome) in [&header].into_iter().chain(outcomes).enumerate() {
        let time = match outcome.seconds {
            Some(seconds) => format!("{seconds:.0} s"),
            None if index == 0 => "time".into(),
            None => "-".into(),
        };
        println!(
            "{:kernel_width$}  {:release_width$}  {:status_width$}  {time}",
            outcome.kernel, outcome.release, outcome.status
        );
    }
    println!("logs: {0}/KERNEL.log, kernel consoles: {0}/KERNEL.console.log", results_dir().display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_test_counts_and_kernel_check_of_a_guest() {
        let output = "\
matrix: guest kernel 5.10.0-32-amd64, 2 CPUs, BTF /sys/kernel/btf/vmlinux
kernel 5.10.0-32-amd64
program            feature   verified instructions     combined stack  result
process_exec       process                 unknown          32 B (7%)  loaded
sample_cpu         cpu                           -        288 B (57%)  REFUSED: this kernel's verifier refused sample_cpu (number of funcs in func_info doesn't match number of subprogs)
sys_exit           wall                  2088 (1%)        320 B (63%)  loaded
ferroscope: error: 1 problem(s), over 90% of a limit or refused: ...
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.60s
test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 4 filtered out; finished in 31.36s
";
        assert_eq!(test_counts(output), (2, 1));
        assert_eq!(kernel_check_figures(output), Some(("2 of 3".to_owned(), "1%".to_owned(), "63%".to_owned())));
        assert_eq!(kernel_check_figures("no table"), None);
        let rows = kernel_check_rows(output);
        assert_eq!(rows[1], ("sample_cpu".to_owned(), "refused".to_owned(), "288 B".to_owned()));
        assert_eq!(rows[2], ("sys_exit".to_owned(), "2088".to_owned(), "320 B".to_owned()));
        assert_eq!(rows.len(), 3);
    }
}
