//! `cargo xtask bench`: the known-split workload run bare, under Ferroscope and under py-spy,
//! alternating, to measure slowdown, the agent's own cost, and attribution error; then a
//! switch-heavy and a sleep-heavy workload, bare, under Ferroscope and under py-spy --idle,
//! for the cost of measuring off-CPU time.
//!
//! How a run's costs are read from `/proc` and the kernel is in `measure`, the py-spy run of
//! the known split in `py_spy`, the viewer's benchmark in `viewer`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use e2e::{function_shares, max_deviation_pp, profile_files, workload, Agent, Profile, Workload, PYENV_PYTHON_3_11};

use crate::{build, setup, step, workspace_root};

mod cost;
mod measure;
mod py_spy;
mod viewer;

use measure::{add_program_stats, cpu_seconds, peak_rss, program_stats, sampler_run_time, BpfStats};
use py_spy::run_py_spy;

#[derive(clap::Args)]
pub struct Options {
    /// Runs of each configuration.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Rounds of work per run (~90 rounds per second with CPython 3.11).
    #[arg(long, default_value_t = 450)]
    rounds: u32,
    /// Round trips of the switch-heavy workload (`pingpong.py`) per run.
    #[arg(long, default_value_t = 100_000)]
    switches: u32,
    /// Sleeps of the sleep-heavy workload (`sleepy.py`) per run.
    #[arg(long, default_value_t = 8_000)]
    sleeps: u32,
    /// Rounds of the allocation-heavy workload (`alloc_heavy.py`) per run.
    #[arg(long, default_value_t = 240)]
    alloc_rounds: u32,
    /// Run only the memory comparison and print it; docs/benchmarks.md is left alone.
    #[arg(long)]
    memory_only: bool,
    /// Run only the viewer's benchmark, and replace its section of docs/benchmarks.md.
    #[arg(long)]
    viewer_only: bool,
    /// Run only the agent's own cost (kernel time per sample, idle processes, churn), and
    /// replace its section of docs/benchmarks.md.
    #[arg(long)]
    cost_only: bool,
    /// Seconds of process churn (3,000 execs a minute) in the agent's own cost.
    #[arg(long, default_value_t = 180)]
    churn_seconds: u64,
}

/// The sampling rate of both profilers.
const RATE: &str = "100";
const FUNCTIONS: [&str; 3] = ["Cruncher.crunch_a", "Cruncher.crunch_b", "Cruncher.crunch_c"];
const EXPECTED_SHARES: [f64; 3] = [0.5, 0.3, 0.2];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Mode {
    Bare,
    Ferroscope,
    PySpy,
    Memray,
}

const MODES: [Mode; 3] = [Mode::Bare, Mode::Ferroscope, Mode::PySpy];

/// What the runs of one mode measured.
#[derive(Default)]
struct Measurements {
    elapsed: Vec<f64>,
    /// Samples containing each of FUNCTIONS, over all runs.
    function_samples: [f64; 3],
    /// Per run, the profiler's attribution error in percentage points.
    errors: Vec<f64>,
    /// The profiler's CPU time as % of one core, per run.
    profiler_cpu_percent: Vec<f64>,
    /// Ferroscope only: the agent's peak RSS in bytes.
    agent_peak_rss: u64,
    /// Ferroscope only, per run: the CPU sampler's mean run time in the kernel (ns), and
    /// its total as % of the workload's CPU time, from the kernel's BPF statistics.
    kernel_ns_per_run: Vec<f64>,
    kernel_percent_of_workload: Vec<f64>,
}

