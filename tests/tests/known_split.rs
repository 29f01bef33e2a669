//! A workload whose three methods take a known 50/30/20 share of its CPU, profiled
//! system-wide: the profile must show that split, the right labels and the right lines.

use std::path::Path;

use anyhow::{ensure, Result};
use e2e::{
    function_line_ranges, function_shares, max_deviation_pp, profile_files, workload, Agent, Profile, Workload,
    DEBIAN_PYTHON_3_11, PYENV_PYTHON_3_11,
};

const FUNCTIONS: [&str; 3] = ["Cruncher.crunch_a", "Cruncher.crunch_b", "Cruncher.crunch_c"];
const EXPECTED_SHARES: [f64; 3] = [0.5, 0.3, 0.2];
const TOLERANCE_PP: f64 = 3.0;
/// At 100 Hz, 7 s of CPU give ~700 samples, whose binomial noise alone (1.9 pp on the 50%
/// share) would often exceed the tolerance; ~3,500 samples bring it to 0.85 pp.
const FREQUENCY: &str = "499";
const CPU_SECONDS: &str = "7";
/// Fewer samples than this (of ~3,500) means the agent lost many.
const MIN_SAMPLES: i64 = 2_500;

#[test]
fn known_split_on_pyenv_python_3_11_7_shared_libpython() -> Result<()> {
    check_known_split(PYENV_PYTHON_3_11)
}

#[test]
fn known_split_on_debian_python_3_11_2_static_stripped() -> Result<()> {
    check_known_split(DEBIAN_PYTHON_3_11)
}

fn check_known_split(python: &str) -> Result<()> {
    eprintln!("interpreter: {python}");
    let agent = Agent::start(&["--frequency", FREQUENCY, "--label", "suite=e2e"])?;
    let split = Workload::start(python, "split.py", &["--cpu-seconds", CPU_SECONDS])?;
    let pid = split.pid();
    split.wait()?;
    let run = agent.stop()?;
    let log = &run.log;

    let files = profile_files(run.output_dir.path(), "split.py")?;
    for file in &files {
        let svg = file.to_string_lossy().replace(".pb.gz", ".svg");
        ensure!(Path::new(&svg).is_file(), "no flame graph {svg} beside {}", file.display());
    }
    let profile = Profile::load(&files)?;
    ensure!(profile.sample_types == ["samples/count", "cpu/nanoseconds"], "sample types {:?}", profile.sample_types);

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
        samples.iter().copied().filter(|sample| FUNCTIONS.iter().any(|f| sample.has_function(f))).collect();
    let crunching_count: i64 = crunching.iter().map(|sample| sample.count()).sum();
    ensure!(
        crunching_count >= MIN_SAMPLES,
        "only {crunching_count} samples of pid {pid} contain {FUNCTIONS:?} (expected ~3,500); agent output:\n{log}"
    );
    // The workload is single-threaded: its main thread's id is the pid.
    for sample in &crunching {
        ensure!(
            sample.label("tid") == Some(pid.to_string().as_str()),
            "tid label {:?} for pid {pid}",
            sample.label("tid")
        );
    }

    let shares = function_shares(crunching.iter().copied(), &FUNCTIONS)?;
    let deviation = max_deviation_pp(&shares, &EXPECTED_SHARES);
    eprintln!("shares of {FUNCTIONS:?} over {crunching_count} samples: {shares:.4?}, max deviation {deviation:.2} pp");
    ensure!(
        deviation <= TOLERANCE_PP,
        "shares {shares:.4?} deviate {deviation:.2} pp from {EXPECTED_SHARES:?} (tolerance {TOLERANCE_PP} pp)"
    );

    let ranges = function_line_ranges(python, &workload("split.py"))?;
    for function in FUNCTIONS {
        let (first, last) = ranges[function];
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
