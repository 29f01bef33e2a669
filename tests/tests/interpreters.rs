//! CPython is found from the binary itself wherever it lives: a renamed interpreter, a
//! program that embeds libpython (running Python in its main thread, and in a thread C
//! created), a program that loads libpython late with `dlopen`, and a worker forked without
//! exec.

use std::collections::BTreeSet;
use std::path::Path;
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

/// Compiles `tests/workloads/SOURCE` with `gcc_args`, runs it with `args` (and pyenv's 3.11
/// as its Python home) under the agent, and checks that the agent found CPython 3.11.7 in
/// it; returns the threads its `spin` samples ran on, and its pid.
fn run_c_program(source: &str, gcc_args: &[String], args: &[&str]) -> Result<(BTreeSet<String>, u32)> {
    let dir = tempfile::tempdir()?;
    let binary = dir.path().join(source.trim_end_matches(".c"));
    let output = Command::new("gcc")
        .arg(workload(source))
        .args(gcc_args)
        .arg("-o")
        .arg(&binary)
        .output()
        .context("running gcc")?;
    ensure!(output.status.success(), "gcc failed: {}", String::from_utf8_lossy(&output.stderr));
    let agent = Agent::start(&[])?;
    // PYTHONHOME: where the embedded interpreter finds its standard library.
    let program = Workload::start_program(&binary, args, &[("PYTHONHOME", PYENV_3_11)])?;
    let pid = program.pid();
    program.wait()?;
    let run = agent.stop()?;
    ensure!(run.log.contains(&format!("pid {pid}: CPython 3.11.7")), "agent output:\n{}", run.log);
    Ok((spin_threads(&run, pid)?, pid))
}

/// Runs [`embedder.c`](../workloads/embedder.c), linked with pyenv's libpython 3.11, with
/// Python in its `main` thread or in a `thread` C creates.
fn run_embedder(thread: &str) -> Result<(BTreeSet<String>, u32)> {
    let gcc_args = [
        format!("-I{PYENV_3_11}/include/python3.11"),
        format!("-L{PYENV_3_11}/lib"),
        format!("-Wl,-rpath,{PYENV_3_11}/lib"),
        "-lpython3.11".to_owned(),
        "-lpthread".to_owned(),
    ];
    run_c_program("embedder.c", &gcc_args, &[workload("").to_str().unwrap(), "2", thread])
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
    // Seen first as a native process, then again once it mapped libpython.
    let libpython = format!("{PYENV_3_11}/lib/libpython3.11.so.1.0");
    run_c_program("dlopener.c", &["-ldl".to_owned()], &[&libpython, workload("").to_str().unwrap(), "2"])?;
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
