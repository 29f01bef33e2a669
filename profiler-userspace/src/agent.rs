//! The controller: wires the stages together. Kernel events come in
//! ([`kernel::events`]); each process is looked at once ([`process`],
//! [`cpython`]); each sample becomes a named stack ([`stack`]) added to its
//! application's period ([`aggregate`]); each period's profiles go out
//! ([`export`]).

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::{unwound, StackRecord};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    aggregate::{
        heap::{self, LiveHeap, Origin, Sampled},
        Aggregator, Dimension, Dimensions, Measurement, ProcessThreads, Series, ThreadCounts,
    },
    config::Settings,
    control::{self, Request},
    cpython::{self, MemoryProbes, PythonStatus},
    export::Sinks,
    kernel::{
        events::{self, Event},
        KernelStats, Sampler,
    },
    metrics::{self, Metrics},
    native::{self, symbolize::NativeSymbolizer},
    process::{discovery, kubernetes::Pods, Look, Recheck, Table},
    stack::{self, Frame, InterpreterFrames, Wait},
    summary::PeriodSummary,
};

/// What a stack record was taken at, from its event.
#[derive(Clone, Copy)]
enum Taken {
    Cpu,
    /// Back from off the CPU, having waited for this.
    OffCpu(Wait),
    /// An allocation, or (`arena`) a pymalloc arena.
    Alloc {
        arena: bool,
    },
}

/// How often the agent reads samples from the ring buffer.
const READ_INTERVAL: Duration = Duration::from_millis(100);
/// The longest the loop reads records before it looks at what else is due:
/// under a flood of new processes, control requests are still answered.
const DRAIN_SLICE: Duration = Duration::from_millis(10);
/// The kernel's counters are copied into the metrics every this many ticks.
const METRICS_TICKS: u64 = 10;

/// The next request on the control socket, if there is one.
async fn recv(control: &mut Option<tokio::sync::mpsc::Receiver<control::Command>>) -> Option<control::Command> {
    match control {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

pub async fn run(mut settings: Settings) -> Result<()> {
    let (mut sampler, events) = start_kernel(&mut settings)?;
    let sinks = Sinks::start(&settings)?;
    let pods = match &settings.kubernetes {
        Some(kubernetes) => Some(Pods::watch(kubernetes).await?),
        None => None,
    };
    let mut agent = Agent::new(&settings, pods);
    if settings.native_unwind {
        let (rows, unwind_processes) = sampler.unwind_maps()?;
        agent.unwind = Some(native::Loader::start(rows, unwind_processes));
    }
    agent.metrics.set_features(&sampler.features);
    if let Some(address) = settings.metrics_address {
        metrics::serve(address, agent.metrics.clone(), sinks.remote.clone()).await?;
    }
    agent.native.load_kernel_symbols();
    // Before the start-up line: whoever reads it to know the agent runs may stop it at once,
    // or talk to it.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut control = control_socket(&settings);
    eprintln!("{}", startup_line(&settings, sampler.cpus, &sinks));
    for refusal in sampler.features.refusals() {
        eprintln!("ferroscope: {refusal}; the other dimensions go on");
    }

    // SAFETY: the ring buffer owns its fd and keeps it open for as long as
    // the `AsyncFd` holds it.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(|error| anyhow::anyhow!("cannot poll the events ring buffer: {error}"))?;
    let started = Instant::now();
    let deadline = settings.duration.map(|duration| started + duration);
    let mut next_period = started + settings.period;
    let mut stats_before = KernelStats::default();
    // Samples don't wake the agent (see profiler-ebpf's WAKEUP_BYTES): it
    // reads them on this tick, and process events wake it at once.
    let mut read_tick = tokio::time::interval(READ_INTERVAL);
    let mut ticks: u64 = 0;
    read_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let period_end = deadline.map_or(next_period, |deadline| next_period.min(deadline));
        let stop = tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready?;
                // Left ready while records remain: the loop comes back to
                // them after what else is due (a control request).
                if agent.drain(guard.get_inner_mut(), &mut sampler, Some(DRAIN_SLICE)) {
                    guard.clear_ready();
                }
                continue;
            }
            _ = read_tick.tick() => {
                ticks += 1;
                if !agent.tick(events.get_mut(), &mut sampler, &sinks, ticks)? {
                    continue;
                }
                true
            }
            Some(command) = recv(&mut control) => {
                // Its samples so far belong to what it asks about.
                agent.drain(events.get_mut(), &mut sampler, Some(DRAIN_SLICE));
                let answer = agent.control(command.pid, command.request, &sinks, &mut sampler);
                let _ = command.reply.send(answer);
                continue;
            }
            _ = tokio::time::sleep_until(period_end.into()) => deadline.is_some_and(|deadline| Instant::now() >= deadline),
            _ = interrupt.recv() => true,
            _ = terminate.recv() => true,
        };
        // Samples already in the ring belong to the period that ends now.
        agent.drain(events.get_mut(), &mut sampler, None);
        let stats = sampler.stats()?;
        agent.finish_period(&sinks, &mut sampler, stats, stats_before, stop);
        stats_before = stats;
        if stop {
            sinks.drain(Instant::now() + settings.upload_timeout).await;
            return Ok(());
        }
        next_period += settings.period;
    }
}