pub fn run(options: &Options) -> Result<()> {
    ensure!(options.runs > 0, "--runs must be at least 1");
    setup::test_tools()?;
    setup::bench_tools()?;
    let agent = build(true)?;
    let load_average = fs::read_to_string("/proc/loadavg")?;
    // The kernel accounts the run time of BPF programs only while this is on.
    if options.memory_only {
        println!("{}", memory_table(options, &agent)?);
        return Ok(());
    }
    if options.viewer_only {
        return write_section("viewer", &viewer::run(&agent)?);
    }
    if options.cost_only {
        return write_section("cost", &cost::run(options, &agent)?);
    }
    let bpf_stats = BpfStats::enable()?;
    let mut results: HashMap<Mode, Measurements> = HashMap::new();
    for run in 0..options.runs {
        // Rotate the order so that no mode always follows the same one.
        for offset in 0..MODES.len() {
            let mode = MODES[(run + offset) % MODES.len()];
            let measurements = results.entry(mode).or_default();
            match mode {
                Mode::Bare => run_bare(options, measurements)?,
                Mode::Ferroscope => run_ferroscope(options, &agent, measurements)?,
                Mode::PySpy => run_py_spy(options, measurements)?,
                Mode::Memray => unreachable!("not a mode of the split benchmark"),
            }
            step(format!(
                "bench: run {}/{}: {mode:?} {:.3} s",
                run + 1,
                options.runs,
                measurements.elapsed.last().unwrap()
            ));
        }
    }
    drop(bpf_stats);
    let table = table(&results);
    println!("{table}");
    let wall = wall_table(options, &agent)?;
    println!("{wall}");
    let memory = memory_table(options, &agent)?;
    println!("{memory}");
    let viewer = viewer::run(&agent)?;
    println!("{viewer}");
    let cost = cost::run(options, &agent)?;
    println!("{cost}");
    write_report(options, &load_average, &table, &wall, &memory, &[("viewer", &viewer), ("cost", &cost)])
}

/// Prints `section` and replaces the section `name` of docs/benchmarks.md with it.
fn write_section(name: &str, section: &str) -> Result<()> {
    println!("{section}");
    let path = workspace_root().join("docs/benchmarks.md");
    let report = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, with_section(&report, name, section))?;
    step(format!("bench: wrote the section {name} of {}", path.display()));
    Ok(())
}

/// `report` with the section `name` (between `<!-- section: NAME -->` and `<!-- end:
/// NAME -->`) replaced by `body`, or added at the end.
fn with_section(report: &str, name: &str, body: &str) -> String {
    let (begin, end) = (format!("<!-- section: {name} -->"), format!("<!-- end: {name} -->"));
    let block = format!("{begin}\n{}\n{end}\n", body.trim_end());
    match (report.find(&begin), report.find(&end)) {
        (Some(start), Some(stop)) if start < stop => {
            format!("{}{block}{}", &report[..start], report[stop + end.len()..].trim_start_matches('\n'))
        }
        _ => format!("{}\n{block}", report.trim_end()),
    }
}

/// The sections of `report` (see [`with_section`]): written by hand, or by one part of
/// the benchmark, they are kept when the rest is measured again.
fn sections(report: &str) -> Vec<(&str, &str)> {
    report
        .match_indices("<!-- section: ")
        .filter_map(|(start, _)| {
            let name = report[start + 14..].split(" -->").next()?;
            let end = format!("<!-- end: {name} -->");
            let stop = report[start..].find(&end)? + start;
            let body = report[start..stop].split_once("-->\n")?.1;
            Some((name, body))
        })
        .collect()
}

/// A program run for a fixed amount of work, bare and under profilers.
struct Job {
    /// As the table names it.
    name: String,
    program: PathBuf,
    args: Vec<String>,
}

impl Job {
    /// `tests/workloads/SCRIPT --rounds ROUNDS` on CPython 3.11.
    fn script(script: &str, rounds: u32) -> Job {
        Job {
            name: format!("`{script} --rounds {rounds}`"),
            program: PYENV_PYTHON_3_11.into(),
            args: vec![workload(script).to_string_lossy().into_owned(), "--rounds".into(), rounds.to_string()],
        }
    }

    /// A benchmark of pyperformance, in one process (pyperf's worker mode), `loops` loops
    /// for one value.
    fn pyperformance(name: &str, loops: u32) -> Job {
        let script = setup::pyperformance_benchmark(name);
        Job {
            name: format!("pyperformance `{name}` ({loops} loops)"),
            program: setup::bench_python(),
            args: vec![
                script.to_string_lossy().into_owned(),
                "--worker".into(),
                "--values=1".into(),
                "--warmups=0".into(),
                format!("--loops={loops}"),
            ],
        }
    }

    /// Runs `PROGRAM ARGS` to completion: its wall-clock seconds.
    fn run(&self) -> Result<f64> {
        self.run_under(&[], true)
    }

    /// Runs `WRAPPER... [PROGRAM] ARGS`: a profiler that starts the program, or (without
    /// `program`) runs the script in ARGS with its own interpreter.
    fn run_under(&self, wrapper: &[&std::ffi::OsStr], program: bool) -> Result<f64> {
        let mut argv: Vec<&std::ffi::OsStr> = wrapper.to_vec();
        if program {
            argv.push(self.program.as_os_str());
        }
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        let started = Instant::now();
        let output = command.args(&self.args).stdin(Stdio::null()).output()?;
        let seconds = started.elapsed().as_secs_f64();
        ensure!(output.status.success(), "{} failed: {}", self.name, String::from_utf8_lossy(&output.stderr));
        Ok(seconds)
    }
}

