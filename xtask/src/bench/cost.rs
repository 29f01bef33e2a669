//! The agent's own cost (issue 17): the kernel's time per sample by Python depth, with and
//! without native unwinding and for a process with no Python stack; the agent's CPU and
//! memory beside many idle CPython processes (against one py-spy per process); and the
//! agent under process churn, its memory and how fast its control socket and `/healthz`
//! answer.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::{free_port, workload, Agent, KillOnDrop, PYENV_PYTHON_3_11};

use super::measure::{children_cpu_seconds, cpu_seconds, peak_rss, sampler_run_time, BpfStats};
use super::{median, Options, RATE};
use crate::{setup, step};

/// Every agent here: a period short enough that periods end during each measurement.
const PERIOD: &str = "10s";
/// From the agent's start-up line to a measurement: its first look at the host is over.
const SETTLE: Duration = Duration::from_secs(10);

/// Python depths of `deep.py`, and how long each workload of the kernel's cost runs.
const DEPTHS: [u32; 3] = [1, 30, 100];
const WORKLOAD_SECONDS: u64 = 8;
/// The agent with no workload, for the cost of the ticks that are not the workload's.
const FLOOR_SECONDS: u64 = 5;
/// A process burning CPU with no Python stack.
const NO_PYTHON: &str = "while :; do :; done";

const IDLE_COUNTS: [usize; 3] = [0, 100, 1000];
/// py-spy runs one process per profiled process: 1000 of them would be a fork bomb.
const PY_SPY_MAX: usize = 100;
const WINDOW: Duration = Duration::from_secs(30);

const EXECS_PER_MINUTE: u32 = 3_000;
const DRIVERS: usize = 4;
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A request not answered by then counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the three parts; returns the section `cost` of docs/benchmarks.md.
pub(super) fn run(options: &Options, agent_bin: &Path) -> Result<String> {
    let load = fs::read_to_string("/proc/loadavg")?;
    let kernel = kernel_table(options, agent_bin)?;
    println!("{kernel}");
    let idle = idle_table(agent_bin)?;
    println!("{idle}");
    let churn = churn_table(agent_bin, options.churn_seconds)?;
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output()?.stdout;
    let command = format!(
        "cargo xtask bench{} --runs {} --churn-seconds {}",
        if options.cost_only { " --cost-only" } else { "" },
        options.runs,
        options.churn_seconds
    );
    Ok(format!(
        "## The agent's own cost\n\n\
         Written by `{command}` on {date} (kernel {kernel_release}, {cores} cores; load average {load} before, from \
         other work on the machine). Every agent: `ferroscope agent --frequency {RATE} --period {PERIOD}`, \
         system-wide, profiles into a temporary directory; CPython is pyenv's 3.11.7.\n\n\
         ### Kernel time per sample\n\n\
         With `kernel.bpf_stats_enabled`, the CPU sampler's (`sample_cpu`) run time and run count are read from \
         the agent's `/proc/PID/fdinfo`. They include every CPU's ticks, most of them idle CPUs' (which leave at \
         once): so first the floor, ns per run over {FLOOR_SECONDS} s of the agent with no workload; then each \
         workload runs {WORKLOAD_SECONDS} s pinned to CPU 0 (`taskset -c 0`), its samples taken as its CPU seconds \
         × {RATE}, and ns per workload sample = (Δrun_time − (Δrun_cnt − workload samples) × floor) / workload \
         samples. `tests/workloads/deep.py --depth N` is N plain Python calls deep under its module, burning CPU \
         in the deepest; `sh -c '{NO_PYTHON}'` has no Python stack. Medians over {runs} run{plural}, each agent started \
         afresh.\n\n{kernel}\n\
         ### Idle CPython processes\n\n\
         N processes of `python3.11 -S tests/workloads/idle.py` (a `time.sleep(0.05)` loop) are started and up \
         before the agent; {SETTLE:?} after its start-up line, the agent's utime + stime are read over {WINDOW:?} \
         (as % of one core), then its VmRSS and VmHWM. One window per configuration. The peer, over the same \
         window on the same 100 processes (without the agent): one `py-spy record --rate {RATE} --nonblocking \
         --format raw -p PID -o /dev/null` per process, as py-spy profiles one process per instance, started \
         {SETTLE:?} before; their CPU summed, their VmRSS summed. py-spy is not run on 1000 processes (1000 \
         instances).\n\n{idle}\n\
         ### Process churn\n\n\
         For {churn_seconds} s, {DRIVERS} threads start {EXECS_PER_MINUTE} short processes a minute (each waited \
         for), half `python3.11 -c pass`, half `/bin/true`, while the agent (with `--metrics-address`) is measured: \
         its CPU, its VmRSS after settling, each minute and at the end. Every {PROBE_INTERVAL:?}, one round trip \
         on its control socket (connect, send `{{\"op\": \"stop\"}}`, read the answer line) and one `GET \
         /healthz` on a new connection.\n\n{churn}",
        date = String::from_utf8_lossy(&date).trim(),
        kernel_release = fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        cores = thread::available_parallelism()?,
        load = load.split(' ').next().unwrap_or("?"),
        runs = options.runs,
        plural = if options.runs == 1 { "" } else { "s" },
        churn_seconds = options.churn_seconds,
    ))
}

