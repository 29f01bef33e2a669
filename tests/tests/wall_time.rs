//! Wall and off-CPU time: threads whose waits are known must add up to their wall-clock
//! time, with each wait attributed to its Python function and reason.

use std::collections::{BTreeSet, HashMap};

use anyhow::{ensure, Context, Result};
use e2e::{
    comments, installed, one_at_a_time, profile_files, Agent, Profile, Sample, Workload, DEBIAN_ROOT,
    PYENV_PYTHON_3_11, PYENV_PYTHON_3_13,
};

const SECONDS: f64 = 4.0;
const CPU: usize = 1;
const WALL: usize = 2;
const OFF_CPU: usize = 3;
const NS: f64 = 1e9;

fn of_thread<'a>(profile: &'a Profile, tid: &'a str) -> impl Iterator<Item = &'a Sample> {
    profile.samples.iter().filter(move |sample| sample.label("tid") == Some(tid))
}

fn seconds<'a>(samples: impl Iterator<Item = &'a Sample>, value: usize) -> f64 {
    samples.map(|sample| sample.values[value] as f64).sum::<f64>() / NS
}

/// `waits.py`: main burns CPU while three threads sleep, wait on an Event and block on a
/// pipe read, all along.
#[test]
fn waiting_threads_add_up_to_their_wall_time_with_their_reasons() -> Result<()> {
    let _cpus = one_at_a_time();
    let agent = Agent::start(&["--period", "60s"])?;
    let workload = Workload::start(PYENV_PYTHON_3_11, "waits.py", &["--seconds", &SECONDS.to_string()])?;
    let pid = workload.pid();
    let output = workload.wait()?;
    let run = agent.stop()?;
    let profile = Profile::load(&profile_files(run.output_dir.path(), "waits.py")?)?;
    ensure!(
        profile.sample_types == ["samples/count", "cpu/nanoseconds", "wall/nanoseconds", "off_cpu/nanoseconds"],
        "sample types {:?}",
        profile.sample_types
    );
    ensure!(profile.samples_of_pid(pid).count() > 0, "no sample of pid {pid}; agent output:\n{}", run.log);
    // `role native_thread_id` lines, then `elapsed SECONDS`.
    let mut ids = HashMap::new();
    for line in output.lines() {
        let (key, value) = line.split_once(' ').context("workload output")?;
        ids.insert(key.to_owned(), value.to_owned());
    }
    let elapsed: f64 = ids["elapsed"].parse()?;
    check(&profile, pid, &ids, elapsed).with_context(|| format!("agent output:\n{}", run.log))
}

