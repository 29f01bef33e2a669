//! Helpers for Ferroscope's end-to-end tests and benchmark: run the real agent and Python
//! workloads, and read the agent's profiles back with the real `go tool pprof`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

pub mod known_split;

/// pyenv's CPython 3.11, built with a shared libpython.
pub const PYENV_PYTHON_3_11: &str = "/root/.pyenv/versions/3.11.7/bin/python3.11";
/// Debian's CPython 3.11: static and stripped.
pub const DEBIAN_PYTHON_3_11: &str = "/usr/bin/python3.11";
/// pyenv's CPython 3.13, built with a shared libpython.
pub const PYENV_PYTHON_3_13: &str = "/root/.pyenv/versions/3.13.0/bin/python3.13";
/// A minimal Debian unstable root holding `/usr/bin/python3.13` to `python3.15` (those
/// Debian has), made by `cargo xtask setup --test`, outside the repository so that every
/// clone reuses it.
pub const DEBIAN_ROOT: &str = "/var/cache/ferroscope/debian-sid";
/// The file, in [`DEBIAN_ROOT`], written once the root is complete: the interpreters it holds.
pub const DEBIAN_ROOT_STAMP: &str = ".ferroscope-complete";

/// The line the agent prints on stderr once it is attached and sampling.
const SAMPLING_LINE: &str = "ferroscope: sampling";
/// Loading and verifying the eBPF programs and finding the Python processes may take a while.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the agent to write its last profiles after SIGINT.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Held by a test whose known answer needs the CPUs to itself (threads that burn CPU
/// or contend for the GIL): the tests of one file run in parallel, each with its own
/// agent, and on a 2-core machine they would take each other's CPU time.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static CPUS: Mutex<()> = Mutex::new(());
    CPUS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent binary under test, from `FERROSCOPE_BIN`.
pub fn ferroscope_bin() -> PathBuf {
    let bin = std::env::var_os("FERROSCOPE_BIN").expect(
        "FERROSCOPE_BIN is not set: run the end-to-end tests with `cargo xtask test`, \
         or set it to the absolute path of a built `ferroscope` binary",
    );
    let bin = PathBuf::from(bin);
    assert!(bin.is_file(), "FERROSCOPE_BIN={} is not a file", bin.display());
    bin
}

/// The path of a Python workload under `tests/workloads/`.
pub fn workload(file_name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join(file_name)
}

/// A child process killed when dropped, so that a failing test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends `signal` to the process `pid`.
fn send_signal(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("kill({pid}, {signal})"));
    }
    Ok(())
}

/// Waits for `child` to exit, for at most `timeout`.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running agent, writing its profiles into a temporary directory.
pub struct Agent {
    child: KillOnDrop,
    output_dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    /// The threads copying the agent's stdout and stderr into `log`.
    readers: Vec<JoinHandle<()>>,
}

/// What a stopped agent left: its profiles and its output.
pub struct AgentRun {
    pub output_dir: tempfile::TempDir,
    pub log: String,
}

impl AgentRun {
    /// Every profile the agent wrote, of every application, read as one.
    pub fn all_profiles(&self) -> Result<Profile> {
        let files: Vec<_> = list_tree(self.output_dir.path())
            .into_iter()
            .filter(|path| path.to_string_lossy().ends_with(".pb.gz"))
            .collect();
        ensure!(!files.is_empty(), "no profile written; agent output:\n{}", self.log);
        Profile::load(&files)
    }
}

impl Agent {
    /// Starts `$FERROSCOPE_BIN agent ARGS --output-dir <temp dir>` and waits until it samples.
    pub fn start(args: &[&str]) -> Result<Agent> {
        Agent::start_binary(&ferroscope_bin(), args)
    }

    /// Starts `BINARY agent ARGS --output-dir <temp dir>` and waits until it samples.
    pub fn start_binary(binary: &Path, args: &[&str]) -> Result<Agent> {
        Agent::start_command(Command::new(binary), args)
    }