/// The peer profiler of a comparison.
#[derive(Clone, Copy)]
enum Peer {
    /// `py-spy record --idle`: it samples threads off the CPU too.
    PySpyIdle,
    /// `memray run`: every allocation through the system allocator.
    Memray,
}

impl Peer {
    fn mode(self) -> Mode {
        match self {
            Peer::PySpyIdle => Mode::PySpy,
            Peer::Memray => Mode::Memray,
        }
    }
}

/// Each job run bare, under `ferroscope agent AGENT_ARGS` and under the peer, `--runs`
/// times in rotating order: a markdown table of median slowdowns, then the kernel cost of
/// each of the agent's programs, from one more run of each job under it with the kernel's
/// BPF statistics on.
fn slowdown_table(
    options: &Options,
    agent_bin: &Path,
    agent_args: &[&str],
    peer: Peer,
    jobs: &[Job],
) -> Result<String> {
    let header = match peer {
        Peer::PySpyIdle => "py-spy 0.4.3 --idle --nonblocking",
        Peer::Memray => "memray run",
    };
    let flags = match agent_args {
        [] => "(wall time on)".to_owned(),
        flags => format!("`{}`", flags.join(" ")),
    };
    let mut table = format!("| workload | bare (median) | Ferroscope {flags} | {header} |\n|---|---|---|---|\n");
    let mut programs: Vec<(String, u64, u64)> = Vec::new();
    let mut seconds_under_agent = 0.0;
    let modes = [Mode::Bare, Mode::Ferroscope, peer.mode()];
    let args: Vec<&str> = ["--frequency", RATE].iter().chain(agent_args).copied().collect();
    for job in jobs {
        let mut elapsed: HashMap<Mode, Vec<f64>> = HashMap::new();
        for run in 0..options.runs {
            for offset in 0..modes.len() {
                let mode = modes[(run + offset) % modes.len()];
                let seconds = run_once(job, mode, peer, agent_bin, &args)?;
                step(format!("bench: {} run {}/{}: {mode:?} {seconds:.3} s", job.name, run + 1, options.runs));
                elapsed.entry(mode).or_default().push(seconds);
            }
        }
        // One more run under the agent for the run time of its programs: the kernel's BPF
        // statistics cost a clock read or two per program run, so they stay off above.
        let stats = BpfStats::enable()?;
        let agent = Agent::start_binary(agent_bin, &args)?;
        let before = program_stats(agent.pid())?;
        seconds_under_agent += job.run()?;
        add_program_stats(&mut programs, before, program_stats(agent.pid())?);
        agent.stop()?;
        drop(stats);
        let bare = &elapsed[&Mode::Bare];
        let slowdown = |mode: Mode| {
            let ratios: Vec<f64> = elapsed[&mode].iter().zip(bare).map(|(under, bare)| under / bare).collect();
            let ratio = median(&ratios);
            format!("x{ratio:.3} ({:+.1}%)", (ratio - 1.0) * 100.0)
        };
        table.push_str(&format!(
            "| {} | {:.3} s | {} | {} |\n",
            job.name,
            median(bare),
            slowdown(Mode::Ferroscope),
            slowdown(peer.mode())
        ));
    }
    table.push_str(
        "\nKernel cost per program, over one more run of each workload under the agent, for the whole host:\n\n\
         | program | runs per second | ns per run | % of a core |\n|---|---|---|---|\n",
    );
    for (name, time, count) in programs.iter().filter(|(_, _, count)| *count > 0) {
        table.push_str(&format!(
            "| `{name}` | {:.0} | {:.0} | {:.2}% |\n",
            *count as f64 / seconds_under_agent,
            *time as f64 / *count as f64,
            100.0 * *time as f64 / 1e9 / seconds_under_agent
        ));
    }
    Ok(table)
}

