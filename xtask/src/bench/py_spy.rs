//! The peer of the known-split benchmark: the workload under `py-spy record`, its
//! attribution read from py-spy's collapsed stacks.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{ensure, Result};
use e2e::{max_deviation_pp, workload, PYENV_PYTHON_3_11};

use super::measure::children_cpu_seconds;
use super::{workload_times, Measurements, Options, EXPECTED_SHARES, FUNCTIONS, RATE};
use crate::setup;

/// One run of the known split under `py-spy record`: its time, py-spy's CPU time and its
/// attribution error.
pub(super) fn run_py_spy(options: &Options, measurements: &mut Measurements) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("py-spy.txt");
    let children_cpu_before = children_cpu_seconds();
    let output = py_spy_record(&[], &raw, "split.py", &["--rounds", &options.rounds.to_string()])?;
    let (elapsed, workload_cpu) = workload_times(&output)?;
    measurements.elapsed.push(elapsed);
    // py-spy reaped the workload, so our children's CPU time holds both: take the workload's out.
    let py_spy_cpu = children_cpu_seconds() - children_cpu_before - workload_cpu;
    measurements.profiler_cpu_percent.push(100.0 * py_spy_cpu / elapsed);

    // Collapsed stacks: `frame;frame;... count`, each frame `function (file:line)`.
    let mut counts = [0.0; 3];
    let mut total = 0.0;
    for line in fs::read_to_string(&raw)?.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: f64 = count.parse()?;
        let functions: Vec<&str> = stack.split(';').map(|frame| frame.split(" (").next().unwrap()).collect();
        let mut any = false;
        for (i, function) in FUNCTIONS.iter().enumerate() {
            // py-spy names methods without their class.
            let method = function.rsplit('.').next().unwrap();
            if functions.iter().any(|name| name == function || *name == method) {
                counts[i] += count;
                any = true;
            }
        }
        if any {
            total += count;
        }
    }
    ensure!(total > 0.0, "py-spy recorded no sample of {FUNCTIONS:?}");
    let shares: Vec<f64> = counts.iter().map(|count| count / total).collect();
    measurements.errors.push(max_deviation_pp(&shares, &EXPECTED_SHARES));
    for (sum, count) in measurements.function_samples.iter_mut().zip(counts) {
        *sum += count;
    }
    Ok(())
}

/// Runs `py-spy record` (at RATE, `--nonblocking`, collapsed stacks into `raw`, with `flags`
/// added) on `script ARGS` under CPython 3.11; returns what the workload printed.
fn py_spy_record(flags: &[&str], raw: &Path, script: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(setup::py_spy())
        .args(["record", "--rate", RATE, "--nonblocking", "--format", "raw"])
        .args(flags)
        .arg("-o")
        .arg(raw)
        .args(["--", PYENV_PYTHON_3_11])
        .arg(workload(script))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    ensure!(output.status.success(), "py-spy failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?)
}