fn check(profile: &Profile, pid: u32, ids: &HashMap<String, String>, elapsed: f64) -> Result<()> {
    for (role, function, wait) in [
        ("sleeper", "sleeper", "sleep"),
        ("event_waiter", "event_waiter", "lock"),
        ("pipe_reader", "pipe_reader", "io"),
    ] {
        let tid = &ids[role];
        let wall = seconds(of_thread(profile, tid), WALL);
        let off_cpu = seconds(of_thread(profile, tid), OFF_CPU);
        let waiting = seconds(
            of_thread(profile, tid)
                .filter(|sample| sample.has_function(function) && sample.label("wait") == Some(wait)),
            OFF_CPU,
        );
        eprintln!(
            "{role} (tid {tid}): wall {wall:.3} s, {waiting:.3} s of {off_cpu:.3} s off-CPU in {function}/{wait}"
        );
        ensure!((wall - elapsed).abs() <= 0.1 * elapsed, "{role}: wall {wall:.3} s, expected {elapsed:.3} s ± 10%");
        ensure!(waiting >= 0.9 * off_cpu, "{role}: only {waiting:.3} s of {off_cpu:.3} s off-CPU is {function}/{wait}");
    }

    // The main thread also burned CPU for 1 s before the others started, after the
    // interpreter started (which takes seconds on an emulated CPU). Its wall time is its CPU
    // samples plus its off-CPU time; on a busy host the cpu-clock event itself counts more
    // CPU than the thread ran (perf record does too), so the off-CPU time is checked with the
    // kernel's own CPU time of the thread, and the CPU samples are asked to cover that time,
    // not to match it: together at least the burning, at most the process's life.
    let main = &ids["main"];
    let main_cpu: f64 = ids["main_cpu"].parse()?;
    let lifetime: f64 = ids["lifetime"].parse()?;
    let main_wall = seconds(of_thread(profile, main), WALL);
    let main_off_cpu = seconds(of_thread(profile, main), OFF_CPU);
    let main_cpu_sampled = main_wall - main_off_cpu;
    let expected = elapsed + 1.0;
    eprintln!(
        "main (tid {main}): wall {main_wall:.3} s ({main_cpu_sampled:.3} s CPU sampled, {main_off_cpu:.3} s off-CPU), \
         expected {expected:.3} s to {lifetime:.3} s; CPU {main_cpu:.3} s"
    );
    ensure!(
        main_cpu + main_off_cpu >= 0.9 * expected && main_cpu + main_off_cpu <= 1.1 * lifetime,
        "main: {main_cpu:.3} s on CPU and {main_off_cpu:.3} s off-CPU, expected {expected:.3} s to the {lifetime:.3} s \
         it lived, ± 10%"
    );
    // Samples of the start-up may be named after the bare interpreter, before the agent has
    // looked at the process: only the CPU after it is asked for (seconds on an emulated CPU).
    let startup_cpu: f64 = ids["startup_cpu"].parse()?;
    ensure!(
        main_cpu_sampled >= 0.9 * (main_cpu - startup_cpu),
        "main: {main_cpu_sampled:.3} s of CPU sampled of the {main_cpu:.3} s it ran ({startup_cpu:.3} s starting up)"
    );
    let pid_cpu = seconds(profile.samples_of_pid(pid), CPU);
    let burn_cpu = seconds(profile.samples_of_pid(pid).filter(|sample| sample.has_function("burn")), CPU);
    eprintln!("burn: {burn_cpu:.3} s of {pid_cpu:.3} s of CPU");
    // Of the CPU after start-up, which takes seconds on an emulated CPU.
    ensure!(
        burn_cpu >= 0.9 * (pid_cpu - startup_cpu),
        "burn has {burn_cpu:.3} s of the process's {pid_cpu:.3} s of CPU ({startup_cpu:.3} s of them starting up)"
    );
    Ok(())
}

/// `gil_contention.py`: two threads run Python code at once; each waits for the GIL about
/// half the run (on a busy host, part of that half is spent waiting for a CPU instead), and
/// that wait is labelled `gil` in the function that waits. The GIL lies
/// in a struct of `_PyRuntime` up to 3.12 (generated layouts), in the main interpreter
/// from 3.13 (debug offsets).
#[test]
fn threads_contending_for_the_gil_wait_for_it_half_the_time_on_3_11() -> Result<()> {
    check_gil_contention(None, PYENV_PYTHON_3_11)
}

#[test]
fn threads_contending_for_the_gil_wait_for_it_half_the_time_on_3_13() -> Result<()> {
    check_gil_contention(None, PYENV_PYTHON_3_13)
}

#[test]
fn threads_contending_for_the_gil_wait_for_it_half_the_time_on_3_14_in_a_container() -> Result<()> {
    check_gil_contention(Some(DEBIAN_ROOT), "/usr/bin/python3.14")
}