/// Runs `job` once, bare, under `ferroscope agent ARGS` or under the peer: its seconds.
fn run_once(job: &Job, mode: Mode, peer: Peer, agent_bin: &Path, args: &[&str]) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    Ok(match (mode, peer) {
        (Mode::Ferroscope, _) => {
            let agent = Agent::start_binary(agent_bin, args)?;
            let seconds = job.run()?;
            agent.stop()?;
            seconds
        }
        (Mode::Bare, _) => job.run()?,
        (_, Peer::PySpyIdle) => {
            let raw = dir.path().join("py-spy.txt");
            let py_spy = setup::py_spy();
            job.run_under(
                &[
                    py_spy.as_os_str(),
                    "record".as_ref(),
                    "--rate".as_ref(),
                    RATE.as_ref(),
                    "--nonblocking".as_ref(),
                    "--idle".as_ref(),
                    "--format".as_ref(),
                    "raw".as_ref(),
                    "-o".as_ref(),
                    raw.as_os_str(),
                    "--".as_ref(),
                ],
                true,
            )?
        }
        (_, Peer::Memray) => {
            let capture = dir.path().join("memray.bin");
            let memray = setup::memray();
            // memray runs the script with its own interpreter, the same CPython.
            let wrapper = [memray.as_os_str(), "run".as_ref(), "--quiet".as_ref(), "-o".as_ref(), capture.as_os_str()];
            job.run_under(&wrapper, false)?
        }
    })
}

/// Off-CPU time on workloads that leave the CPU often (`pingpong.py`, two processes passing
/// a byte through pipes; `sleepy.py`, short work and 0.5 ms sleeps), against py-spy --idle.
fn wall_table(options: &Options, agent_bin: &Path) -> Result<String> {
    let jobs = [Job::script("pingpong.py", options.switches), Job::script("sleepy.py", options.sleeps)];
    let mut table = slowdown_table(options, agent_bin, &[], Peer::PySpyIdle, &jobs)?;
    table.push_str("\nTarget for Ferroscope: ≤ x1.020 on pingpong, ≤ x1.010 on sleepy.\n");
    Ok(table)
}

/// Memory profiling on an allocation-heavy workload and allocation-heavy programs of
/// pyperformance, against memray.
fn memory_table(options: &Options, agent_bin: &Path) -> Result<String> {
    let jobs = [
        Job::script("alloc_heavy.py", options.alloc_rounds),
        Job::pyperformance("deepcopy", 12_000),
        Job::pyperformance("json_loads", 10_000),
        Job::pyperformance("float", 60),
    ];
    let mut table = slowdown_table(options, agent_bin, &["--memory"], Peer::Memray, &jobs)?;
    table.push_str("\nTarget for Ferroscope: ≤ x1.030.\n");
    Ok(table)
}

/// Starts the workload for a fixed amount of work.
fn start_workload(options: &Options) -> Result<Workload> {
    Workload::start(PYENV_PYTHON_3_11, "split.py", &["--rounds", &options.rounds.to_string()])
}

/// What the workload printed: its elapsed seconds and the seconds of CPU it used, on the last
/// line of two numbers (py-spy prints its own messages on the same stdout).
fn workload_times(stdout: &str) -> Result<(f64, f64)> {
    stdout
        .lines()
        .rev()
        .find_map(|line| {
            let (elapsed, cpu) = line.trim().split_once(' ')?;
            Some((elapsed.parse().ok()?, cpu.parse().ok()?))
        })
        .with_context(|| format!("the workload printed no times: {stdout:?}"))
}

fn run_bare(options: &Options, measurements: &mut Measurements) -> Result<()> {
    measurements.elapsed.push(workload_times(&start_workload(options)?.wait()?)?.0);
    Ok(())
}

