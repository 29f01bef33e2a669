//! With `--pid`, the agent samples that process only.

use std::thread;
use std::time::Duration;

use anyhow::{ensure, Result};
use e2e::{Agent, Workload, PYENV_PYTHON_3_11};

#[test]
fn pid_mode_samples_only_that_pid_on_pyenv_python_3_11_7() -> Result<()> {
    eprintln!("interpreter: {PYENV_PYTHON_3_11}");
    let target = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["8"])?;
    let bystander = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["8"])?;
    // Let the interpreters start, so that the agent finds Python in the target at once.
    thread::sleep(Duration::from_millis(500));
    let target_pid = target.pid().to_string();
    let agent = Agent::start(&["--pid", &target_pid])?;
    thread::sleep(Duration::from_secs(3));
    let run = agent.stop()?;

    let profile = run.all_profiles()?;
    let others: Vec<_> =
        profile.samples.iter().filter(|sample| sample.label("pid") != Some(target_pid.as_str())).collect();
    ensure!(
        others.is_empty(),
        "{} of {} samples are not of pid {target_pid} (the bystander is {}); their pid labels: {:?}",
        others.len(),
        profile.samples.len(),
        bystander.pid(),
        others.iter().map(|sample| sample.label("pid")).collect::<std::collections::BTreeSet<_>>()
    );
    let spinning: i64 =
        profile.samples.iter().filter(|sample| sample.has_function("spin")).map(|sample| sample.count()).sum();
    // ~300 at 100 Hz, fewer if other work takes the CPUs: the point here is which pids appear.
    ensure!(spinning >= 50, "only {spinning} samples of pid {target_pid} in spin (expected ~300)");
    Ok(())
}