    /// Starts `COMMAND agent ARGS --output-dir <temp dir>` and waits until it samples:
    /// `command` runs the agent with its own environment, or through a wrapper.
    pub fn start_command(mut command: Command, args: &[&str]) -> Result<Agent> {
        let output_dir = tempfile::tempdir()?;
        let mut child = command
            .arg("agent")
            .args(args)
            .arg("--output-dir")
            .arg(output_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (sampling_tx, sampling_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let readers =
            vec![collect_lines(stdout, log.clone(), None), collect_lines(stderr, log.clone(), Some(sampling_tx))];
        let mut agent = Agent { child: KillOnDrop(child), output_dir, log, readers };
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if sampling_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(agent);
            }
            if let Some(status) = agent.child.0.try_wait()? {
                bail!("the agent exited ({status}) before sampling; its output:\n{}", agent.log());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not print {SAMPLING_LINE:?} within {ATTACH_TIMEOUT:?}; its output:\n{}",
                    agent.log()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Where it writes its profiles.
    pub fn output_dir(&self) -> &Path {
        self.output_dir.path()
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Stops the agent with SIGINT and checks that it exits cleanly.
    pub fn stop(mut self) -> Result<AgentRun> {
        send_signal(self.pid(), libc::SIGINT)?;
        let status = wait_timeout(&mut self.child.0, EXIT_TIMEOUT)?;
        if status.is_some() {
            // The pipes are closed: the readers have taken the last lines.
            for reader in self.readers.drain(..) {
                let _ = reader.join();
            }
        }
        let log = self.log();
        match status {
            None => bail!("the agent did not exit within {EXIT_TIMEOUT:?} of SIGINT; its output:\n{log}"),
            Some(status) if !status.success() => {
                bail!("the agent exited with {status} after SIGINT; its output:\n{log}")
            }
            Some(_) => Ok(AgentRun { output_dir: self.output_dir, log }),
        }
    }
}

/// Appends the lines of `source` to `log`, and signals `sampling` when the agent says it samples.
fn collect_lines(
    source: impl Read + Send + 'static,
    log: Arc<Mutex<String>>,
    sampling: Option<mpsc::Sender<()>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(source).lines().map_while(|line| line.ok()) {
            if line.starts_with(SAMPLING_LINE) {
                if let Some(sampling) = &sampling {
                    let _ = sampling.send(());
                }
            }
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    })
}

/// Runs `ferroscope agent ARGS` to its end, for at most `timeout`; returns its status and stderr.
pub fn run_agent_to_exit(args: &[&str], timeout: Duration) -> Result<(ExitStatus, String)> {
    let mut child = KillOnDrop(
        Command::new(ferroscope_bin())
            .arg("agent")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?,
    );
    let mut stderr = child.0.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    match wait_timeout(&mut child.0, timeout)? {
        Some(status) => Ok((status, reader.join().unwrap())),
        None => {
            drop(child);
            bail!(
                "`ferroscope agent {}` still ran after {timeout:?}; stderr:\n{}",
                args.join(" "),
                reader.join().unwrap()
            )
        }
    }
}

/// The variable that lets a test that cannot run here (an interpreter, the Debian root or a
/// tool is missing) pass as skipped, saying so, instead of failing. `cargo xtask test` and
/// CI never set it: on the machines they run on, everything is installed.
pub const ALLOW_SKIP_VAR: &str = "FERROSCOPE_ALLOW_SKIP";
/// The file (set by `cargo xtask test`) to which each skip adds a line
/// `ferroscope-skip: TEST: WHAT IS MISSING`, so that the run can list them at its end.
pub const SKIP_LOG_VAR: &str = "FERROSCOPE_SKIP_LOG";

/// What a test does when `missing` (something it needs: an interpreter, a tool) is not
/// here; `install` says how to install it ("run `...`"). An error naming both, unless
/// `FERROSCOPE_ALLOW_SKIP=1`: then the test is skipped (Ok), with a line
/// `skipped: TEST: MISSING` on stderr past the test harness's capture, so that it shows with
/// or without `--nocapture`, and one in `$FERROSCOPE_SKIP_LOG`.
pub fn skip_or_fail(missing: &str, install: &str) -> Result<()> {
    let allowed = std::env::var_os(ALLOW_SKIP_VAR).is_some_and(|allow| allow == "1");
    let log = std::env::var_os(SKIP_LOG_VAR);
    // Straight to the file descriptor: `eprintln!` would be captured with the test's output.
    skip_or_fail_as(&test_name(), missing, install, allowed, log.as_deref(), &mut std::io::stderr())
}

/// [`skip_or_fail`] for `test`, saying it on `out`.
fn skip_or_fail_as(
    test: &str,
    missing: &str,
    install: &str,
    allowed: bool,
    log: Option<&std::ffi::OsStr>,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    use std::io::Write;
    ensure!(
        allowed,
        "{test} cannot run: {missing}; {install}. (To skip the tests that need it instead of failing, set \
         {ALLOW_SKIP_VAR}=1.)"
    );
    let reason = format!("{missing}; {install}").replace('\n', " ");
    let _ = writeln!(out, "skipped: {test}: {reason}");
    if let Some(log) = log {
        // One write: the tests of several binaries may add lines at once.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut file| file.write_all(format!("ferroscope-skip: {test}: {reason}\n").as_bytes()))
            .with_context(|| format!("recording the skip in {}", Path::new(log).display()))?;
    }
    Ok(())
}

/// The running test, as `TEST_BINARY::path::to::test` (`python_api::the_example_...`): the
/// test harness names each test's thread after the test.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|name| name.to_string_lossy().into_owned()))
        // Cargo names test binaries `NAME-HASH`.
        .map(|name| name.rsplit_once('-').map_or(name.clone(), |(name, _hash)| name.to_owned()))
        .unwrap_or_default();
    let test = thread::current().name().unwrap_or("(unnamed test)").to_owned();
    if binary.is_empty() {
        test
    } else {
        format!("{binary}::{test}")
    }
}

/// Whether `python` (of `container_root`, if given) is installed. If it is not, an error
/// that says how to install it, or, with `FERROSCOPE_ALLOW_SKIP=1`, false: the test is
/// skipped (see [`skip_or_fail`]).
pub fn installed(container_root: Option<&str>, python: &str) -> Result<bool> {
    match missing_python(container_root, python) {
        None => Ok(true),
        Some((missing, install)) => skip_or_fail(&missing, &install).map(|()| false),
    }
}

/// None if `python` (of `container_root`, if given) is installed; else what is missing and
/// how to install it.
fn missing_python(container_root: Option<&str>, python: &str) -> Option<(String, String)> {
    let path = Path::new(container_root.unwrap_or("/")).join(python.trim_start_matches('/'));
    match container_root {
        Some(root) => match fs::read_to_string(Path::new(root).join(DEBIAN_ROOT_STAMP)) {
            Err(_) => Some((
                format!("the Debian unstable root {root} is missing or incomplete (no {DEBIAN_ROOT_STAMP})"),
                "run `cargo xtask setup --test`, which makes it with debootstrap in about a minute".to_owned(),
            )),
            Ok(_) if path.exists() => None,
            Ok(made_with) => Some((
                format!("{} is not in {root}, which holds {}", path.display(), made_with.trim()),
                format!(
                    "Debian unstable may not have had it when the root was made: remove {root}, then run \
                     `cargo xtask setup --test` again"
                ),
            )),
        },
        None if path.exists() => None,
        None => Some((format!("{} is not installed", path.display()), install_hint(python))),
    }
}

/// Whether `tool` (a command on `PATH`, or a file's path) is installed. If it is not, an
/// error that says how to install it (`install`: "run `...`"), or, with
/// `FERROSCOPE_ALLOW_SKIP=1`, false: the test is skipped (see [`skip_or_fail`]).
pub fn tool_installed(tool: &str, install: &str) -> Result<bool> {
    let found = if tool.contains('/') {
        Path::new(tool).exists()
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|dir| dir.join(tool).is_file())
    };
    if found {
        return Ok(true);
    }
    skip_or_fail(&format!("{tool} is not installed"), install).map(|()| false)
}

/// How to install the interpreter `python` of the host.
fn install_hint(python: &str) -> String {
    let pyenv = Path::new(python).strip_prefix("/root/.pyenv/versions/").ok();
    match pyenv.and_then(|rest| rest.iter().next()) {
        // The tests rely on pyenv's shared libpython, with its symbol table.
        Some(version) => format!(
            "install it with pyenv (https://github.com/pyenv/pyenv), as root: \
             `PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {}`",
            version.to_string_lossy()
        ),
        None => {
            let package = Path::new(python).file_name().map_or(python.into(), |name| name.to_string_lossy());
            format!("install it: `apt-get install {package}` (Debian)")
        }
    }
}

/// The CPU time process `pid` has used so far (all its threads, user and system), from
/// `/proc/PID/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // After `(comm)`, which may hold spaces: state is field 3, utime and stime 14 and 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').context("no (comm) in /proc/PID/stat")?.1.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields.get(index - 3).with_context(|| format!("no field {index} in {stat:?}"))?.parse::<f64>()?)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(14)? + ticks(15)?) / per_second)
}