fn run_ferroscope(options: &Options, agent_bin: &Path, measurements: &mut Measurements) -> Result<()> {
    let agent = Agent::start_binary(agent_bin, &["--frequency", RATE])?;
    // Measure the agent from when it samples, leaving out its start-up.
    let cpu_before = cpu_seconds(agent.pid())?;
    let started = Instant::now();
    let kernel_before = sampler_run_time(agent.pid())?;
    let split = start_workload(options)?;
    let pid = split.pid();
    let (elapsed, workload_cpu) = workload_times(&split.wait()?)?;
    measurements.elapsed.push(elapsed);
    let kernel = sampler_run_time(agent.pid())?;
    // A counter read short (a file descriptor that went unread) leaves the run out.
    if let (Some(run_ns), Some(runs)) = (kernel.0.checked_sub(kernel_before.0), kernel.1.checked_sub(kernel_before.1)) {
        measurements.kernel_ns_per_run.push(run_ns as f64 / runs.max(1) as f64);
        measurements.kernel_percent_of_workload.push(100.0 * run_ns as f64 / (workload_cpu * 1e9));
    }
    let cpu = cpu_seconds(agent.pid())? - cpu_before;
    measurements.profiler_cpu_percent.push(100.0 * cpu / started.elapsed().as_secs_f64());
    measurements.agent_peak_rss = measurements.agent_peak_rss.max(peak_rss(agent.pid())?);
    let run = agent.stop()?;

    let profile = Profile::load(&profile_files(run.output_dir.path(), "split.py")?)?;
    let samples: Vec<_> = profile.samples_of_pid(pid).collect();
    let shares = function_shares(samples.iter().copied(), &FUNCTIONS)?;
    measurements.errors.push(max_deviation_pp(&shares, &EXPECTED_SHARES));
    for (total, function) in measurements.function_samples.iter_mut().zip(FUNCTIONS) {
        *total += samples
            .iter()
            .filter(|sample| sample.has_function(function))
            .map(|sample| sample.count() as f64)
            .sum::<f64>();
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// The markdown table of results.
fn table(results: &HashMap<Mode, Measurements>) -> String {
    let bare = &results[&Mode::Bare];
    let mut table = String::from(
        "| | median slowdown vs bare | profiler CPU (% of a core) | profiler peak RSS | attribution error, all runs pooled | median attribution error per run |\n\
         |---|---|---|---|---|---|\n",
    );
    table.push_str(&format!("| bare | median {:.3} s | | | | |\n", median(&bare.elapsed)));
    for (mode, name) in [(Mode::Ferroscope, "Ferroscope"), (Mode::PySpy, "py-spy 0.4.3 --nonblocking")] {
        let measured = &results[&mode];
        // Runs are paired: run i of each mode ran back to back.
        let ratios: Vec<f64> =
            measured.elapsed.iter().zip(&bare.elapsed).map(|(elapsed, bare)| elapsed / bare).collect();
        let ratio = median(&ratios);
        let total: f64 = measured.function_samples.iter().sum::<f64>();
        let pooled: Vec<f64> = measured.function_samples.iter().map(|count| count / total).collect();
        let cpu = format!("{:.2}%", median(&measured.profiler_cpu_percent));
        let rss = if mode == Mode::Ferroscope {
            format!("{:.1} MiB", measured.agent_peak_rss as f64 / 1048576.0)
        } else {
            "not measured".to_owned()
        };
        table.push_str(&format!(
            "| {name} | x{ratio:.3} ({:+.1}%) | {cpu} | {rss} | {:.2} pp | {:.2} pp |\n",
            (ratio - 1.0) * 100.0,
            max_deviation_pp(&pooled, &EXPECTED_SHARES),
            median(&measured.errors),
        ));
    }
    table.push_str("| target for Ferroscope | ≤ x1.010 (≤ +1%) | < 1% | < 64 MiB | ≤ 2 pp | |\n");
    let ferroscope = &results[&Mode::Ferroscope];
    table.push_str(&format!(
        "\nIn the kernel, Ferroscope's CPU sampler ran {:.0} ns per run (idle CPUs' samples, which it leaves at once, \
         included), {:.3}% of the workload's CPU time (medians over runs; `bpf_stats`).\n",
        median(&ferroscope.kernel_ns_per_run),
        median(&ferroscope.kernel_percent_of_workload),
    ));
    table
}

/// Writes docs/benchmarks.md with the table and what it was measured on.
fn write_report(
    options: &Options,
    load_average: &str,
    table: &str,
    wall: &str,
    memory: &str,
    measured: &[(&str, &str)],
) -> Result<()> {
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output()?.stdout;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo")?;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").map(|rest| rest.trim_start_matches([' ', '\t', ':'])))
        .unwrap_or("unknown");
    let cores = std::thread::available_parallelism()?;
    let report = format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench --runs {runs} --rounds {rounds}` on {date} (kernel {kernel}, {cpu_model}, {cores} cores; \
         load average {load} before the runs, from other work on the machine).\n\n\
         The workload is `tests/workloads/split.py --rounds {rounds}` on CPython 3.11.7 (pyenv): `Cruncher.crunch_a`, `crunch_b` \
         and `crunch_c` take 50/30/20% of its CPU, with rounds of random length so that no sampler aliases with them. \
         Each run does the same work and reports its own elapsed time. Each of the {runs} runs runs it bare, under \
         Ferroscope (`ferroscope agent --frequency {RATE}`, system-wide) and under py-spy \
         (`py-spy record --rate {RATE} --nonblocking --format raw`), in rotating order.\n\n\
         - Slowdown: the median over runs of the elapsed time divided by the same run's bare time. \
         The machine's noise floor for such ratios is about ±3%.\n\
         - Profiler CPU, as % of one core while the workload ran: for Ferroscope, the agent's utime + stime from `/proc/PID/stat` \
         (its start-up left out; it handles the samples of every process on the host, not only the workload's); for py-spy, \
         its children's CPU time (`getrusage`) less the workload's own. Peak RSS: the agent's VmHWM, read just before it stops.\n\
         - Attribution error: the largest absolute difference, in percentage points, between 50/30/20 and the shares of samples \
         containing each function, from the profiler's own output (Ferroscope's pprof read with `go tool pprof`, py-spy's \
         collapsed stacks). Pooled over all runs it shows bias; per run it also includes sampling noise (~2 pp at 100 Hz for ~5 s).\n\n\
         {table}\n\
         ## Wall time\n\n\
         Off-CPU time costs two programs run on every context switch and system call return of the host \
         (`sched_switch`, `sys_exit`), and a sample per kept wait. They are measured on two workloads that leave the CPU \
         often, on CPython 3.11.7: `tests/workloads/pingpong.py`, two processes passing a byte through pipes (each blocks \
         once per round trip, about 36,000 context switches a second on one CPU), and `tests/workloads/sleepy.py`, 50 µs of work \
         then a 0.5 ms sleep, in a loop. Each of the {runs} runs runs each bare, under `ferroscope agent --frequency {RATE}` \
         (wall time on, the default) and under `py-spy record --rate {RATE} --idle --nonblocking` (py-spy's nearest \
         equivalent: it samples idle threads too), in rotating order; slowdown as above. Kernel cost per program from \
         `kernel.bpf_stats_enabled` (`run_time_ns`, `run_cnt` in `/proc/AGENT/fdinfo`), from one more run of each \
         workload under the agent: the statistics cost a clock read or two per program run, so they are off for the \
         slowdowns.\n\n\
         {wall_table}\n\
         ## Memory\n\n\
         `--memory` costs a uprobe per allocation of the raw domain (objects over 512 bytes, `PyMem_Raw*`) and per \
         pymalloc arena (1 MiB), plus a sample (stacks, Python walk) per 512 KiB allocated on average. Measured on \
         `tests/workloads/alloc_heavy.py` (small and large objects, strings, dicts, in a loop) and on three \
         allocation-heavy benchmarks of pyperformance 1.14.0 run as one process (`run_benchmark.py --worker \
         --values=1 --warmups=0 --loops=N`), on CPython 3.11.7, each run bare, under `ferroscope agent --frequency {RATE} \
         --memory` (wall time on too) and under `memray run` (memray 1.20.0: every allocation through the system \
         allocator, into a capture file), {runs} times in rotating order; elapsed time measured around the process.\n\n\
         {memory}",
        wall_table = wall,
        runs = options.runs,
        rounds = options.rounds,
        date = String::from_utf8_lossy(&date).trim(),
        kernel = kernel.trim(),
        load = load_average.split(' ').next().unwrap_or("?"),
    );
    let path = workspace_root().join("docs/benchmarks.md");
    let previous = fs::read_to_string(&path).unwrap_or_default();
    // The sections measured now replace their previous text; the others are kept.
    let mut report = report;
    for (name, body) in measured {
        report = with_section(&report, name, body);
    }
    for (name, body) in sections(&previous).into_iter().filter(|(name, _)| measured.iter().all(|(new, _)| new != name))
    {
        report = with_section(&report, name, body);
    }
    fs::write(&path, report)?;
    step(format!("bench: wrote {}", path.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_or_added_and_the_rest_kept() {
        let report = "# Benchmarks\n\ntables\n";
        let once = with_section(report, "viewer", "## Viewer\n\n1 ms\n");
        assert_eq!(once, "# Benchmarks\n\ntables\n<!-- section: viewer -->\n## Viewer\n\n1 ms\n<!-- end: viewer -->\n");
        let twice = with_section(&with_section(&once, "native", "## Native\n"), "viewer", "## Viewer\n\n2 ms");
        assert!(twice.contains("2 ms") && !twice.contains("1 ms") && twice.contains("## Native"), "{twice}");
        assert_eq!(sections(&twice), [("viewer", "## Viewer\n\n2 ms\n"), ("native", "## Native\n")]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn workload_times_skip_py_spy_messages() {
        let stdout = "py-spy> Sampling process 100 times a second\n4.925000 4.901000\npy-spy> Wrote raw data\n";
        assert_eq!(workload_times(stdout).unwrap(), (4.925, 4.901));
        assert!(workload_times("py-spy> nothing\n").is_err());
    }
}
