//! With `--pid`, the agent samples that process only.

use std::time::Duration;

use anyhow::{ensure, Result};
use e2e::{wait_for_cpu, Agent, Workload, PYENV_PYTHON_3_11};

/// The target's CPU time sampled, and what a busy host may take to give it that.
const CPU_SECONDS: f64 = 2.0;
const CPU_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn pid_mode_samples_only_that_pid_on_pyenv_python_3_11_7() -> Result<()> {
    eprintln!("interpreter: {PYENV_PYTHON_3_11}");
    // Both spin until killed (dropped), however long a busy host makes this.
    let target = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["600"])?;
    let bystander = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["600"])?;
    // Let the interpreter start (its startup takes a few tens of milliseconds of CPU), so that
    // the agent finds Python in the target at once.
    wait_for_cpu(target.pid(), 0.2, CPU_TIMEOUT)?;
    let target_pid = target.pid().to_string();
    let agent = Agent::start(&["--pid", &target_pid])?;
    // CPU time, not a sleep: on a busy host a few seconds may give the target little of it.
    wait_for_cpu(target.pid(), CPU_SECONDS, CPU_TIMEOUT)?;
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
    // ~200 at 100 Hz over those 2 s of CPU: the point here is which pids appear.
    let expected = CPU_SECONDS * 100.0;
    ensure!(
        spinning as f64 >= 0.5 * expected,
        "only {spinning} samples of pid {target_pid} in spin (expected ~{expected}); agent output:\n{}",
        run.log
    );
    Ok(())
}
