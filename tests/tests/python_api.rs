//! The Python API (`python/ferroscope`): a process names and labels itself through the
//! agent's control socket, and `stop()` ships what its period holds at once.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use e2e::{profile_files, Agent, Profile, Workload, PYENV_PYTHON_3_11, PYENV_PYTHON_3_13};

/// Starts `python tests/workloads/SCRIPT ARGS` with the package of `python/` importable and
/// talking to the agent on `socket`.
fn start_with_package(python: &str, script: &str, args: &[&str], socket: &Path) -> Result<Workload> {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let script = e2e::workload(script);
    let argv: Vec<&str> = [script.to_str().unwrap()].into_iter().chain(args.iter().copied()).collect();
    Workload::start_program(
        Path::new(python),
        &argv,
        &[("PYTHONPATH", package.to_str().unwrap()), ("FERROSCOPE_SOCKET", socket.to_str().unwrap())],
    )
}

/// The oldest CPython the package supports.
const PYENV_PYTHON_3_8: &str = "/root/.pyenv/versions/3.8.18/bin/python3.8";

#[test]
fn the_example_profiles_under_its_name_and_labels_and_stop_flushes_on_3_8() -> Result<()> {
    check_example(PYENV_PYTHON_3_8)
}

#[test]
fn the_example_profiles_under_its_name_and_labels_and_stop_flushes_on_3_13() -> Result<()> {
    check_example(PYENV_PYTHON_3_13)
}

fn check_example(python: &str) -> Result<()> {
    if !e2e::installed(None, python)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("control.sock");
    let agent = Agent::start(&[
        "--period",
        "60s",
        "--frequency",
        &FREQUENCY.to_string(),
        "--control-socket",
        socket.to_str().unwrap(),
    ])?;
    let mut workload = start_with_package(python, "api_example.py", &[], &socket)?;
    let pid = workload.pid();
    workload.wait_for_line("done", Duration::from_secs(60))?;
    // Both stop() calls shipped their profile, long before the 60 s period ends.
    let files = profile_files(agent.output_dir(), "my-python-app")?;
    ensure!(files.len() == 2, "{} profiles of my-python-app after two stop(): {files:?}", files.len());
    let run = agent.stop()?;
    drop(workload);
    let first = Profile::load(&files[..1])?;
    let spin_samples = |profile: &Profile| -> i64 {
        profile.samples_of_pid(pid).filter(|sample| sample.has_function("spin")).map(|sample| sample.count()).sum()
    };
    // The functions named right: a code object read while a module was imported, at an
    // address the next import reuses for `spin`'s, once named every `spin` sample `<module>`.
    let expected = 2.0 * f64::from(FREQUENCY);
    ensure!(
        spin_samples(&first) as f64 >= 0.5 * expected,
        "{} samples of spin in the first profile (2 s of CPU at {FREQUENCY} Hz: ~{expected}); its Python \
         frames: {:?}; agent output:\n{}",
        spin_samples(&first),
        python_frames(&first, pid),
        run.log
    );
    ensure!(
        first.samples.iter().all(|sample| sample.label("my-extra-label") == Some("data")),
        "a sample of my-python-app lacks my-extra-label=data; agent output:\n{}",
        run.log
    );
    let second = Profile::load(&files[1..])?;
    ensure!(second.samples.iter().all(|sample| sample.label("round") == Some("2")), "second start's label missing");
    // 2 s and 1 s of CPU: the 0.5 s spun between stop and start is in neither (that would
    // make 2.5 or 1.33 times as many). A ratio, not counts: on a busy host, cpu-clock sampling
    // has been seen to count up to 1.5 times a thread's CPU time, but alike from one second
    // to the next.
    let (a, b) = (spin_samples(&first) as f64, spin_samples(&second) as f64);
    ensure!((1.6..=2.3).contains(&(a / b.max(1.0))), "spin samples {a} and {b}, not 2:1");
    Ok(())
}

/// CPU samples per second in [`check_example`]: ~1,000 and ~500 samples in its two profiles,
/// so that their ratio, 2, is known within about 0.1.
const FREQUENCY: u32 = 499;

/// The Python frames (function, file) of `pid`'s samples in `profile`, with their counts.
fn python_frames(profile: &Profile, pid: u32) -> std::collections::BTreeMap<(String, String), i64> {
    let mut frames = std::collections::BTreeMap::new();
    for sample in profile.samples_of_pid(pid) {
        for frame in sample.frames.iter().filter(|frame| frame.file.ends_with(".py")) {
            *frames.entry((frame.function.clone(), frame.file.clone())).or_default() += sample.count();
        }
    }
    frames
}