/// Waits until process `pid` has used `seconds` more of CPU time than now, however busy the
/// host is, for at most `timeout`: what a test that samples a running process for a while
/// needs rather than a sleep, after which a loaded host may have given it little CPU.
pub fn wait_for_cpu(pid: u32, seconds: f64, timeout: Duration) -> Result<()> {
    let until = cpu_seconds(pid)? + seconds;
    let deadline = Instant::now() + timeout;
    loop {
        let used = cpu_seconds(pid)?;
        if used >= until {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "process {pid} used {:.2} s of CPU in {timeout:?}, not {seconds} s",
            used - (until - seconds)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A port on loopback that nobody listens on (yet).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A container ID for a test: 64 hex digits, new at each call.
pub fn new_container_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:032x}{nanos:032x}", std::process::id())
}

/// A cgroup (v2) made for a test under the name a container runtime gives its
/// containers', removed with the directories it made when dropped (after its processes).
pub struct Cgroup {
    path: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroup {
    /// `relative` (such as `system.slice/docker-<id>.scope`) in the cgroup v2 hierarchy:
    /// `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a host with v1 controllers.
    pub fn create(relative: &str) -> Result<Cgroup> {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|root| root.join("cgroup.controllers").exists())
            .context("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")?;
        let mut cgroup = Cgroup { path: root.to_owned(), made: Vec::new() };
        for component in relative.split('/') {
            cgroup.path.push(component);
            if !cgroup.path.exists() {
                fs::create_dir(&cgroup.path).with_context(|| format!("making the cgroup {}", cgroup.path.display()))?;
                cgroup.made.push(cgroup.path.clone());
            }
        }
        Ok(cgroup)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            // Its last process may take a moment to leave it.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A running Python workload.
pub struct Workload {
    child: KillOnDrop,
    /// The Python process, as the host sees it.
    pid: u32,
    /// Its stdout, line by line, once [`Workload::wait_for_line`] has started reading it.
    lines: Option<mpsc::Receiver<String>>,
}

/// Where [`Workload::start_in_container`] puts workloads, inside the root.
const CONTAINER_WORKLOADS: &str = "tmp/ferroscope-e2e";

impl Workload {
    /// Starts `python SCRIPT ARGS` with `script` from `tests/workloads/`.
    pub fn start(python: &str, script: &str, args: &[&str]) -> Result<Workload> {
        let script = workload(script);
        let args: Vec<&str> = [script.to_str().unwrap()].into_iter().chain(args.iter().copied()).collect();
        Workload::start_program(Path::new(python), &args, &[])
    }

    /// Starts `PROGRAM ARGS` with the environment variables `env` added: a renamed
    /// interpreter, or a program that embeds one.
    pub fn start_program(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Workload> {
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {}", program.display(), args.join(" ")))?;
        Ok(Workload { pid: child.id(), child: KillOnDrop(child), lines: None })
    }

    /// Starts `python SCRIPT ARGS` in a container: in new PID and mount namespaces, chrooted
    /// in `root` (which holds `python`), with a copy of `script` at
    /// [`Workload::container_script`]. The Python process is the namespace's pid 1.
    /// In `cgroup`, if given, as a container runtime would put it.
    pub fn start_in_container(
        root: &str,
        cgroup: Option<&Cgroup>,
        python: &str,
        script: &str,
        args: &[&str],
    ) -> Result<Workload> {
        let dir = Path::new(root).join(CONTAINER_WORKLOADS);
        fs::create_dir_all(&dir)?;
        fs::copy(workload(script), dir.join(script))?;
        let mut command = match cgroup {
            Some(cgroup) => {
                let mut shell = Command::new("sh");
                shell.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#]).arg(&cgroup.path);
                shell.arg("unshare");
                shell
            }
            None => Command::new("unshare"),
        };
        let child = command
            .args(["--pid", "--mount", "--fork", "--kill-child", "chroot", root, python])
            .arg(Workload::container_script(script))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {python} {script} in {root}"))?;
        let child = KillOnDrop(child);
        // `unshare --fork` runs the Python process as its child.
        let children = format!("/proc/{0}/task/{0}/children", child.0.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = fs::read_to_string(&children)?.split_whitespace().next() {
                return Ok(Workload { pid: pid.parse()?, child, lines: None });
            }
            ensure!(Instant::now() < deadline, "{python} did not start in {root}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The path of a workload started with [`Workload::start_in_container`], as its Python
    /// sees it.
    pub fn container_script(script: &str) -> String {
        format!("/{CONTAINER_WORKLOADS}/{script}")
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the workload prints `line` on a line of its own (its output up to there
    /// is read and dropped), for at most `timeout`. May be called again for a later line.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> Result<()> {
        if self.lines.is_none() {
            let stdout = self.child.0.stdout.take().context("stdout already read")?;
            let (sender, receiver) = mpsc::channel();
            // Reads all along, so that the workload never blocks on a full pipe.
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(|line| line.ok()) {
                    let _ = sender.send(line);
                }
            });
            self.lines = Some(receiver);
        }
        let lines = self.lines.as_ref().expect("set above");
        let deadline = Instant::now() + timeout;
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(printed) if printed == line => return Ok(()),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the workload ended without printing {line:?}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("the workload did not print {line:?} within {timeout:?}")
                }
            }
        }
    }

    /// Waits for the workload to exit successfully; returns what it printed (after the
    /// lines [`Workload::wait_for_line`] waited for).
    pub fn wait(mut self) -> Result<String> {
        let mut stdout = String::new();
        match (self.lines.take(), self.child.0.stdout.take()) {
            (Some(lines), _) => lines.iter().for_each(|line| stdout.push_str(&(line + "\n"))),
            (None, Some(mut pipe)) => {
                pipe.read_to_string(&mut stdout)?;
            }
            (None, None) => bail!("stdout already read"),
        }
        let status = self.child.0.wait()?;
        ensure!(status.success(), "the workload exited with {status}");
        Ok(stdout)
    }
}

/// The pprof files (`*.pb.gz`) the agent wrote for `application` under `output_dir`.
pub fn profile_files(output_dir: &Path, application: &str) -> Result<Vec<PathBuf>> {
    let dir = output_dir.join(application);
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<std::io::Result<Vec<_>>>()?
            .into_iter()
            .filter(|path| path.to_string_lossy().ends_with(".pb.gz"))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    ensure!(
        !files.is_empty(),
        "no profile of {application:?} in {}; it holds: {:?}",
        output_dir.display(),
        list_tree(output_dir)
    );
    Ok(files)
}

/// The comments of a pprof file, as `go tool pprof -comments` prints them.
pub fn comments(file: &Path) -> Result<Vec<String>> {
    let output = Command::new("go").args(["tool", "pprof", "-comments"]).arg(file).output()?;
    ensure!(
        output.status.success(),
        "go tool pprof -comments {}: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.lines().map(str::to_owned).collect())
}

/// Every file under `dir`.
fn list_tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// One frame of a sample, as `go tool pprof -raw` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: i64,
    pub start_line: i64,
}

/// One sample: its values (in the profile's sample type order), its frames leaf first, and
/// its string labels.
#[derive(Clone, Debug)]
pub struct Sample {
    pub values: Vec<i64>,
    pub frames: Vec<Frame>,
    pub labels: BTreeMap<String, String>,
}

impl Sample {
    /// The sample's count: its first value (`samples`/`count`).
    pub fn count(&self) -> i64 {
        self.values[0]
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    pub fn has_function(&self, function: &str) -> bool {
        self.frames.iter().any(|frame| frame.function == function)
    }
}

/// A profile as read back by `go tool pprof`, several files merged.
#[derive(Debug)]
pub struct Profile {
    /// `type/unit` of each sample value, such as `samples/count` and `cpu/nanoseconds`.
    pub sample_types: Vec<String>,
    pub samples: Vec<Sample>,
}

impl Profile {
    /// Reads (and merges) pprof files with `go tool pprof -raw`.
    pub fn load(files: &[PathBuf]) -> Result<Profile> {
        let output = Command::new("go")
            .args(["tool", "pprof", "-raw", "-symbolize=none"])
            .args(files)
            .output()
            .context("running `go tool pprof` (is Go installed? `cargo xtask setup --test` installs it)")?;
        ensure!(
            output.status.success(),
            "go tool pprof -raw {files:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        parse_raw(&String::from_utf8(output.stdout)?)
    }

    /// The samples of one process.
    pub fn samples_of_pid(&self, pid: u32) -> impl Iterator<Item = &Sample> {
        let pid = pid.to_string();
        self.samples.iter().filter(move |sample| sample.label("pid") == Some(pid.as_str()))
    }
}

/// Parses the text of `go tool pprof -raw`: a header, `Samples:`, `Locations`, `Mappings`.
fn parse_raw(text: &str) -> Result<Profile> {
    enum Section {
        Header,
        Samples,
        Locations,
        Mappings,
    }
    let mut section = Section::Header;
    let mut sample_types = Vec::new();
    // Samples with their location ids, whose frames are filled in once all locations are read.
    let mut samples: Vec<(Sample, Vec<u64>)> = Vec::new();
    let mut locations: HashMap<u64, Vec<Frame>> = HashMap::new();
    let mut last_location = None;
    for line in text.lines() {
        match line.trim_end() {
            "Samples:" => {
                section = Section::Samples;
                continue;
            }
            "Locations" => {
                section = Section::Locations;
                continue;
            }
            "Mappings" => {
                section = Section::Mappings;
                continue;
            }
            _ => {}
        }
        match section {
            Section::Header | Section::Mappings => {}
            Section::Samples => {
                if sample_types.is_empty() {
                    // pprof marks the default sample type: `cpu/nanoseconds[dflt]`.
                    sample_types = line.split_whitespace().map(|t| t.trim_end_matches("[dflt]").to_owned()).collect();
                } else if let Some((values, stack)) = line.split_once(':').filter(|_| !line.contains(":[")) {
                    let values = values.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
                    let stack = stack.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
                    samples.push((Sample { values, frames: Vec::new(), labels: BTreeMap::new() }, stack));
                } else if line.contains(":[") {
                    let (sample, _) = samples.last_mut().context("labels before any sample")?;
                    sample.labels.extend(parse_labels(line.trim()));
                }
            }
            Section::Locations => {
                // `%6d: %#x [M=%d ][[F] ]` then `function file:line s=start`, or `??` for a
                // line without a function; inlined frames follow on lines without an id.
                let trimmed = line.trim_start();
                let rest = match trimmed.split_once(": 0x") {
                    Some((id, rest)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => {
                        let id = id.parse()?;
                        last_location = Some(id);
                        locations.entry(id).or_default();
                        let mut rest = rest.split_once(' ').map_or("", |(_address, rest)| rest);
                        for prefix in ["M=", "[F]"] {
                            if rest.starts_with(prefix) {
                                rest = rest.split_once(' ').map_or("", |(_, rest)| rest);
                            }
                        }
                        rest
                    }
                    _ => trimmed,
                };
                if let Some(frame) = parse_frame(rest) {
                    let id = last_location.context("an inlined frame before any location")?;
                    locations.entry(id).or_default().push(frame);
                }
            }
        }
    }
    let samples = samples
        .into_iter()
        .map(|(mut sample, stack)| {
            for id in stack {
                sample
                    .frames
                    .extend(locations.get(&id).with_context(|| format!("unknown location {id}"))?.iter().cloned());
            }
            Ok(sample)
        })
        .collect::<Result<_>>()?;
    Ok(Profile { sample_types, samples })
}

/// Parses `function file:line s=start` (maybe followed by `(system name)`).
fn parse_frame(text: &str) -> Option<Frame> {
    let (head, start) = text.rsplit_once(" s=")?;
    let start_line = start.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let (function, file_line) = head.rsplit_once(' ')?;
    let (file, line) = file_line.rsplit_once(':')?;
    Some(Frame { function: function.to_owned(), file: file.to_owned(), line: line.parse().ok()?, start_line })
}

/// Parses a label line such as `pid:[1234] thread_name:[main thread]`.
fn parse_labels(mut text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    while let Some((key, rest)) = text.split_once(":[") {
        // The value ends at the `]` that is followed by the next `key:[` or the end.
        let end = rest
            .match_indices(']')
            .map(|(index, _)| index)
            .find(|&index| {
                let after = &rest[index + 1..];
                after.is_empty() || after.starts_with(' ') && after.contains(":[")
            })
            .unwrap_or(rest.len());
        labels.push((key.trim().to_owned(), rest[..end].to_owned()));
        text = rest.get(end + 1..).unwrap_or("");
    }
    labels
}

/// The share (0 to 1) of the samples containing each of `functions`, among the samples
/// containing any of them, weighted by the samples' counts.
pub fn function_shares<'a>(samples: impl IntoIterator<Item = &'a Sample>, functions: &[&str]) -> Result<Vec<f64>> {
    let mut counts = vec![0i64; functions.len()];
    let mut total = 0;
    for sample in samples {
        let containing: Vec<usize> = (0..functions.len()).filter(|&i| sample.has_function(functions[i])).collect();
        if !containing.is_empty() {
            total += sample.count();
        }
        for i in containing {
            counts[i] += sample.count();
        }
    }
    ensure!(total > 0, "no sample contains any of {functions:?}");
    Ok(counts.iter().map(|&count| count as f64 / total as f64).collect())
}

/// The largest absolute difference between `shares` and `expected`, in percentage points.
pub fn max_deviation_pp(shares: &[f64], expected: &[f64]) -> f64 {
    shares.iter().zip(expected).map(|(share, expected)| (share - expected).abs() * 100.0).fold(0.0, f64::max)
}

/// The source lines (first, last) of each function in a Python file, by qualified name
/// (`Cruncher.crunch_a`), found by `python` itself (3.6+) with `ast`.
pub fn function_line_ranges(python: &str, script: &Path) -> Result<HashMap<String, (i64, i64)>> {
    const LIST_FUNCTIONS: &str = r#"
import ast, sys
def walk(node, prefix):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            walk(child, prefix + child.name + ".")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # No end_lineno before 3.8: the last line of any node inside then.
            last = getattr(child, "end_lineno", None) or max(getattr(n, "lineno", 0) for n in ast.walk(child))
            print(prefix + child.name, child.lineno, last)
            walk(child, prefix + child.name + ".<locals>.")
        else:
            walk(child, prefix)
walk(ast.parse(open(sys.argv[1]).read()), "")
"#;
    let output = Command::new(python).args(["-c", LIST_FUNCTIONS]).arg(script).output()?;
    ensure!(
        output.status.success(),
        "listing the functions of {}: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)?
        .lines()
        .map(|line| {
            let mut fields = line.split(' ');
            let (Some(name), Some(first), Some(last)) = (fields.next(), fields.next(), fields.next()) else {
                bail!("unexpected line {line:?}");
            };
            Ok((name.to_owned(), (first.parse()?, last.parse()?)))
        })
        .collect()
}

/// The share (by count) of `samples` that carry every label of `expected`; an error if one
/// carries another value for any of them. A process whose first samples come as it execs
/// cannot be read at that instant: its first samples may lack the labels read from
/// `/proc`, never have wrong ones.
pub fn share_labelled(samples: &[&Sample], expected: &[(&str, &str)]) -> Result<f64> {
    let mut all = 0;
    let mut labelled = 0;
    for sample in samples {
        for (key, value) in expected {
            if let Some(found) = sample.label(key) {
                ensure!(found == *value, "{key} is {found}, not {value}: {:?}", sample.labels);
            }
        }
        all += sample.count();
        if expected.iter().all(|(key, _)| sample.label(key).is_some()) {
            labelled += sample.count();
        }
    }
    Ok(labelled as f64 / all.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: &str = "PeriodType: cpu nanoseconds
Period: 10000000
Samples:
samples/count cpu/nanoseconds[dflt]
         40  400000000: 1 2 3 
                pid:[1234] thread_name:[main thread] tid:[1234]
          2   20000000: 4 
Locations
     1: 0x0 M=1 Cruncher.crunch_a /w/split.py:25 s=23
     2: 0x451f13 M=1 inlined_leaf /x.c:19 s=0
             caller /x.c:40 s=0
     3: 0x0 M=1 <module> /w/split.py:70 s=0
     4: 0xffffffff8100 M=2 
Mappings
1: 0x0/0x0/0x0   
";

    #[test]
    fn parses_pprof_raw_output() {
        let profile = parse_raw(RAW).unwrap();
        assert_eq!(profile.sample_types, ["samples/count", "cpu/nanoseconds"]);
        assert_eq!(profile.samples.len(), 2);
        let first = &profile.samples[0];
        assert_eq!(first.values, [40, 400000000]);
        let names: Vec<_> = first.frames.iter().map(|frame| frame.function.as_str()).collect();
        assert_eq!(names, ["Cruncher.crunch_a", "inlined_leaf", "caller", "<module>"]);
        assert_eq!(
            first.frames[0],
            Frame { function: "Cruncher.crunch_a".into(), file: "/w/split.py".into(), line: 25, start_line: 23 }
        );
        assert_eq!(first.label("thread_name"), Some("main thread"));
        assert_eq!(first.label("tid"), Some("1234"));
        assert!(profile.samples[1].frames.is_empty());
        assert_eq!(profile.samples_of_pid(1234).count(), 1);
    }

    #[test]
    fn shares_count_samples_containing_each_function() {
        let profile = parse_raw(RAW).unwrap();
        let shares = function_shares(&profile.samples, &["Cruncher.crunch_a", "caller", "absent"]).unwrap();
        assert_eq!(shares, [1.0, 1.0, 0.0]);
        assert!((max_deviation_pp(&[0.52, 0.29, 0.19], &[0.5, 0.3, 0.2]) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn finds_function_line_ranges() -> Result<()> {
        if !installed(None, PYENV_PYTHON_3_11)? {
            return Ok(());
        }
        let ranges = function_line_ranges(PYENV_PYTHON_3_11, &workload("split.py"))?;
        let (first, last) = ranges["Cruncher.crunch_a"];
        assert!(first < last);
        assert!(ranges.contains_key("main"));
        Ok(())
    }

    #[test]
    fn waits_for_cpu_time_used() -> Result<()> {
        let me = std::process::id();
        let before = cpu_seconds(me)?;
        // Until it has used the CPU time waited for, however busy the host is.
        let spinner = thread::spawn(move || {
            let mut spin = 0u64;
            while cpu_seconds(me).unwrap() < before + 0.2 {
                for _ in 0..100_000 {
                    spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(7));
                }
            }
        });
        wait_for_cpu(me, 0.1, Duration::from_secs(30))?;
        assert!(cpu_seconds(me)? >= before + 0.1);
        spinner.join().unwrap();
        let idle = Command::new("sleep").arg("5").stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let mut idle = KillOnDrop(idle);
        assert!(wait_for_cpu(idle.0.id(), 1.0, Duration::from_millis(200)).is_err());
        let _ = idle.0.kill();
        Ok(())
    }

    #[test]
    fn a_missing_interpreter_fails_unless_skips_are_allowed() -> Result<()> {
        let (missing, install) = missing_python(None, "/root/.pyenv/versions/3.0.0/bin/python3.0").unwrap();
        assert!(missing.contains("python3.0") && install.contains("pyenv install 3.0.0"), "{missing}; {install}");
        let (missing, install) = missing_python(None, "/usr/bin/python3.0").unwrap();
        assert!(missing.contains("/usr/bin/python3.0") && install.contains("apt-get install python3.0"));
        let (missing, install) = missing_python(Some("/nonexistent"), "/usr/bin/python3.14").unwrap();
        assert!(missing.contains("/nonexistent") && install.contains("cargo xtask setup --test"), "{install}");
        assert!(missing_python(None, "/bin/sh").is_none());

        let mut out = Vec::new();
        let error = skip_or_fail_as("a::test", &missing, &install, false, None, &mut out).unwrap_err().to_string();
        assert!(error.starts_with("a::test cannot run: the Debian") && error.contains("FERROSCOPE_ALLOW_SKIP=1"));
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("skips");
        let log = Some(log.as_os_str());
        skip_or_fail_as("self_test::a", "python3.0 is not installed", "install it", true, log, &mut out)?;
        skip_or_fail_as("self_test::b", "gcc is not installed", "install it", true, log, &mut out)?;
        assert_eq!(
            String::from_utf8(out)?,
            "skipped: self_test::a: python3.0 is not installed; install it\n\
             skipped: self_test::b: gcc is not installed; install it\n"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("skips"))?,
            "ferroscope-skip: self_test::a: python3.0 is not installed; install it\n\
             ferroscope-skip: self_test::b: gcc is not installed; install it\n"
        );
        Ok(())
    }
}