/// `ferroscope agent --frequency RATE --period PERIOD FLAGS`, its control socket in `dir`
/// (not the host's default, which another agent may hold).
fn start_agent(agent_bin: &Path, dir: &Path, flags: &[&str]) -> Result<Agent> {
    let socket = dir.join("control.sock");
    let socket = socket.to_str().context("a temporary directory that is not UTF-8")?;
    let mut args = vec!["--frequency", RATE, "--period", PERIOD, "--control-socket", socket];
    args.extend_from_slice(flags);
    Agent::start_binary(agent_bin, &args)
}

/// What a sample costs for workload samples in a window where the sampler ran `runs` times
/// for `run_ns`: the runs that are not the workload's cost `floor_ns` each.
fn ns_per_sample(run_ns: u64, runs: u64, workload_samples: f64, floor_ns: f64) -> Option<f64> {
    if workload_samples < 1.0 {
        return None;
    }
    let other_runs = (runs as f64 - workload_samples).max(0.0);
    Some((run_ns as f64 - other_runs * floor_ns) / workload_samples)
}

#[derive(Clone, Copy)]
enum Shape {
    Python(u32),
    NoPython,
}

const SHAPES: [Shape; 4] =
    [Shape::Python(DEPTHS[0]), Shape::Python(DEPTHS[1]), Shape::Python(DEPTHS[2]), Shape::NoPython];
/// Native unwinding on (the default), then off.
const UNWINDING: [&[&str]; 2] = [&[], &["--no-native-unwind"]];

/// The kernel's ns per sample of each shape, with and without native unwinding: a markdown
/// table of medians over runs.
fn kernel_table(options: &Options, agent_bin: &Path) -> Result<String> {
    let stats = BpfStats::enable()?;
    let mut floors = vec![Vec::new(); UNWINDING.len()];
    let mut ns = vec![vec![Vec::new(); SHAPES.len()]; UNWINDING.len()];
    for run in 0..options.runs {
        // Rotate the order, so that neither always runs on a machine the other warmed.
        for offset in 0..UNWINDING.len() {
            let unwinding = (run + offset) % UNWINDING.len();
            let dir = tempfile::tempdir()?;
            let agent = start_agent(agent_bin, dir.path(), UNWINDING[unwinding])?;
            thread::sleep(Duration::from_secs(2));
            let floor = floor_ns(agent.pid())?;
            floors[unwinding].push(floor);
            for (shape, values) in SHAPES.iter().zip(&mut ns[unwinding]) {
                let sample_ns = kernel_ns_per_sample(agent.pid(), *shape, floor)?;
                step(format!(
                    "bench: cost: run {}/{} {:?}: {} {sample_ns:.0} ns",
                    run + 1,
                    options.runs,
                    UNWINDING[unwinding],
                    shape_name(*shape)
                ));
                values.push(sample_ns);
            }
            agent.stop()?;
        }
    }
    drop(stats);
    let targets = ["", "", "≤ 8 µs with native unwinding (goal 5 µs)", "≤ 1.5 µs"];
    let mut table =
        String::from("| sample | native unwinding (default) | `--no-native-unwind` | target |\n|---|---:|---:|---|\n");
    for (i, shape) in SHAPES.iter().enumerate() {
        let micros = |values: &Vec<f64>| format!("{:.2} µs", median(values) / 1000.0);
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            shape_name(*shape),
            micros(&ns[0][i]),
            micros(&ns[1][i]),
            targets[i]
        ));
    }
    table.push_str(&format!(
        "| floor: a run of the sampler with no workload (mostly idle CPUs' ticks) | {:.0} ns | {:.0} ns | |\n",
        median(&floors[0]),
        median(&floors[1])
    ));
    Ok(table)
}