/// A thread of a registered process, and a child it forks (which registers itself again
/// through `os.register_at_fork`), are profiled under its name and labels.
#[test]
fn threads_and_forked_children_keep_the_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("control.sock");
    let agent = Agent::start(&["--period", "60s", "--control-socket", socket.to_str().unwrap()])?;
    let mut workload = start_with_package(PYENV_PYTHON_3_11, "api_fork.py", &[], &socket)?;
    let parent = workload.pid();
    workload.wait_for_line("done", Duration::from_secs(30))?;
    let run = agent.stop()?;
    drop(workload);
    let profile = Profile::load(&profile_files(run.output_dir.path(), "forking-app")?)?;
    let in_function = |function: &str| -> (i64, Vec<String>) {
        let samples: Vec<_> = profile.samples.iter().filter(|sample| sample.has_function(function)).collect();
        let pids = samples.iter().filter_map(|sample| sample.label("pid").map(str::to_owned)).collect();
        (samples.iter().map(|sample| sample.count()).sum(), pids)
    };
    let (thread_samples, thread_pids) = in_function("in_thread");
    let (child_samples, child_pids) = in_function("in_child");
    ensure!(
        thread_samples >= 50,
        "{thread_samples} samples of the thread under forking-app; agent output:\n{}",
        run.log
    );
    ensure!(thread_pids.iter().all(|pid| *pid == parent.to_string()), "thread samples from pids {thread_pids:?}");
    ensure!(child_samples >= 50, "{child_samples} samples of the child under forking-app; agent output:\n{}", run.log);
    ensure!(child_pids.iter().all(|pid| *pid != parent.to_string()), "child samples from pids {child_pids:?}");
    ensure!(profile.samples.iter().all(|sample| sample.label("kind") == Some("api")), "a sample lacks kind=api");
    Ok(())
}

/// `with profiler.labels(endpoint=...)`: samples taken inside a block carry its labels; a
/// loop that spends 60% of its CPU on /checkout and 40% on /search shows that split.
#[test]
fn context_labels_split_the_samples_by_endpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("control.sock");
    let agent = Agent::start(&["--period", "60s", "--frequency", "499", "--control-socket", socket.to_str().unwrap()])?;
    let mut workload = start_with_package(PYENV_PYTHON_3_11, "api_labels.py", &["4"], &socket)?;
    workload.wait_for_line("done", Duration::from_secs(30))?;
    let run = agent.stop()?;
    drop(workload);
    let profile = Profile::load(&profile_files(run.output_dir.path(), "labelled-app")?)?;
    let handling: Vec<_> = profile.samples.iter().filter(|sample| sample.has_function("handle")).collect();
    let of = |endpoint: &str| -> f64 {
        handling
            .iter()
            .filter(|sample| sample.label("endpoint") == Some(endpoint))
            .map(|sample| sample.count() as f64)
            .sum()
    };
    let total: f64 = handling.iter().map(|sample| sample.count() as f64).sum();
    let (checkout, search) = (of("/checkout") / total, of("/search") / total);
    eprintln!("handle: {total} samples, /checkout {checkout:.3}, /search {search:.3}");
    ensure!(total >= 1000.0, "{total} samples of handle; agent output:\n{}", run.log);
    ensure!(
        (checkout - 0.6).abs() <= 0.03 && (search - 0.4).abs() <= 0.03,
        "/checkout {checkout:.3} and /search {search:.3} of handle's samples, not 0.6 and 0.4"
    );
    Ok(())
}

/// With no agent on the host, a root process starts one for itself alone (the binary from
/// `$FERROSCOPE_BIN`), with its own period, and `stop()` ends it after it has shipped.
#[test]
fn without_an_agent_a_privileged_process_starts_its_own() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let output = dir.path().join("profiles");
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let script = e2e::workload("api_example.py");
    let binary = e2e::ferroscope_bin();
    let mut workload = Workload::start_program(
        Path::new(PYENV_PYTHON_3_11),
        &[script.to_str().unwrap()],
        &[
            ("PYTHONPATH", package.to_str().unwrap()),
            ("FERROSCOPE_SOCKET", dir.path().join("no-agent.sock").to_str().unwrap()),
            ("FERROSCOPE_BIN", binary.to_str().unwrap()),
            ("FERROSCOPE_OUTPUT_DIR", output.to_str().unwrap()),
        ],
    )?;
    let pid = workload.pid();
    workload.wait_for_line("done", Duration::from_secs(60))?;
    drop(workload);
    let files = profile_files(&output, "my-python-app")?;
    ensure!(files.len() == 2, "{} profiles of my-python-app from its own agents: {files:?}", files.len());
    let profile = Profile::load(&files)?;
    let spinning: i64 =
        profile.samples_of_pid(pid).filter(|sample| sample.has_function("spin")).map(|sample| sample.count()).sum();
    ensure!(spinning >= 200, "{spinning} samples of spin");
    Ok(())
}

/// `Profiler(period=1)` under an agent whose period is a minute: the process's profiles
/// come every second all the same.
#[test]
fn a_process_gets_its_own_period() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("control.sock");
    let agent = Agent::start(&["--period", "60s", "--control-socket", socket.to_str().unwrap()])?;
    let mut workload = start_with_package(PYENV_PYTHON_3_11, "api_period.py", &[], &socket)?;
    workload.wait_for_line("done", Duration::from_secs(30))?;
    let files = profile_files(agent.output_dir(), "own-period")?;
    let run = agent.stop()?;
    drop(workload);
    ensure!(
        files.len() >= 3,
        "{} profiles of own-period within 3.5 s: {files:?}; agent output:\n{}",
        files.len(),
        run.log
    );
    Ok(())
}

