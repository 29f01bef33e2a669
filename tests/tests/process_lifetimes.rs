//! Processes the agent did not see at its start, including one that exits long before the
//! agent writes its profile, are profiled with their Python functions.

use std::thread;
use std::time::Duration;

use anyhow::{ensure, Result};
use e2e::{profile_files, Agent, Profile, Workload, PYENV_PYTHON_3_11};

#[test]
fn started_after_agent_and_exiting_early_on_pyenv_python_3_11_7() -> Result<()> {
    eprintln!("interpreter: {PYENV_PYTHON_3_11}");
    let agent = Agent::start(&[])?;
    // Exits ~4.5 s before the agent stops.
    let early = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["1.5"])?;
    let early_pid = early.pid();
    early.wait()?;
    thread::sleep(Duration::from_secs(1));
    let late = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["2.5"])?;
    let late_pid = late.pid();
    late.wait()?;
    thread::sleep(Duration::from_secs(1));
    let run = agent.stop()?;

    let profile = Profile::load(&profile_files(run.output_dir.path(), "spin.py")?)?;
    for (process, pid, seconds) in
        [("the early-exiting process", early_pid, 1.5), ("the late-started process", late_pid, 2.5)]
    {
        let count: i64 =
            profile.samples_of_pid(pid).filter(|sample| sample.has_function("spin")).map(|sample| sample.count()).sum();
        // 100 Hz over the seconds of CPU it used; allow for the interpreter's start.
        let expected = seconds * 100.0;
        ensure!(
            count as f64 >= 0.5 * expected,
            "{process} (pid {pid}, {seconds} s of CPU) has {count} samples in spin, expected ~{expected}; agent output:\n{}",
            run.log
        );
    }
    Ok(())
}
