//! Native stacks without frame pointers, unwound in the kernel from `.eh_frame` tables
//! and merged with the Python frames: C code called from Python shows under the Python
//! function that called it, and a C program built with `-fomit-frame-pointer` shows its
//! call tree whole.

use std::{path::Path, process::Command};

use anyhow::{ensure, Result};
use e2e::{Agent, Profile, Sample, Workload};

/// The index of the first frame (leaf first) whose function satisfies `matches`.
fn position(sample: &Sample, matches: impl Fn(&str) -> bool) -> Option<usize> {
    sample.frames.iter().position(|frame| matches(&frame.function))
}

/// Whether `sample`'s frames hold frames passing each test of `chain` (leaf first), in
/// that order.
fn has_chain(sample: &Sample, chain: &[FrameTest]) -> bool {
    let positions: Vec<_> = chain.iter().map(|(test, _)| position(sample, test)).collect();
    positions.iter().all(Option::is_some) && positions.windows(2).all(|pair| pair[0] < pair[1])
}

/// The share (by sample count) of `samples` for which `test` holds.
fn share<'a>(samples: impl Iterator<Item = &'a Sample> + Clone, test: impl Fn(&Sample) -> bool) -> (f64, i64) {
    let all: i64 = samples.clone().map(Sample::count).sum();
    let passing: i64 = samples.filter(|sample| test(sample)).map(Sample::count).sum();
    (if all == 0 { 0.0 } else { passing as f64 / all as f64 }, all)
}

fn show(samples: &[&Sample]) -> String {
    let mut stacks: Vec<String> = samples
        .iter()
        .take(8)
        .map(|sample| sample.frames.iter().map(|frame| frame.function.as_str()).collect::<Vec<_>>().join(" <- "))
        .collect();
    stacks.dedup();
    stacks.join("\n")
}

#[test]
fn a_c_program_without_frame_pointers_shows_its_call_tree_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let program = dir.path().join("call_tree");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("native/call_tree.c");
    let built = Command::new("gcc").args(["-O2", "-fomit-frame-pointer", "-o"]).arg(&program).arg(&source).status()?;
    ensure!(built.success(), "gcc failed on {}", source.display());
    // A `--pid` target gets its tables at once (other processes once they
    // have lived a second).
    let workload = Workload::start_program(&program, &["4"], &[])?;
    let pid = workload.pid();
    let agent = Agent::start(&["--pid", &pid.to_string()])?;
    workload.wait()?;
    let run = agent.stop()?;
    let profile = run.all_profiles()?;
    let samples: Vec<&Sample> = profile.samples_of_pid(pid).collect();
    for (leaf, chain) in [("inner", &["inner", "middle", "outer", "main"][..]), ("other", &["other", "outer", "main"])]
    {
        let in_leaf =
            samples.iter().copied().filter(|sample| sample.frames.first().is_some_and(|f| f.function == leaf));
        let tests: Vec<FrameTest> = chain.iter().map(|name| named(name)).collect();
        let (whole, count) = share(in_leaf.clone(), |sample| has_chain(sample, &tests));
        eprintln!("{leaf}: {count} samples, {:.0}% with {chain:?}", whole * 100.0);
        ensure!(count >= 30, "only {count} samples in {leaf}; agent output:\n{}", run.log);
        // The first samples of a process may come before its tables are loaded.
        ensure!(
            whole >= 0.8,
            "{:.0}% of the samples in {leaf} have the chain {chain:?}:\n{}\nagent output:\n{}",
            whole * 100.0,
            show(&in_leaf.collect::<Vec<_>>()),
            run.log
        );
    }
    Ok(())
}

