//! The known-split check: `split.py`, whose three methods take a known 50/30/20 share of
//! its CPU, profiled system-wide; the profile must show that split, the right labels and
//! the right lines.

use std::path::Path;

use anyhow::{ensure, Context, Result};

use crate::{
    function_line_ranges, function_shares, installed, max_deviation_pp, profile_files, workload, Agent, Profile,
    Workload, DEBIAN_PYTHON_3_11,
};

/// The methods, by qualified name.
const QUALIFIED: [&str; 3] = ["Cruncher.crunch_a", "Cruncher.crunch_b", "Cruncher.crunch_c"];
const EXPECTED_SHARES: [f64; 3] = [0.5, 0.3, 0.2];
const TOLERANCE_PP: f64 = 3.0;
/// At 100 Hz, 7 s of CPU give ~700 samples, whose binomial noise alone (1.9 pp on the 50%
/// share) would often exceed the tolerance; at 499 Hz 5 s give ~2,500 samples and 0.9 pp.
const FREQUENCY: u32 = 499;
/// Sets another frequency: the kernel matrix's guests emulate their CPUs (TCG), where the
/// agent names samples ten times slower and would fall behind a process that exits.
const FREQUENCY_VAR: &str = "FERROSCOPE_E2E_FREQUENCY";
/// Fewer samples than this share of those expected means the agent lost many.
const MIN_SAMPLE_SHARE: f64 = 0.7;

/// How the profile names the methods.
#[derive(Clone, Copy)]
pub enum Names {
    /// `Cruncher.crunch_a`: CPython 3.11+ (`co_qualname`).
    Qualified,
    /// `crunch_a`: before 3.11, code objects know only their plain name.
    Plain,
}

/// Runs `split.py` with `python` for `cpu_seconds` of CPU under the agent and checks the
/// profile.
pub fn check(python: &str, names: Names, cpu_seconds: f64) -> Result<()> {
    check_in(None, python, names, cpu_seconds)
}

/// [`check`] with `python` of `container_root`, if given, run as
/// [`Workload::start_in_container`] does. A failure if it is not installed, unless skips are
/// allowed (see [`crate::skip_or_fail`]).
pub fn check_in(container_root: Option<&str>, python: &str, names: Names, cpu_seconds: f64) -> Result<()> {
    if !installed(container_root, python)? {
        return Ok(());
    }
    eprintln!("interpreter: {python}{}", container_root.map(|root| format!(" in {root}")).unwrap_or_default());
    let functions = QUALIFIED.map(|qualified| match names {
        Names::Qualified => qualified,
        Names::Plain => qualified.rsplit('.').next().unwrap_or(qualified),
    });
    let frequency = match std::env::var(FREQUENCY_VAR) {
        Ok(value) => value.parse::<u32>().with_context(|| format!("{FREQUENCY_VAR}={value}"))?,
        Err(_) => FREQUENCY,
    };
    // As many samples at another frequency: the tolerance holds for that many.
    let cpu_seconds = cpu_seconds * f64::from(FREQUENCY) / f64::from(frequency);
    let agent = Agent::start(&["--frequency", &frequency.to_string(), "--label", "suite=e2e"])?;
    let args = ["--cpu-seconds", &cpu_seconds.to_string()];
    let split = match container_root {
        Some(root) => Workload::start_in_container(root, None, python, "split.py", &args)?,
        None => Workload::start(python, "split.py", &args)?,
    };
    let pid = split.pid();
    let output = split.wait()?;
    let rounds_cpu: f64 = output
        .lines()
        .find_map(|line| line.strip_prefix("rounds_cpu "))
        .with_context(|| format!("split.py printed no rounds_cpu: {output:?}"))?
        .trim()
        .parse()?;
    let run = agent.stop()?;
    let log = &run.log;

    let files = profile_files(run.output_dir.path(), "split.py")?;
    for file in &files {
        let svg = file.to_string_lossy().replace(".pb.gz", ".svg");
        ensure!(Path::new(&svg).is_file(), "no flame graph {svg} beside {}", file.display());
    }
    let profile = Profile::load(&files)?;
    ensure!(
        profile.sample_types == ["samples/count", "cpu/nanoseconds", "wall/nanoseconds", "off_cpu/nanoseconds"],
        "sample types {:?}",
        profile.sample_types
    );

    let samples: Vec<_> = profile.samples_of_pid(pid).collect();
    ensure!(
        !samples.is_empty(),
        "no sample has the label pid={pid}; labels of the first samples: {:?}\nagent output:\n{log}",
        profile.samples.iter().take(3).map(|sample| &sample.labels).collect::<Vec<_>>()
    );
    for sample in &samples {
        ensure!(
            sample.label("suite") == Some("e2e"),
            "a sample lacks the label suite=e2e given with --label: {:?}",
            sample.labels
        );
        for key in ["tid", "thread_name", "process_name"] {
            ensure!(
                sample.label(key).is_some_and(|value| !value.is_empty()),
                "a sample of pid {pid} lacks the label {key}: {:?}",
                sample.labels
            );
        }
    }

    let crunching: Vec<_> =
        samples.iter().copied().filter(|sample| functions.iter().any(|f| sample.has_function(f))).collect();
    let crunching_count: i64 = crunching.iter().map(|sample| sample.count()).sum();
    let expected = rounds_cpu * f64::from(frequency);
    ensure!(
        crunching_count as f64 >= MIN_SAMPLE_SHARE * expected,
        "only {crunching_count} samples of pid {pid} contain {functions:?} (expected ~{expected:.0}); agent \
         output:\n{log}"
    );
    // The workload is single-threaded: its main thread's id is the pid.
    for sample in &crunching {
        ensure!(
            sample.label("tid") == Some(pid.to_string().as_str()),
            "tid label {:?} for pid {pid}",
            sample.label("tid")
        );
    }

    let shares = function_shares(crunching.iter().copied(), &functions)?;
    let deviation = max_deviation_pp(&shares, &EXPECTED_SHARES);
    eprintln!("shares of {functions:?} over {crunching_count} samples: {shares:.4?}, max deviation {deviation:.2} pp");
    ensure!(
        deviation <= TOLERANCE_PP,
        "shares {shares:.4?} deviate {deviation:.2} pp from {EXPECTED_SHARES:?} (tolerance {TOLERANCE_PP} pp)"
    );

    // A container's Python, linked to another libc, cannot run here: the host's reads the
    // same file.
    let lister = if container_root.is_some() { DEBIAN_PYTHON_3_11 } else { python };
    let ranges = function_line_ranges(lister, &workload("split.py"))?;
    for (function, qualified) in functions.into_iter().zip(QUALIFIED) {
        let (first, last) = *ranges.get(qualified).with_context(|| format!("no {qualified} in split.py"))?;
        for frame in crunching.iter().flat_map(|sample| &sample.frames).filter(|frame| frame.function == function) {
            ensure!(frame.file.ends_with("split.py"), "{function} is in file {:?}", frame.file);
            ensure!(frame.start_line == first, "{function} starts at line {}, not {first}", frame.start_line);
            ensure!(
                (first..=last).contains(&frame.line),
                "a sample of {function} is at line {}, outside its lines {first}..={last}",
                frame.line
            );
        }
    }
    Ok(())
}