#[test]
fn without_an_agent_start_warns_or_raises_when_required() -> Result<()> {
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let code = "import warnings\n\
                from ferroscope import Profiler, AgentUnavailable\n\
                with warnings.catch_warnings(record=True) as caught:\n\
                \x20   warnings.simplefilter('always')\n\
                \x20   started = Profiler('app', socket_path='/nonexistent.sock').start()\n\
                assert started is False, started\n\
                assert 'no agent' in str(caught[0].message), caught\n\
                try:\n\
                \x20   Profiler('app', socket_path='/nonexistent.sock', required=True).start()\n\
                except AgentUnavailable:\n\
                \x20   print('raised')\n";
    let output = std::process::Command::new(PYENV_PYTHON_3_11)
        .args(["-c", code])
        .env("PYTHONPATH", &package)
        // No binary to start an agent with.
        .env_remove("FERROSCOPE_BIN")
        .output()?;
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "raised",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The wheel (maturin, `python/pyproject.toml`) installs the package and the agent: in a
/// fresh environment, with no agent on the host and nothing on `PATH`, the example starts the
/// agent the wheel brought and its profiles arrive.
#[test]
fn the_wheel_brings_the_agent() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tools = root.join("target/tools/venv/bin");
    let maturin = tools.join("maturin");
    let install = "run `cargo xtask setup --test`, which installs it in the tools' Python environment";
    if !e2e::tool_installed(maturin.to_str().context("a UTF-8 path")?, install)? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Run in `python/`, where maturin finds pyproject.toml.
    let run = |program: &Path, args: &[&str], env: &[(&str, &Path)]| -> Result<()> {
        let output = std::process::Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(root.join("python"))
            .output()?;
        let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.success(), "{} {args:?} failed:\n{log}", program.display());
        Ok(())
    };
    let wheels = dir.path().join("wheels");
    let object = root.join("profiler-ebpf/target/bpfel-unknown-none/release/profiler-ebpf");
    run(
        &tools.join("maturin"),
        &["build", "--release", "--quiet", "-o", wheels.to_str().unwrap()],
        &[("FERROSCOPE_EBPF_OBJECT", &object)],
    )?;
    let wheel = std::fs::read_dir(&wheels)?.next().context("no wheel built")??.path();
    let venv = dir.path().join("venv");
    run(Path::new(PYENV_PYTHON_3_11), &["-m", "venv", venv.to_str().unwrap()], &[])?;
    run(&venv.join("bin/pip"), &["install", "--quiet", "--no-index", wheel.to_str().unwrap()], &[])?;

    let output_dir = dir.path().join("profiles");
    let script = e2e::workload("api_example.py");
    let workload = std::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .env_remove("FERROSCOPE_BIN")
        .env("PATH", "/usr/bin:/bin")
        .env("FERROSCOPE_SOCKET", dir.path().join("no-agent.sock"))
        .env("FERROSCOPE_OUTPUT_DIR", &output_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = workload.id();
    let mut killer = KillOnDrop(workload);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(killer.0.stdout.take().context("stdout")?), &mut line)?;
    ensure!(line.trim() == "done", "the example printed {line:?}");
    drop(killer);
    let files = profile_files(&output_dir, "my-python-app")?;
    let profile = Profile::load(&files)?;
    ensure!(profile.samples_of_pid(pid).any(|sample| sample.has_function("spin")), "no sample of spin arrived");
    Ok(())
}

/// Kills the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The package on the newest CPython here, Debian's 3.14 (in its root): it imports, and
/// without an agent warns and returns False.
#[test]
fn the_package_runs_on_3_14() -> Result<()> {
    let python = "/usr/bin/python3.14";
    if !e2e::installed(Some(e2e::DEBIAN_ROOT), python)? {
        return Ok(());
    }
    let package = Path::new(e2e::DEBIAN_ROOT).join("tmp/ferroscope-e2e/package/ferroscope");
    std::fs::create_dir_all(&package)?;
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/ferroscope/__init__.py");
    std::fs::copy(source, package.join("__init__.py"))?;
    let code = "import warnings, sys\n\
                from ferroscope import Profiler\n\
                with warnings.catch_warnings(record=True) as caught:\n\
                \x20   warnings.simplefilter('always')\n\
                \x20   assert Profiler('app', socket_path='/nonexistent.sock').start() is False\n\
                assert 'no agent' in str(caught[0].message), caught\n\
                print(sys.version_info[:2])\n";
    let output = std::process::Command::new("chroot")
        .args([e2e::DEBIAN_ROOT, python, "-c", code])
        .env("PYTHONPATH", "/tmp/ferroscope-e2e/package")
        .env_remove("FERROSCOPE_BIN")
        .output()?;
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "(3, 14)",
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