/// Loads and attaches the kernel's programs. What the kernel refused is
/// measured no further (turned off in `settings`): the rest goes on.
fn start_kernel(settings: &mut Settings) -> Result<(Sampler, RingBuf<MapData>)> {
    let (sampler, events) = Sampler::start(settings.frequency, &settings.pids, settings.wall, settings.memory)?;
    settings.wall &= sampler.features.wall.is_on();
    if !sampler.features.memory.is_on() {
        settings.memory = None;
    }
    Ok((sampler, events))
}

/// The requests of the control socket; none without it (no right to create
/// it), and the rest works.
fn control_socket(settings: &Settings) -> Option<tokio::sync::mpsc::Receiver<control::Command>> {
    control::listen(&settings.control_socket)
        .map_err(|error| log::warn!("no control socket, so processes cannot register themselves: {error:#}"))
        .ok()
}

/// `ferroscope: sampling every process at 100 Hz on 2 CPUs, with wall time; a profile every 45s to ./profiles`.
fn startup_line(settings: &Settings, cpus: usize, sinks: &Sinks) -> String {
    format!(
        "ferroscope: sampling {} at {} Hz on {cpus} CPUs{}; a profile every {} to {}",
        if settings.pids.is_empty() {
            "every process".to_owned()
        } else {
            format!("pid {}", settings.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
        },
        settings.frequency,
        match (settings.wall, settings.memory) {
            (true, Some(_)) => ", with wall time and memory",
            (true, None) => ", with wall time",
            (false, Some(_)) => ", with memory",
            (false, None) => "",
        },
        humantime::format_duration(settings.period),
        sinks.describe(),
    )
}

struct Agent<'a> {
    settings: &'a Settings,
    processes: Table,
    native: NativeSymbolizer,
    aggregator: Aggregator,
    metrics: Arc<Metrics>,
    /// Sampled allocations still in use, with `--memory`.
    heap: LiveHeap,
    summary: PeriodSummary,
    /// Reused for every sample.
    stack: Vec<Frame>,
    /// Loads the unwind tables of the processes' files into the kernel.
    unwind: Option<native::Loader>,
}

impl<'a> Agent<'a> {
    fn new(settings: &'a Settings, pods: Option<Pods>) -> Self {
        Agent {
            settings,
            processes: Table::new(settings.application_name.clone(), pods),
            native: NativeSymbolizer::new(),
            aggregator: Aggregator::new(
                settings.labels.clone(),
                settings.sample_period_ns(),
                Dimensions::CPU.with(Dimension::Wall, settings.wall).with(Dimension::Memory, settings.memory.is_some()),
                SystemTime::now(),
            ),
            heap: LiveHeap::default(),
            metrics: Arc::default(),
            summary: PeriodSummary::default(),
            stack: Vec::with_capacity(256),
            unwind: None,
        }
    }