fn shape_name(shape: Shape) -> String {
    match shape {
        Shape::Python(depth) => format!("`deep.py --depth {depth}`"),
        Shape::NoPython => "`sh -c` busy loop, no Python stack".to_owned(),
    }
}

/// ns per run of the agent's CPU sampler over FLOOR_SECONDS with no workload.
fn floor_ns(agent: u32) -> Result<f64> {
    let before = sampler_run_time(agent)?;
    thread::sleep(Duration::from_secs(FLOOR_SECONDS));
    let after = sampler_run_time(agent)?;
    let runs = after.1.saturating_sub(before.1);
    ensure!(runs > 0, "the CPU sampler did not run in {FLOOR_SECONDS} s");
    Ok(after.0.saturating_sub(before.0) as f64 / runs as f64)
}

/// Runs `shape` pinned to CPU 0 for WORKLOAD_SECONDS: the kernel's ns per sample of it.
fn kernel_ns_per_sample(agent: u32, shape: Shape, floor: f64) -> Result<f64> {
    let before = sampler_run_time(agent)?;
    let cpu_before = children_cpu_seconds();
    let mut command = Command::new("taskset");
    command.args(["-c", "0"]).stdin(Stdio::null()).stdout(Stdio::null());
    match shape {
        Shape::Python(depth) => {
            command.arg(PYENV_PYTHON_3_11).arg(workload("deep.py"));
            command.args(["--depth", &depth.to_string(), "--seconds", &WORKLOAD_SECONDS.to_string()]);
        }
        Shape::NoPython => {
            command.args(["sh", "-c", NO_PYTHON]);
        }
    }
    let mut child = KillOnDrop(command.spawn()?);
    if let Shape::NoPython = shape {
        thread::sleep(Duration::from_secs(WORKLOAD_SECONDS));
        child.0.kill()?;
        child.0.wait()?;
    } else {
        let status = child.0.wait()?;
        ensure!(status.success(), "{} exited with {status}", shape_name(shape));
    }
    // Waited for, so its CPU time is in our children's (taskset execs it, same process).
    let samples = (children_cpu_seconds() - cpu_before) * RATE.parse::<f64>()?;
    let after = sampler_run_time(agent)?;
    ns_per_sample(after.0.saturating_sub(before.0), after.1.saturating_sub(before.1), samples, floor)
        .with_context(|| format!("{} used no CPU", shape_name(shape)))
}

/// CPU (% of one core) of processes over a window, their VmRSS at its end and VmHWM, summed.
struct Usage {
    cpu_percent: f64,
    rss: u64,
    hwm: u64,
}

fn usage_over(pids: &[u32], window: Duration) -> Result<Usage> {
    let total_cpu = || pids.iter().map(|&pid| cpu_seconds(pid)).sum::<Result<f64>>();
    let before = total_cpu()?;
    let started = Instant::now();
    thread::sleep(window);
    let cpu = total_cpu()? - before;
    let seconds = started.elapsed().as_secs_f64();
    let rss = pids.iter().map(|&pid| rss(pid)).sum::<Result<u64>>()?;
    let hwm = pids.iter().map(|&pid| peak_rss(pid)).sum::<Result<u64>>()?;
    Ok(Usage { cpu_percent: 100.0 * cpu / seconds, rss, hwm })
}