/// A frame test with its description.
type FrameTest = (Box<dyn Fn(&str) -> bool>, &'static str);

fn named(wanted: &'static str) -> FrameTest {
    (Box::new(move |name: &str| name == wanted), wanted)
}

fn matching(test: impl Fn(&str) -> bool + 'static, what: &'static str) -> FrameTest {
    (Box::new(test), what)
}

/// Runs `script` on `python` for 4 s under an agent; for each `(function, chain)`, at least
/// `min_share` of the samples in `function` must hold the frames of `chain` in that order,
/// leaf first.
fn check_chains(python: &str, script: &str, cases: Vec<(&str, Vec<FrameTest>)>, min_share: f64) -> Result<()> {
    if !e2e::installed(None, python)? {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    let workload = Workload::start(python, script, &["4"])?;
    let pid = workload.pid();
    workload.wait()?;
    let run = agent.stop()?;
    let profile: Profile = run.all_profiles()?;
    let samples: Vec<&Sample> = profile.samples_of_pid(pid).collect();
    for (function, chain) in cases {
        let under = samples.iter().copied().filter(|sample| sample.has_function(function));
        let (ordered, count) = share(under.clone(), |sample| has_chain(sample, &chain));
        let names: Vec<&str> = chain.iter().map(|(_, name)| *name).collect();
        eprintln!("{python}: {count} samples in {function}, {:.0}% with {names:?} in order", ordered * 100.0);
        ensure!(count >= 50, "only {count} samples in {function}; agent output:\n{}", run.log);
        ensure!(
            ordered >= min_share,
            "{python}: {:.0}% of the samples in {function} have {names:?} in order:\n{}\nagent output:\n{}",
            ordered * 100.0,
            show(&under.collect::<Vec<_>>()),
            run.log
        );
    }
    Ok(())
}

/// `native_calls.py` on `python`: zlib's compressor under `compress_blob`, SHA-256
/// under `hash_blob`, each under `main`.
fn check_c_under_python(python: &str) -> Result<()> {
    let cases = vec![
        (
            "compress_blob",
            vec![matching(|name| name.starts_with("deflate"), "deflate*"), named("compress_blob"), named("main")],
        ),
        (
            "hash_blob",
            vec![
                matching(|name| name.to_ascii_lowercase().contains("sha256"), "*sha256*"),
                named("hash_blob"),
                named("main"),
            ],
        ),
    ];
    check_chains(python, "native_calls.py", cases, 0.5)
}

/// A library mapped after the agent read the process's mappings (zlib, imported after
/// 1.5 s) gets its table once the kernel meets its code: nothing polls the mappings.
/// Without the new table no sample would have deflate* under compress_blob; the first
/// few after the import are cut.
#[test]
fn c_code_loaded_late_shows_under_its_caller() -> Result<()> {
    let chain = vec![matching(|name| name.starts_with("deflate"), "deflate*"), named("compress_blob"), named("main")];
    check_chains(e2e::PYENV_PYTHON_3_11, "late_import.py", vec![("compress_blob", chain)], 0.8)
}

#[test]
fn c_code_called_from_python_shows_under_its_caller_on_3_10() -> Result<()> {
    check_c_under_python("/root/.pyenv/versions/3.10.13/bin/python3.10")
}

#[test]
fn c_code_called_from_python_shows_under_its_caller_on_3_11() -> Result<()> {
    check_c_under_python(e2e::PYENV_PYTHON_3_11)
}

#[test]
fn c_code_called_from_python_shows_under_its_caller_on_3_13() -> Result<()> {
    check_c_under_python(e2e::PYENV_PYTHON_3_13)
}

/// `callbacks.py` on `python`: C calling Python (`sorted` calling `key`) and a generator
/// resumed by a `for` loop; each Python frame sits where it ran among the native ones.
fn check_callbacks(python: &str) -> Result<()> {
    let cases = vec![
        (
            "key",
            vec![
                matching(|name| name.contains("crc32"), "*crc32*"),
                named("key"),
                matching(|name| name.contains("sort") && name != "sort_blobs", "sorted's C code"),
                named("sort_blobs"),
                named("main"),
            ],
        ),
        (
            "compressions",
            vec![
                matching(|name| name.starts_with("deflate"), "deflate*"),
                named("compressions"),
                named("drain"),
                named("main"),
            ],
        ),
    ];
    check_chains(python, "callbacks.py", cases, 0.5)
}

#[test]
fn python_called_from_c_and_generators_sit_where_they_ran_on_3_11() -> Result<()> {
    check_callbacks(e2e::PYENV_PYTHON_3_11)
}

#[test]
fn python_called_from_c_and_generators_sit_where_they_ran_on_3_13() -> Result<()> {
    check_callbacks(e2e::PYENV_PYTHON_3_13)
}
