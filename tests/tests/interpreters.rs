//! CPython is found from the binary itself wherever it lives: a renamed interpreter, a
//! program that embeds libpython, and a worker forked without exec.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use e2e::{workload, Agent, AgentRun, Workload, DEBIAN_PYTHON_3_11, PYENV_PYTHON_3_11};

/// pyenv's 3.11, whose headers and shared libpython the embedding program builds against.
const PYENV_3_11: &str = "/root/.pyenv/versions/3.11.7";

/// Checks that the run has samples of `pid` in `spin`, and returns their count.
fn spin_samples(run: &AgentRun, pid: u32) -> Result<i64> {
    let profile = run.all_profiles()?;
    let spinning: i64 =
        profile.samples_of_pid(pid).filter(|sample| sample.has_function("spin")).map(|sample| sample.count()).sum();
    // ~200 at 100 Hz for 2 s of CPU.
    ensure!(spinning >= 100, "only {spinning} samples of pid {pid} in spin; agent output:\n{}", run.log);
    Ok(spinning)
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
    spin_samples(&run, pid)?;
    // The version comes from the binary, not from its name.
    ensure!(run.log.contains(&format!("pid {pid}: CPython 3.11.2")), "agent output:\n{}", run.log);
    Ok(())
}

#[test]
fn program_embedding_pyenv_libpython_3_11_7() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let embedder = dir.path().join("embedder");
    let output = Command::new("gcc")
        .arg(workload("embedder.c"))
        .arg(format!("-I{PYENV_3_11}/include/python3.11"))
        .arg(format!("-L{PYENV_3_11}/lib"))
        .arg(format!("-Wl,-rpath,{PYENV_3_11}/lib"))
        .args(["-lpython3.11", "-o"])
        .arg(&embedder)
        .output()
        .context("running gcc")?;
    ensure!(output.status.success(), "gcc failed: {}", String::from_utf8_lossy(&output.stderr));
    let agent = Agent::start(&[])?;
    let workloads = workload("");
    let program = Workload::start_program(
        &embedder,
        &[workloads.to_str().unwrap(), "2"],
        // Where the embedded interpreter finds its standard library.
        &[("PYTHONHOME", PYENV_3_11)],
    )?;
    let pid = program.pid();
    program.wait()?;
    let run = agent.stop()?;
    spin_samples(&run, pid)?;
    ensure!(run.log.contains(&format!("pid {pid}: CPython 3.11.7")), "agent output:\n{}", run.log);
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
    spin_samples(&run, child_pid)?;
    Ok(())
}