/// VmRSS of a process, in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib =
        status.lines().find_map(|line| line.strip_prefix("VmRSS:")).with_context(|| format!("no VmRSS for {pid}"))?;
    Ok(kib.trim().trim_end_matches("kB").trim().parse::<u64>()? * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Starts `count` idle CPython processes and waits until each has said it is up; they are
/// killed when the vector is dropped.
fn start_idle(count: usize) -> Result<Vec<KillOnDrop>> {
    let dir = tempfile::tempdir()?;
    let ready = dir.path().join("ready");
    fs::write(&ready, "")?;
    let mut processes = Vec::with_capacity(count);
    for _ in 0..count {
        let child = Command::new(PYENV_PYTHON_3_11)
            .arg("-S")
            .arg(workload("idle.py"))
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        processes.push(KillOnDrop(child));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while fs::read_to_string(&ready)?.lines().count() < count {
        for process in &mut processes {
            ensure!(process.0.try_wait()?.is_none(), "an idle process exited");
        }
        ensure!(Instant::now() < deadline, "{count} idle processes were not all up in 5 minutes");
        thread::sleep(Duration::from_millis(200));
    }
    Ok(processes)
}

/// The agent beside 0, 100 and 1000 idle CPython processes, wall time on and off, and
/// py-spy on the 100: a markdown table.
fn idle_table(agent_bin: &Path) -> Result<String> {
    let mut table = String::from(
        "| idle CPython processes | profiler | CPU (% of a core) | VmRSS at the end | VmHWM | target |\n\
         |---:|---|---:|---:|---:|---|\n",
    );
    for count in IDLE_COUNTS {
        step(format!("bench: cost: starting {count} idle CPython processes"));
        let idle = start_idle(count)?;
        for (name, flags) in [("Ferroscope (wall time on)", &[][..]), ("Ferroscope `--no-wall`", &["--no-wall"][..])] {
            let dir = tempfile::tempdir()?;
            let agent = start_agent(agent_bin, dir.path(), flags)?;
            thread::sleep(SETTLE);
            let usage = usage_over(&[agent.pid()], WINDOW)?;
            agent.stop()?;
            step(format!("bench: cost: {count} idle, {name}: {:.2}% of a core, {}", usage.cpu_percent, mib(usage.rss)));
            let target = match count {
                0 => "RSS ≤ 32 MiB",
                100 => "≤ 1% (goal 0.5%); RSS ≤ 32 MiB",
                _ => "",
            };
            table.push_str(&format!(
                "| {count} | {name} | {:.2}% | {} | {} | {target} |\n",
                usage.cpu_percent,
                mib(usage.rss),
                mib(usage.hwm)
            ));
        }
        if count == PY_SPY_MAX {
            let pids: Vec<u32> = idle.iter().map(|process| process.0.id()).collect();
            let usage = py_spy_usage(&pids)?;
            step(format!("bench: cost: {count} idle, py-spy: {:.2}% of a core", usage.cpu_percent));
            table.push_str(&format!(
                "| {count} | py-spy 0.4.3, one per process ({count}), summed | {:.2}% | {} | {} | |\n",
                usage.cpu_percent,
                mib(usage.rss),
                mib(usage.hwm)
            ));
        } else if count > PY_SPY_MAX {
            table.push_str(&format!("| {count} | py-spy | not run ({count} instances) | | | |\n"));
        }
    }
    Ok(table)
}

/// One `py-spy record` per process of `pids`, settled, then measured over WINDOW.
fn py_spy_usage(pids: &[u32]) -> Result<Usage> {
    let py_spy = setup::py_spy();
    let spies = pids
        .iter()
        .map(|pid| {
            let child = Command::new(&py_spy)
                .args(["record", "--rate", RATE, "--nonblocking", "--format", "raw", "-o", "/dev/null", "-p"])
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            Ok(KillOnDrop(child))
        })
        .collect::<Result<Vec<_>>>()?;
    thread::sleep(SETTLE);
    let spy_pids: Vec<u32> = spies.iter().map(|spy| spy.0.id()).collect();
    usage_over(&spy_pids, WINDOW).context("a py-spy process ended early")
}

/// p-th percentile (nearest rank) of `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Round trips of one kind of request during the churn.
#[derive(Default)]
struct Probe {
    ms: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

impl Probe {
    fn summary(&self) -> String {
        let mut text = format!(
            "{:.1} / {:.1} / {:.1} ms ({} requests",
            percentile(&self.ms, 50.0),
            percentile(&self.ms, 99.0),
            percentile(&self.ms, 100.0),
            self.ms.len()
        );
        if let Some(error) = &self.first_error {
            text.push_str(&format!("; {} failed, the first: {error}", self.errors));
        }
        text + ")"
    }
}

/// What the churn measured.
struct Churn {
    seconds: f64,
    /// Processes started: CPython, `/bin/true`, failed to start or exited with an error.
    started: [u64; 3],
    cpu_percent: f64,
    rss_settled: u64,
    rss_minutes: Vec<u64>,
    rss_end: u64,
    hwm: u64,
    socket: Probe,
    healthz: Probe,
}

fn churn_table(agent_bin: &Path, seconds: u64) -> Result<String> {
    let churn = churn(agent_bin, seconds)?;
    let execs = (churn.started[0] + churn.started[1]) as f64 * 60.0 / churn.seconds;
    let minutes: Vec<String> = churn.rss_minutes.iter().map(|&bytes| mib(bytes)).collect();
    Ok(format!(
        "| | measured | target |\n|---|---|---|\n\
         | execs per minute achieved (CPython, `/bin/true`; failed) | {execs:.0} ({}, {}; {}) | about {EXECS_PER_MINUTE} |\n\
         | agent CPU (% of a core) | {:.2}% | ≤ 2% |\n\
         | agent VmRSS after settling → at the end (VmHWM) | {} → {} ({}) | ≤ 48 MiB after an hour, flat |\n\
         | agent VmRSS at the end of each minute | {} | flat |\n\
         | control socket round trip, p50 / p99 / max | {} | p99 ≤ 50 ms |\n\
         | `GET /healthz`, p50 / p99 / max | {} | p99 ≤ 50 ms |\n",
        churn.started[0],
        churn.started[1],
        churn.started[2],
        churn.cpu_percent,
        mib(churn.rss_settled),
        mib(churn.rss_end),
        mib(churn.hwm),
        if minutes.is_empty() { "(under a minute)".to_owned() } else { minutes.join(", ") },
        churn.socket.summary(),
        churn.healthz.summary(),
    ))
}

/// The agent under `seconds` of process churn, probed all along.
fn churn(agent_bin: &Path, seconds: u64) -> Result<Churn> {
    let dir = tempfile::tempdir()?;
    let address = format!("127.0.0.1:{}", free_port()?);
    let agent = start_agent(agent_bin, dir.path(), &["--metrics-address", &address])?;
    thread::sleep(SETTLE);
    let pid = agent.pid();
    let rss_settled = rss(pid)?;
    let cpu_before = cpu_seconds(pid)?;
    step(format!("bench: cost: {seconds} s of churn"));
    let socket = dir.path().join("control.sock");
    let stop = AtomicBool::new(false);
    let started: [AtomicU64; 3] = Default::default();
    let begun = Instant::now();
    let deadline = begun + Duration::from_secs(seconds);
    let (minutes, socket_probe, healthz_probe) = thread::scope(|scope| {
        for index in 0..DRIVERS {
            let (stop, started) = (&stop, &started);
            scope.spawn(move || drive(index, begun, deadline, stop, started));
        }
        let socket_probe = scope.spawn(|| probe(begun, deadline, &stop, || ask_control_socket(&socket)));
        let healthz_probe = scope.spawn(|| probe(begun, deadline, &stop, || get_healthz(&address)));
        let minutes = watch_rss(pid, begun, deadline, &stop);
        (minutes, socket_probe.join().unwrap(), healthz_probe.join().unwrap())
    });
    let minutes = minutes.with_context(|| format!("the agent during the churn; its output:\n{}", agent.log()))?;
    let elapsed = begun.elapsed().as_secs_f64();
    let cpu_percent = 100.0 * (cpu_seconds(pid)? - cpu_before) / elapsed;
    let (rss_end, hwm) = (rss(pid)?, peak_rss(pid)?);
    agent.stop()?;
    Ok(Churn {
        seconds: elapsed,
        started: started.map(AtomicU64::into_inner),
        cpu_percent,
        rss_settled,
        rss_minutes: minutes,
        rss_end,
        hwm,
        socket: socket_probe,
        healthz: healthz_probe,
    })
}

/// Starts this driver's share of the churn until `deadline`: the processes of sequence
/// numbers `index`, `index + DRIVERS`, ... (even: CPython, odd: `/bin/true`), each at its
/// time, or at once when late, so that the rate holds on average.
fn drive(index: usize, begun: Instant, deadline: Instant, stop: &AtomicBool, started: &[AtomicU64; 3]) {
    let interval = Duration::from_secs(60) / EXECS_PER_MINUTE;
    for sequence in (index as u32..).step_by(DRIVERS) {
        let at = begun + interval * sequence;
        if at >= deadline || stop.load(Relaxed) {
            return;
        }
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let python = sequence % 2 == 0;
        let mut command = if python { Command::new(PYENV_PYTHON_3_11) } else { Command::new("/bin/true") };
        if python {
            command.args(["-c", "pass"]);
        }
        let status = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let kind = match status {
            Ok(status) if status.success() => usize::from(!python),
            _ => 2,
        };
        started[kind].fetch_add(1, Relaxed);
    }
}

/// Sends `request` every PROBE_INTERVAL until `deadline`, timing each.
fn probe(begun: Instant, deadline: Instant, stop: &AtomicBool, request: impl Fn() -> Result<()>) -> Probe {
    let mut probe = Probe::default();
    for tick in 0.. {
        let at = begun + PROBE_INTERVAL * tick;
        if at >= deadline || stop.load(Relaxed) {
            break;
        }
        thread::sleep(at.saturating_duration_since(Instant::now()));
        let sent = Instant::now();
        match request() {
            Ok(()) => probe.ms.push(sent.elapsed().as_secs_f64() * 1000.0),
            Err(error) => {
                probe.errors += 1;
                probe.first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    probe
}

/// One round trip on the control socket: connect, a request, its answer.
fn ask_control_socket(socket: &Path) -> Result<()> {
    let stream = UnixStream::connect(socket).context("connecting to the control socket")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut stream = BufReader::new(stream);
    // Stops the profiling of this process: harmless, and answered by the agent's own loop.
    stream.get_mut().write_all(b"{\"op\": \"stop\"}\n")?;
    let mut answer = String::new();
    stream.read_line(&mut answer)?;
    ensure!(answer.contains("\"ok\""), "the control socket answered {answer:?}");
    Ok(())
}

/// `GET /healthz` on a new connection, to its end.
fn get_healthz(address: &str) -> Result<()> {
    let mut stream = TcpStream::connect(address).context("connecting to the metrics address")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "/healthz answered {answer:?}");
    Ok(())
}

/// The agent's VmRSS at the end of each whole minute until `deadline`; an error (and
/// `stop` set) if the agent is gone.
fn watch_rss(pid: u32, begun: Instant, deadline: Instant, stop: &AtomicBool) -> Result<Vec<u64>> {
    let mut minutes = Vec::new();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())));
        let now = match rss(pid) {
            Ok(bytes) => bytes,
            Err(error) => {
                stop.store(true, Relaxed);
                return Err(error.context("the agent ended"));
            }
        };
        if begun.elapsed() >= Duration::from_secs(60 * (minutes.len() as u64 + 1)) {
            minutes.push(now);
        }
    }
    Ok(minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_sample_cost_takes_the_floor_out() {
        // 800 workload samples and 1000 idle ticks of 200 ns: 2,000,000 ns of the total are
        // the workload's.
        let ns = ns_per_sample(2_200_000, 1_800, 800.0, 200.0).unwrap();
        assert!((ns - 2_500.0).abs() < 1e-9, "{ns}");
        // Fewer runs than estimated samples (a few lost): no negative count of idle ticks.
        assert_eq!(ns_per_sample(1_000_000, 390, 400.0, 200.0), Some(2_500.0));
        assert_eq!(ns_per_sample(1_000, 10, 0.0, 200.0), None);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
