//! Memory profiling (`--memory`): allocations, allocated bytes and heap in use, estimated
//! from allocations sampled by bytes, against workloads whose answer is known.

use std::{thread, time::Duration};

use anyhow::{ensure, Result};
use e2e::{profile_files, Agent, Profile, Sample, Workload, DEBIAN_PYTHON_3_11, PYENV_PYTHON_3_11, PYENV_PYTHON_3_13};

const MIB: f64 = 1048576.0;
const SAMPLE_TYPES: [&str; 8] = [
    "samples/count",
    "cpu/nanoseconds",
    "wall/nanoseconds",
    "off_cpu/nanoseconds",
    "alloc_objects/count",
    "alloc_space/bytes",
    "inuse_objects/count",
    "inuse_space/bytes",
];
const ALLOC_SPACE: usize = 5;
const INUSE_SPACE: usize = 7;

fn total<'a>(samples: impl Iterator<Item = &'a Sample>, value: usize) -> f64 {
    samples.map(|sample| sample.values[value] as f64).sum()
}

/// The profile of a workload run under `ferroscope agent --memory`, the agent stopped once
/// the workload prints `ready` (and still holds what it keeps); with its pid.
fn profile_of(python: &str, script: &str, args: &[&str], ready: &str) -> Result<(Profile, u32, String)> {
    let agent = Agent::start(&["--memory", "--period", "60s"])?;
    let mut workload = Workload::start(python, script, args)?;
    let pid = workload.pid();
    workload.wait_for_line(ready, Duration::from_secs(60))?;
    // Samples of the last allocations reach the agent on its next read.
    thread::sleep(Duration::from_millis(500));
    let run = agent.stop()?;
    drop(workload);
    let profile = Profile::load(&profile_files(run.output_dir.path(), script)?)?;
    ensure!(profile.sample_types == SAMPLE_TYPES, "sample types {:?}", profile.sample_types);
    Ok((profile, pid, run.log))
}

/// `allocations.py`: per round `churn` allocates and drops 2 MiB, `keep` allocates and keeps
/// 1 MiB, `small_dicts` allocates small dicts. `churn` has about twice the allocated bytes of
/// `keep`; what is in use at the end is `keep`'s 200 MiB.
fn check_allocations(python: &str) -> Result<()> {
    let (profile, pid, log) = profile_of(python, "allocations.py", &["200"], "holding")?;
    let samples = || profile.samples_of_pid(pid);
    let allocated = |function: &str| total(samples().filter(|s| s.has_function(function)), ALLOC_SPACE);
    let (churn, keep, dicts) = (allocated("churn"), allocated("keep"), allocated("small_dicts"));
    let churn_share = churn / (churn + keep);
    eprintln!(
        "{python}: allocated: churn {:.0} MiB, keep {:.0} MiB, small_dicts {:.1} MiB; churn's share {churn_share:.3}",
        churn / MIB,
        keep / MIB,
        dicts / MIB
    );
    ensure!(
        (churn_share - 2.0 / 3.0).abs() <= 0.10,
        "churn has {churn_share:.3} of churn + keep, not 2/3; log:\n{log}"
    );
    ensure!(dicts > 0.0, "no allocation sampled in small_dicts; log:\n{log}");

    let in_use = total(samples(), INUSE_SPACE);
    let kept = total(samples().filter(|s| s.has_function("keep")), INUSE_SPACE);
    eprintln!("{python}: in use: {:.0} MiB, {:.0} MiB of it from keep", in_use / MIB, kept / MIB);
    ensure!(kept >= 0.8 * in_use, "keep holds {kept:.0} of {in_use:.0} bytes in use, under 80%; log:\n{log}");
    ensure!((kept / (200.0 * MIB) - 1.0).abs() <= 0.25, "keep holds {:.0} MiB, not 200 MiB ± 25%", kept / MIB);
    Ok(())
}

#[test]
fn allocated_and_live_bytes_by_function_on_3_11() -> Result<()> {
    check_allocations(PYENV_PYTHON_3_11)
}

#[test]
fn allocated_and_live_bytes_by_function_on_3_13() -> Result<()> {
    check_allocations(PYENV_PYTHON_3_13)
}

/// Debian's build has no symbol table: its allocations are probed at libc's `malloc`.
#[test]
fn allocated_and_live_bytes_by_function_on_a_stripped_build() -> Result<()> {
    check_allocations(DEBIAN_PYTHON_3_11)
}

/// `small_objects.py`: only objects of 16 bytes (and the lists that hold them), 75% of them
/// from `three_quarters`, sampled through the pymalloc pools they fill.
#[test]
fn small_objects_are_attributed_by_the_pools_they_fill() -> Result<()> {
    let (profile, pid, log) = profile_of(PYENV_PYTHON_3_11, "small_objects.py", &["40"], "done 400000")?;
    let samples = || profile.samples_of_pid(pid);
    let allocated = |function: &str| total(samples().filter(|s| s.has_function(function)), ALLOC_SPACE);
    let (big, small) = (allocated("three_quarters"), allocated("one_quarter"));
    let share = big / (big + small);
    eprintln!("allocated: three_quarters {:.1} MiB, one_quarter {:.1} MiB: {share:.3}", big / MIB, small / MIB);
    ensure!((share - 0.75).abs() <= 0.10, "three_quarters has {share:.3} of the bytes, not 0.75; log:\n{log}");
    Ok(())
}