    /// The work of every read tick: the samples, the pods, the periods
    /// processes have of their own, and every [`METRICS_TICKS`] the kernel's
    /// counters; whether to stop (`--pid`'s processes are all gone).
    fn tick(
        &mut self,
        events: &mut RingBuf<MapData>,
        sampler: &mut Sampler,
        sinks: &Sinks,
        ticks: u64,
    ) -> Result<bool> {
        self.drain(events, sampler, Some(DRAIN_SLICE));
        self.processes.label_new_pods();
        for profile in self.aggregator.finish_own_periods(SystemTime::now()) {
            sinks.send(&profile);
        }
        if !ticks.is_multiple_of(METRICS_TICKS) {
            return Ok(false);
        }
        self.metrics.set_kernel(&sampler.stats()?);
        let pids = &self.settings.pids;
        // With --pid, nothing is left to profile once they are all gone.
        let gone = !pids.is_empty() && pids.iter().all(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if gone {
            log::info!("the processes of --pid have exited: stopping");
        }
        Ok(gone)
    }

    /// Handles the ring buffer's records, for at most `slice` (all with
    /// `None`); false when some are left.
    fn drain(&mut self, events: &mut RingBuf<MapData>, sampler: &mut Sampler, slice: Option<Duration>) -> bool {
        let deadline = slice.map(|slice| Instant::now() + slice);
        let mut handled = 0u32;
        while let Some(record) = events.next() {
            self.handle(&record, sampler);
            handled += 1;
            // A clock read per 64 records, each a few µs of work.
            if handled.is_multiple_of(64) && deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return false;
            }
        }
        true
    }

    /// One record of the ring buffer.
    fn handle(&mut self, record: &[u8], sampler: &mut Sampler) {
        match events::decode(record) {
            Ok(Event::Cpu(sample)) => self.on_sample(&sample, Taken::Cpu, sampler),
            Ok(Event::OffCpu(sample)) => {
                self.on_sample(&sample, Taken::OffCpu(Wait::from_kernel(sample.wait)), sampler)
            }
            Ok(Event::Alloc(sample)) => self.on_sample(&sample, Taken::Alloc { arena: false }, sampler),
            Ok(Event::Arena(sample)) => self.on_sample(&sample, Taken::Alloc { arena: true }, sampler),
            Ok(Event::Free { pid, address }) => self.heap.freed(pid, address),
            Ok(Event::NewProcess { pid, comm }) => {
                self.inspect(pid, &comm, sampler);
                // The agent's own stacks are not what users look for;
                // CPython processes are loaded once found (`inspect`).
                if let Some(loader) = self.unwind.as_ref().filter(|_| pid != std::process::id()) {
                    loader.process(pid, self.settings.pids.contains(&pid));
                }
            }
            Ok(Event::Exit { pid }) => {
                if let Some(process) = self.processes.get_mut(pid) {
                    process.exited = true;
                }
                if let Some(loader) = &self.unwind {
                    loader.exited(pid);
                }
            }
            Err(unexpected) => log::warn!("{unexpected}"),
        }
    }

    /// Looks at a process the kernel saw for the first time (or since its
    /// last exec) and tells the kernel how to walk it if it runs CPython.
    /// `comm` names it if it is already gone.
    fn inspect(&mut self, pid: u32, comm: &[u8; 16], sampler: &mut Sampler) {
        // First, so that its native frames can be named even if it exits
        // while we look at it.
        self.native.remember_process(pid);
        let Ok(info) = discovery::inspect(pid) else {
            // Alive but not readable yet (caught in exec): look again soon.
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            let recheck = alive.then(|| self.processes.retry(pid)).flatten().unwrap_or_else(|| {
                self.summary.vanished_processes += 1;
                Recheck::Never
            });
            self.processes.unreadable(pid, comm_text(comm), recheck);
            return;
        };
        // A new program image (exec): what was probed in the old one goes.
        if let Some(python) = self.processes.get_mut(pid).and_then(|old| old.python.take()) {
            python.detach(sampler);
        }
        sampler.forget_live(pid, &self.heap.forget_process(pid));
        let mut recheck = Recheck::Never;
        let python = match &info.python {
            PythonStatus::NotPython => {
                // Without libc yet, its loader may still be mapping a libpython.
                let starting = info.libc.is_none().then(|| self.processes.retry(pid)).flatten();
                recheck = starting.unwrap_or(Recheck::OnNewCode);
                None
            }
            PythonStatus::Starting(reason) => {
                match self.processes.retry(pid) {
                    Some(again) => recheck = again,
                    None => self.skip_unsupported(pid, reason),
                }
                None
            }
            PythonStatus::Supported(interpreter) => {
                let memory = self.settings.memory.is_some();
                match cpython::Instance::attach(pid, interpreter, info.libc.as_deref(), sampler, memory) {
                    Ok((instance, probes)) => {
                        self.summary.python_processes += 1;
                        log::info!("pid {pid}: {}", interpreter.describe());
                        if let MemoryProbes::Failed(error) = probes {
                            self.summary.memory_unwatched += 1;
                            log::warn!("pid {pid}: memory not profiled: {error:#}");
                        }
                        Some(instance)
                    }
                    Err(error) => {
                        log::warn!("pid {pid}: {error:#}");
                        None
                    }
                }
            }
            PythonStatus::Unsupported(reason) => {
                self.skip_unsupported(pid, reason);
                None
            }
        };
        let is_python = python.is_some();
        self.processes.looked_at(pid, Look { info, python, recheck });
        if let Some(loader) = self.unwind.as_ref().filter(|_| is_python) {
            loader.process(pid, true);
        }
        self.metrics.set_python_processes(self.processes.pythons());
    }

