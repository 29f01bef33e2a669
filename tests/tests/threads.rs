//! Threads that run native code without the GIL keep their Python stacks: the thread state
//! is found per thread, not taken from whichever thread holds the GIL.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use e2e::{profile_files, Agent, Profile, Workload, PYENV_PYTHON_3_11};

const FUNCTIONS: [&str; 2] = ["hash_in_thread_a", "hash_in_thread_b"];

#[test]
fn threads_without_the_gil_on_pyenv_python_3_11_7() -> Result<()> {
    eprintln!("interpreter: {PYENV_PYTHON_3_11}");
    let agent = Agent::start(&["--frequency", "499"])?;
    let workload = Workload::start(PYENV_PYTHON_3_11, "gil_free.py", &["3"])?;
    let pid = workload.pid();
    workload.wait()?;
    let run = agent.stop()?;
    let profile = Profile::load(&profile_files(run.output_dir.path(), "gil_free.py")?)?;

    // Per thread: its samples, and those with its hashing function on the stack.
    let mut threads: HashMap<&str, (i64, [i64; 2])> = HashMap::new();
    for sample in profile.samples_of_pid(pid) {
        let Some(tid) = sample.label("tid") else { continue };
        let entry = threads.entry(tid).or_default();
        entry.0 += sample.count();
        for (i, function) in FUNCTIONS.iter().enumerate() {
            if sample.has_function(function) {
                entry.1[i] += sample.count();
            }
        }
    }
    for (i, function) in FUNCTIONS.iter().enumerate() {
        // The thread that ran `function`: the one with most samples of it.
        let (tid, (total, named)) = threads
            .iter()
            .max_by_key(|(_, (_, named))| named[i])
            .filter(|(_, (_, named))| named[i] > 0)
            .ok_or_else(|| anyhow::anyhow!("no sample contains {function}; agent output:\n{}", run.log))?;
        // ~1,500 samples of 3 s of CPU at 499 Hz.
        ensure!(*total >= 750, "thread {tid} of {function} has only {total} samples");
        let share = named[i] as f64 / *total as f64;
        ensure!(
            share >= 0.95,
            "only {:.1}% of the samples of thread {tid} show {function} (the rest lost their Python \
             stack while the thread ran without the GIL); agent output:\n{}",
            100.0 * share,
            run.log
        );
    }
    Ok(())
}
