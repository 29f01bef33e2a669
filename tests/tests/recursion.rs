//! Stacks of a 100-deep recursion must hold every recursive frame, in order; deeper ones
//! are cut at the kernel's limit with a `[truncated]` frame.

use std::fs;

use anyhow::{ensure, Context, Result};
use e2e::{profile_files, workload, Agent, Profile, Workload, PYENV_PYTHON_3_11};

/// The Python frames the agent reads at most.
const FRAME_LIMIT: usize = 160;
const TRUNCATED: &str = "[truncated]";

/// A Python frame: function and line.
type PythonFrame = (String, i64);

/// Runs `recurse.py CPU_SECONDS DEPTH` under the agent; returns the Python frames (and the
/// `[truncated]` frame), leaf first, of each sample in `burn`, with the sample's count.
fn stacks_in_burn(cpu_seconds: &str, depth: &str) -> Result<Vec<(i64, Vec<PythonFrame>)>> {
    let agent = Agent::start(&[])?;
    let recursion = Workload::start(PYENV_PYTHON_3_11, "recurse.py", &[cpu_seconds, depth])?;
    let pid = recursion.pid();
    recursion.wait()?;
    let run = agent.stop()?;
    let profile = Profile::load(&profile_files(run.output_dir.path(), "recurse.py")?)?;
    let stacks: Vec<_> = profile
        .samples_of_pid(pid)
        .filter(|sample| sample.has_function("burn"))
        .map(|sample| {
            let frames = sample
                .frames
                .iter()
                .filter(|frame| frame.file.ends_with("recurse.py") || frame.function == TRUNCATED)
                .map(|frame| (frame.function.clone(), frame.line))
                .collect();
            (sample.count(), frames)
        })
        .collect();
    let count: i64 = stacks.iter().map(|(count, _)| count).sum();
    // 100 Hz over the seconds of CPU.
    let expected = cpu_seconds.parse::<f64>()? * 100.0;
    ensure!(
        count as f64 >= 0.5 * expected,
        "only {count} samples contain burn, expected ~{expected}; agent output:\n{}",
        run.log
    );
    Ok(stacks)
}

#[test]
fn recursion_100_deep_on_pyenv_python_3_11_7() -> Result<()> {
    eprintln!("interpreter: {PYENV_PYTHON_3_11}");
    // The lines of descend's two calls, found by their comments.
    let source = fs::read_to_string(workload("recurse.py"))?;
    let line_of = |marker: &str| -> Result<i64> {
        let index = source.lines().position(|line| line.contains(marker)).context(marker.to_owned())?;
        Ok(index as i64 + 1)
    };
    let calls_burn = line_of("# the deepest descend")?;
    let recurses = line_of("# every other descend")?;
    // Leaf first, as the profile lists frames; None: any line.
    let mut expected = vec![("burn", None), ("descend", Some(calls_burn))];
    expected.extend((1..100).map(|_| ("descend", Some(recurses))));
    expected.push(("<module>", None));

    for (_, frames) in stacks_in_burn("4", "100")? {
        let matches = frames.len() == expected.len()
            && frames.iter().zip(&expected).all(|((function, line), (expected_function, expected_line))| {
                function == expected_function && expected_line.is_none_or(|expected| expected == *line)
            });
        ensure!(
            matches,
            "a stack in burn has {} Python frames, not burn, descend x 100, <module>: {frames:?}",
            frames.len()
        );
    }
    Ok(())
}

#[test]
fn recursion_200_deep_is_truncated_on_pyenv_python_3_11_7() -> Result<()> {
    eprintln!("interpreter: {PYENV_PYTHON_3_11}");
    for (_, frames) in stacks_in_burn("2", "200")? {
        let names: Vec<&str> = frames.iter().map(|(function, _)| function.as_str()).collect();
        let matches = names.len() == FRAME_LIMIT + 1
            && names[0] == "burn"
            && names[1..FRAME_LIMIT].iter().all(|name| *name == "descend")
            && names[FRAME_LIMIT] == TRUNCATED;
        ensure!(
            matches,
            "a stack in burn has {} Python frames, not burn, descend x {}, {TRUNCATED}: {names:?}",
            names.len(),
            FRAME_LIMIT - 1
        );
    }
    Ok(())
}