    /// Reports, once per process, a CPython that cannot be profiled.
    fn skip_unsupported(&mut self, pid: u32, reason: &str) {
        self.summary.unsupported_processes += 1;
        log::warn!("pid {pid}: {reason}: skipped (native stacks are still profiled)");
    }

    /// A stack sampled on the CPU, off it, or at an allocation, as `taken` says.
    fn on_sample(&mut self, sample: &StackRecord, taken: Taken, sampler: &mut Sampler) {
        let pid = sample.pid;
        if self.processes.get(pid).is_none() {
            // Its NEW_PROCESS event was lost: the thread's name will do.
            self.inspect(pid, &sample.comm, sampler);
        }
        let user = valid(&sample.user_stack, sample.user_len);
        if let Some(loader) = self.unwind.as_ref().filter(|_| sample.user_unwound == unwound::UNMAPPED) {
            loader.mapped(pid);
        }
        if self.processes.get_mut(pid).is_some_and(|process| process.due(pid, user)) {
            self.inspect(pid, &sample.comm, sampler);
        }
        let Some(process) = self.processes.get_mut(pid).filter(|process| !process.stopped) else { return };
        let raw = stack::Raw {
            pid,
            kernel: valid(&sample.kernel_stack, sample.kernel_len),
            // Unwound with tables, every frame is real: libraries loaded
            // since the process was looked at included.
            user: if sample.user_unwound != unwound::NO_TABLES { user } else { process.user_stack(user) },
            python: valid(&sample.py_frames, sample.py_len),
            python_status: sample.py_status,
            wait: match taken {
                Taken::OffCpu(wait) => Some(wait),
                _ => None,
            },
        };
        let interpreter = process.python.as_mut().map(|python| python as &mut dyn InterpreterFrames);
        let walk = stack::assemble(&mut self.stack, &raw, &mut self.native, interpreter);
        self.summary.unnamed_python_frames += walk.unnamed;
        self.summary.broken_python_stacks += u64::from(walk.broken);
        let stack = &self.stack;
        let series = &process.series;
        let thread = process.thread(pid, sample.tid, comm_text(&sample.comm), sample.label_set);
        match taken {
            Taken::OffCpu(wait) => {
                let off_cpu = Measurement::OffCpu { wait, ns: sample.off_cpu_ns };
                self.aggregator.add(series, stack, &thread, off_cpu);
            }
            Taken::Alloc { arena } => {
                let Some(mean) = self.settings.memory else { return };
                let arena = process.python.as_ref().and_then(|python| python.pymalloc()).filter(|_| arena);
                let sampled = Sampled { pid, address: sample.address, bytes: sample.bytes, arena };
                let origin = Origin { series: series.clone(), stack: stack.as_slice().into(), thread };
                heap::account(&mut self.aggregator, &mut self.heap, sampled, origin, mean);
            }
            Taken::Cpu => {
                self.summary.samples += 1;
                self.aggregator.add(series, stack, &thread, Measurement::Cpu);
            }
        }
    }

