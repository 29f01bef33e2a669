//! CPython is found from the binary itself wherever it lives: a renamed interpreter, a
//! program that embeds libpython (running Python in its main thread, and in a thread C
//! created), a program that loads libpython late with `dlopen`, and a worker forked without
//! exec.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use e2e::{workload, Agent, AgentRun, Workload, DEBIAN_PYTHON_3_11, PYENV_PYTHON_3_11};

/// pyenv's 3.11, whose headers and shared libpython the embedding program builds against.
const PYENV_3_11: &str = "/root/.pyenv/versions/3.11.7";

/// Checks that the run has samples of `pid` in `spin`; returns the threads they ran on.
fn spin_threads(run: &AgentRun, pid: u32) -> Result<BTreeSet<String>> {
    let profile = run.all_profiles()?;
    let spinning: Vec<_> = profile.samples_of_pid(pid).filter(|sample| sample.has_function("spin")).collect();
    let count: i64 = spinning.iter().map(|sample| sample.count()).sum();
    // ~200 at 100 Hz for 2 s of CPU.
    ensure!(count >= 100, "only {count} samples of pid {pid} in spin; agent output:\n{}", run.log);
    Ok(spinning.iter().filter_map(|sample| sample.label("tid")).map(str::to_owned).collect())
}

#[test]
fn renamed_static_interpreter_debian_python_3_11_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let renamed = dir.path().join("billing-service");
    std::fs::copy(DEBIAN_PYTHON_3_11, &renamed)?;
    let agent = Agent::start(&[])?;
    let script = workload("spin.py");
    let spin = Workload::start_program(&renamed, &[script.to_str().unwrap(), "2"], &[])?;
    let pid = spin.pid();
    spin.wait()?;
    let run = agent.stop()?;
    spin_threads(&run, pid)?;
    // The version comes from the binary, not from its name.
    ensure!(run.log.contains(&format!("pid {pid}: CPython 3.11.2")), "agent output:\n{}", run.log);
    Ok(())
}

/// Builds [`embedder.c`](../workloads/embedder.c) against pyenv's libpython 3.11 into `dir`.
fn build_embedder(dir: &Path) -> Result<PathBuf> {
    let embedder = dir.join("embedder");
    let output = Command::new("gcc")
        .arg(workload("embedder.c"))
        .arg(format!("-I{PYENV_3_11}/include/python3.11"))
        .arg(format!("-L{PYENV_3_11}/lib"))
        .arg(format!("-Wl,-rpath,{PYENV_3_11}/lib"))
        .args(["-lpython3.11", "-lpthread", "-o"])
        .arg(&embedder)
        .output()
        .context("running gcc")?;
    ensure!(output.status.success(), "gcc failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(embedder)
}

/// Runs the embedding program with Python in `thread` (`main` or `thread`); returns the
/// threads its `spin` samples ran on, and its pid.
fn run_embedder(thread: &str) -> Result<(BTreeSet<String>, u32)> {
    let dir = tempfile::tempdir()?;
    let embedder = build_embedder(dir.path())?;
    let agent = Agent::start(&[])?;
    let workloads = workload("");
    let program = Workload::start_program(
        &embedder,
        &[workloads.to_str().unwrap(), "2", thread],
        // Where the embedded interpreter finds its standard library.
        &[("PYTHONHOME", PYENV_3_11)],
    )?;
    let pid = program.pid();
    program.wait()?;
    let run = agent.stop()?;
    ensure!(run.log.contains(&format!("pid {pid}: CPython 3.11.7")), "agent output:\n{}", run.log);
    Ok((spin_threads(&run, pid)?, pid))
}

#[test]
fn program_embedding_pyenv_libpython_3_11_7() -> Result<()> {
    let (threads, pid) = run_embedder("main")?;
    ensure!(threads == BTreeSet::from([pid.to_string()]), "spin ran on threads {threads:?}, not the main one");
    Ok(())
}

#[test]
fn thread_created_by_c_in_embedded_pyenv_libpython_3_11_7() -> Result<()> {
    let (threads, pid) = run_embedder("thread")?;
    ensure!(
        threads.len() == 1 && !threads.contains(&pid.to_string()),
        "spin ran on threads {threads:?}, not on the one thread C created"
    );
    Ok(())
}

#[test]
fn libpython_loaded_late_with_dlopen_pyenv_3_11_7() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dlopener = dir.path().join("dlopener");
    let output = Command::new("gcc")
        .arg(workload("dlopener.c"))
        .args(["-ldl", "-o"])
        .arg(&dlopener)
        .output()
        .context("running gcc")?;
    ensure!(output.status.success(), "gcc failed: {}", String::from_utf8_lossy(&output.stderr));
    let agent = Agent::start(&[])?;
    let libpython = format!("{PYENV_3_11}/lib/libpython3.11.so.1.0");
    let workloads = workload("");
    let program = Workload::start_program(
        &dlopener,
        &[&libpython, workloads.to_str().unwrap(), "2"],
        &[("PYTHONHOME", PYENV_3_11)],
    )?;
    let pid = program.pid();
    program.wait()?;
    let run = agent.stop()?;
    // Seen first as a native process, then again once it mapped libpython.
    ensure!(run.log.contains(&format!("pid {pid}: CPython 3.11.7")), "agent output:\n{}", run.log);
    spin_threads(&run, pid)?;
    Ok(())
}

#[test]
fn worker_forked_without_exec_pyenv_python_3_11_7() -> Result<()> {
    ensure!(Path::new(PYENV_PYTHON_3_11).exists(), "{PYENV_PYTHON_3_11} is missing");
    let agent = Agent::start(&[])?;
    let parent = Workload::start(PYENV_PYTHON_3_11, "fork_worker.py", &["2"])?;
    let parent_pid = parent.pid();
    let child_pid: u32 = parent.wait()?.trim().parse().context("the child's pid")?;
    let run = agent.stop()?;
    ensure!(child_pid != parent_pid);
    spin_threads(&run, child_pid)?;
    Ok(())
}