fn check_gil_contention(container_root: Option<&str>, python: &str) -> Result<()> {
    if !installed(container_root, python)? {
        return Ok(());
    }
    let _cpus = one_at_a_time();
    let agent = Agent::start(&["--period", "60s"])?;
    let args = [SECONDS.to_string()];
    let args = [args[0].as_str()];
    let workload = match container_root {
        Some(root) => Workload::start_in_container(root, None, python, "gil_contention.py", &args)?,
        None => Workload::start(python, "gil_contention.py", &args)?,
    };
    let pid = workload.pid();
    workload.wait()?;
    let run = agent.stop()?;
    let profile = Profile::load(&profile_files(run.output_dir.path(), "gil_contention.py")?)?;
    // The label `tid` is the host's thread ID, which a container's threads don't know.
    let contenders: BTreeSet<&str> = profile
        .samples_of_pid(pid)
        .filter(|sample| sample.has_function("contend"))
        .filter_map(|sample| sample.label("tid"))
        .collect();
    ensure!(contenders.len() == 2, "threads in contend: {contenders:?}; agent output:\n{}", run.log);
    for tid in contenders {
        let wall = seconds(of_thread(&profile, tid), WALL);
        let gil = seconds(
            of_thread(&profile, tid)
                .filter(|sample| sample.has_function("contend") && sample.label("wait") == Some("gil")),
            OFF_CPU,
        );
        // On a busy host a thread also waits for a CPU (runnable: `preempted`), both while it
        // holds the GIL and once handed it: of the half of its time the other thread holds
        // the GIL, some is then preempted rather than gil, and the gil share is at most half.
        let preempted = seconds(of_thread(&profile, tid).filter(|s| s.label("wait") == Some("preempted")), OFF_CPU);
        let (share, with_preempted) = (gil / wall, (gil + preempted) / wall);
        eprintln!(
            "{python}: thread {tid} waited {gil:.2} s for the GIL in contend out of {wall:.2} s of wall time \
             ({share:.2}), {preempted:.2} s preempted ({with_preempted:.2} with them)"
        );
        ensure!(
            (0.15..=0.7).contains(&share) && with_preempted >= 0.3,
            "thread {tid} waited {gil:.2} s for the GIL in contend out of {wall:.2} s of wall time, not about half \
             (with the {preempted:.2} s it was preempted, {with_preempted:.2}); agent output:\n{}",
            run.log
        );
    }
    Ok(())
}

/// `thread_leak.py` starts two threads every 0.25 s and leaves one running: the threads
/// started, ended and live per period, in each pprof's comments, show the leak.
#[test]
fn thread_counts_per_period_show_a_thread_leak() -> Result<()> {
    let agent = Agent::start(&["--period", "1s"])?;
    let workload = Workload::start(PYENV_PYTHON_3_11, "thread_leak.py", &["4"])?;
    let pid = workload.pid().to_string();
    let output = workload.wait()?;
    let run = agent.stop()?;
    let expected_started: u32 = output.trim().strip_prefix("started ").context("workload output")?.parse()?;
    let mut periods = Vec::new();
    for file in profile_files(run.output_dir.path(), "thread_leak.py")? {
        for comment in comments(&file)? {
            let fields: HashMap<&str, &str> = comment
                .strip_prefix("threads ")
                .into_iter()
                .flat_map(|rest| rest.split(' '))
                .filter_map(|field| field.split_once('='))
                .collect();
            if fields.get("pid") == Some(&pid.as_str()) {
                let count = |key: &str| -> Result<u32> { Ok(fields.get(key).context("comment {comment:?}")?.parse()?) };
                periods.push((count("live")?, count("started")?, count("ended")?));
            }
        }
    }
    eprintln!("(live, started, ended) per period: {periods:?}");
    let started: u32 = periods.iter().map(|(_, started, _)| started).sum();
    ensure!(
        started == expected_started,
        "{started} threads started, not {expected_started}; agent output:\n{}",
        run.log
    );
    // The short-lived threads ended while the others stayed: the live count grows
    // period after period up to the main thread and the 16 leaked ones.
    let live: Vec<u32> = periods.iter().map(|(live, _, _)| *live).collect();
    let peak = live.iter().copied().max().unwrap_or(0);
    ensure!(peak > expected_started / 2, "at most {peak} live threads; agent output:\n{}", run.log);
    ensure!(live.windows(2).filter(|pair| pair[1] > pair[0]).count() >= 2, "no growing thread count in {live:?}");
    Ok(())
}