    /// A process's request on the control socket (its fields already checked).
    fn control(&mut self, pid: u32, request: Request, sinks: &Sinks, sampler: &mut Sampler) -> Result<(), String> {
        if self.processes.get(pid).is_none() {
            self.inspect(pid, &[0; 16], sampler);
        }
        let process = self.processes.get(pid).ok_or("the agent cannot see this process")?;
        match request {
            Request::Start { application_name, labels, period, upload_timeout } => {
                let application = application_name.map_or_else(|| process.series.application.clone(), Arc::from);
                let registered = Series { application, labels: Arc::new(labels) };
                let series = self.processes.register(pid, registered).expect("known above").series.clone();
                if let Some(period) = period.map(Duration::from_secs_f64) {
                    let upload_timeout = upload_timeout.map(Duration::from_secs_f64);
                    self.aggregator.set_own_period(&series, period, upload_timeout, SystemTime::now());
                }
                log::info!("pid {pid}: registered as {}", series.application);
            }
            Request::Thread { tid, address } => {
                // Only a thread of its own.
                if !Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
                    return Err(format!("thread {tid} is not one of process {pid}"));
                }
                sampler.set_label_slot(tid, address).map_err(|error| format!("{error:#}"))?;
            }
            Request::LabelSet { id, labels } => self.processes.set_label_set(pid, id, labels)?,
            Request::Stop => {
                let series = process.series.clone();
                self.processes.get_mut(pid).expect("known above").stopped = true;
                if let Some(profile) = self.aggregator.take(&series, SystemTime::now()) {
                    sinks.send(&profile);
                }
                log::info!("pid {pid}: profiling stopped, {} flushed", series.application);
            }
        }
        Ok(())
    }

    /// Ends the period; `last`: the agent stops, and the periods processes
    /// have of their own end too.
    fn finish_period(
        &mut self,
        sinks: &Sinks,
        sampler: &mut Sampler,
        stats: KernelStats,
        before: KernelStats,
        last: bool,
    ) {
        for in_use in self.heap.in_use() {
            let Origin { series, stack, thread } = in_use.origin;
            let in_use = Measurement::InUse { objects: in_use.objects, bytes: in_use.bytes };
            self.aggregator.add(series, stack, thread, in_use);
        }
        let end = SystemTime::now();
        let mut profiles = if last { self.aggregator.finish_all(end) } else { self.aggregator.finish_period(end) };
        let mut summary = std::mem::take(&mut self.summary);
        summary.kernel(&stats, &before);
        if let Some(loader) = &self.unwind {
            summary.unwinder(&loader.stats);
        }
        summary.live_followed = self.heap.len();
        summary.refusals = sampler.features.refusals();
        let threads = self.thread_counts(sampler);
        for profile in &mut profiles {
            profile.threads = threads
                .iter()
                .filter(|(series, _)| {
                    *series.application == *profile.application
                        && series.labels.iter().all(|(key, value)| profile.labels.get(key) == Some(value))
                })
                .map(|(_, threads)| threads.clone())
                .collect();
        }
        summary.threads = threads.into_iter().map(|(_, threads)| threads).collect();
        for profile in &profiles {
            summary.profiles_written += u64::from(sinks.send(profile));
        }
        summary.sinks = sinks.report();
        self.metrics.add_profiles(profiles.len() as u64);
        self.metrics.set_kernel(&stats);
        summary.print(&profiles);
        for (pid, process) in self.processes.take_exited() {
            if let Some(python) = process.python {
                python.detach(sampler);
            }
            // Its allocations were freed with it.
            sampler.forget_live(pid, &self.heap.forget_process(pid));
            sampler.forget_threads(pid);
            self.native.forget_process(pid);
        }
        for (_, process) in self.processes.iter_mut() {
            if let Some(python) = process.python.as_mut() {
                python.forget_code();
            }
        }
        self.metrics.set_python_processes(self.processes.pythons());
    }

    /// The thread counts of the period of every process profiled, by pid.
    fn thread_counts(&mut self, sampler: &Sampler) -> Vec<(Series, ProcessThreads)> {
        let pids = &self.settings.pids;
        let mut threads: Vec<_> = self
            .processes
            .iter_mut()
            .filter(|(pid, process)| process.python.is_some() || pids.contains(pid))
            .map(|(pid, process)| {
                let tally = sampler.thread_tally(pid);
                let live = if process.exited { 0 } else { discovery::live_threads(pid).unwrap_or(0) };
                let counts = ThreadCounts::between(process.threads_seen, tally, live);
                process.threads_seen = tally;
                (process.series.clone(), ProcessThreads { pid, process_name: process.process_name.clone(), counts })
            })
            .collect();
        threads.sort_by_key(|(_, threads)| threads.pid);
        threads
    }
}

/// The first `len` entries of a kernel-filled array, never past its end.
fn valid<T>(items: &[T], len: u32) -> &[T] {
    &items[..(len as usize).min(items.len())]
}

fn comm_text(comm: &[u8; 16]) -> Arc<str> {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    Arc::from(String::from_utf8_lossy(&comm[..len]).as_ref())
}
