//! The agent's loop: kernel events in, named stacks aggregated per period,
//! profiles out.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use profiler_common::{
    kind, MemoryEvent, ProcessEvent, Sample, ThreadTally, PY_BAD_CODE, PY_BAD_POINTER, PY_CYCLE, PY_TRUNCATED,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    aggregate::{Aggregator, Frame, PeriodProfile, ProcessThreads, Series, Thread, ThreadCounts, Wait},
    config::Settings,
    aggregate::heap::{self as memory, LiveHeap, Origin},
    control::{self, Request},
    cpython::{self, FrameSymbolizer, Pymalloc},
    export::{
        pprof,
        sinks::{Backend, Datadog, LocalDir, Otlp, Pyroscope, Shipper, Upload},
    },
    kernel::{KernelStats, MemoryWatch, Sampler},
    metrics::{self, Metrics},
    native::{self as unwind, symbolize::NativeSymbolizer},
    process::{
        containers::{self, Container},
        discovery::{self, PythonStatus},
        kubernetes::Pods,
    },
    summary::PeriodSummary,
};

/// The next request on the control socket, if there is one.
async fn recv(control: &mut Option<tokio::sync::mpsc::Receiver<control::Command>>) -> Option<control::Command> {
    match control {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Where each period's profiles go.
struct Sinks {
    local: Option<LocalDir>,
    remote: Vec<Arc<Shipper>>,
}

impl Sinks {
    fn start(settings: &Settings) -> Result<Sinks> {
        let mut backends = Vec::new();
        if let Some(pyroscope) = &settings.pyroscope {
            backends.push(Backend::Pyroscope(Pyroscope::new(
                &pyroscope.url,
                pyroscope.auth.clone(),
                pyroscope.tenant.clone(),
            )?));
        }
        if let Some((endpoint, api_key)) = &settings.datadog {
            backends.push(Backend::Datadog(Datadog::new(endpoint.clone(), api_key.clone())));
        }
        if let Some(url) = &settings.otlp_url {
            backends.push(Backend::Otlp(Otlp::new(url)));
        }
        let remote = backends
            .into_iter()
            .map(|backend| {
                let spool = settings.spool_dir.join(backend.name());
                Shipper::start(backend, &spool, settings.spool_max_bytes, settings.upload_timeout).map(Arc::new)
            })
            .collect::<Result<_>>()?;
        Ok(Sinks {
            local: settings.output_dir.as_deref().map(|dir| LocalDir::new(dir, settings.labels.clone())),
            remote,
        })
    }

    /// `./profiles and pyroscope`.
    fn describe(&self) -> String {
        let local = self.local.iter().map(|local| local.root().display().to_string());
        local.chain(self.remote.iter().map(|shipper| shipper.name().to_owned())).collect::<Vec<_>>().join(" and ")
    }

    /// Writes `profile` and queues it for every backend; whether it was
    /// written or queued everywhere.
    fn send(&self, profile: &PeriodProfile) -> bool {
        let pprof_gz = match pprof::encode_gzipped(profile) {
            Ok(pprof_gz) => pprof_gz,
            Err(error) => {
                log::error!("cannot compress the profile of {}: {error}", profile.application);
                return false;
            }
        };
        let mut sent = true;
        if let Some(local) = &self.local {
            match local.write(profile, &pprof_gz) {
                Ok(written) => log::debug!("wrote {} and {:?}", written.pprof.display(), written.flamegraph),
                Err(error) => {
                    log::error!("cannot write the profile of {}: {error:#}", profile.application);
                    sent = false;
                }
            }
        }
        if !self.remote.is_empty() {
            let upload = Upload::new(profile, pprof_gz);
            for shipper in &self.remote {
                shipper.ship(&upload);
            }
        }
        sent
    }

    /// A line per sink for the summary.
    fn report(&self) -> Vec<String> {
        let local = self.local.iter().map(|local| {
            let root = local.root().display();
            format!("wrote to {root} (look at them: ferroscope view {root})")
        });
        let remote = self.remote.iter().map(|shipper| {
            let stats = &shipper.stats;
            let (waiting, bytes) = shipper.waiting();
            let count = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
            format!(
                "{}: {} delivered, {waiting} waiting ({} KiB spooled), {} retries, {} refused, {} dropped (spool full)",
                shipper.name(),
                count(&stats.delivered),
                bytes / 1024,
                count(&stats.retries),
                count(&stats.refused),
                count(&stats.dropped),
            )
        });
        local.chain(remote).collect()
    }

    /// Gives the backends until `deadline` to take what is queued; the rest
    /// stays spooled for the next start.
    async fn drain(&self, deadline: Instant) {
        for shipper in &self.remote {
            shipper.drain(deadline).await;
            let (waiting, _) = shipper.waiting();
            if waiting > 0 {
                log::warn!("{}: {waiting} uploads left in the spool for the next start", shipper.name());
            }
        }
    }
}

/// Accounts an allocation sample: what it stands for, allocated over the
/// period and, until freed, in use. An arena counts as one allocation of its
/// size; what is in use in it is read from its pools at the period's end.
fn on_allocation(
    aggregator: &mut Aggregator,
    heap: &mut LiveHeap,
    sample: &Sample,
    origin: Origin,
    mean: u64,
    pymalloc: Option<Pymalloc>,
) {
    let weight = memory::weight(sample.bytes, mean);
    let Origin { series, stack, thread } = &origin;
    aggregator.add_alloc(series, stack, thread, weight, sample.bytes as f64 * weight);
    match (sample.kind, sample.address, pymalloc) {
        (_, 0, _) => {}
        (kind::ARENA, address, Some(pymalloc)) => {
            heap.arena(sample.pid, address, origin, sample.bytes, weight, pymalloc)
        }
        (_, address, _) => heap.allocated(sample.pid, address, origin, sample.bytes, weight),
    }
}

/// `series` with the labels of the pod `container` belongs to, if known; the
/// process's own labels win.
fn with_pod_labels(pods: Option<&Pods>, series: Series, container: Option<&Container>) -> Series {
    let Some(mut pod_labels) = pods.zip(container).and_then(|(pods, container)| pods.labels(container)) else {
        return series;
    };
    if pod_labels.keys().all(|key| series.labels.contains_key(key)) {
        return series;
    }
    pod_labels.extend(series.labels.iter().map(|(key, value)| (key.clone(), value.clone())));
    Series { application: series.application, labels: Arc::new(pod_labels) }
}

/// What the agent knows of one process.
struct Process {
    /// The application it is profiled as, with its own labels.
    series: Series,
    /// The application name discovery gave it.
    discovered: Arc<str>,
    /// What it registered as on the control socket, if it did.
    registered: Option<Series>,
    process_name: Arc<str>,
    /// Its pid in its own PID namespace, when that differs.
    container_pid: Option<u32>,
    /// The container it runs in, from its cgroup.
    container: Option<Container>,
    python: Option<FrameSymbolizer>,
    /// Whether and when to look at it again.
    recheck: Recheck,
    /// Executable address ranges, sorted; empty when unknown.
    code: Vec<Range<u64>>,
    /// When `code` was read: it is read again, at most this often, when an
    /// address falls outside it (a library loaded since, or garbage).
    code_read: Instant,
    exited: bool,
    /// The kernel's thread tally at the end of the last period.
    threads_seen: ThreadTally,
    /// It asked, on the control socket, not to be profiled any more.
    stopped: bool,
    /// Its context label sets, by id (see `Sample::label_set`).
    label_sets: HashMap<u64, Arc<BTreeMap<String, String>>>,
    /// With `--memory`, for CPython: the allocation probes and, when its
    /// arenas are probed, the geometry of its pools.
    memory: Option<(MemoryWatch, Option<Pymalloc>)>,
}

/// When to look at a process again.
enum Recheck {
    Never,
    /// No CPython was found in it: again when it maps new code, which may be
    /// a libpython it loads with `dlopen` (uwsgi's Python plugin, say).
    OnNewCode,
    /// CPython still starting up (its version not yet in memory): again at
    /// `next`, until `give_up`.
    At {
        next: Instant,
        give_up: Instant,
    },
}

/// How often, and how long, a starting CPython is looked at again.
const STARTING_RECHECK: Duration = Duration::from_millis(50);
const STARTING_PATIENCE: Duration = Duration::from_secs(5);

/// How often the agent reads samples from the ring buffer.
const READ_INTERVAL: Duration = Duration::from_millis(100);
/// The kernel's counters are copied into the metrics every this many ticks.
const METRICS_TICKS: u64 = 10;

/// How often a process's executable ranges may be read again.
const CODE_RANGES_REFRESH: Duration = Duration::from_secs(1);

impl Process {
    /// The user return addresses that can be trusted: without frame pointers
    /// `bpf_get_stack` reads stack garbage after the first frames, so the
    /// stack ends at the first address outside executable code (or after the
    /// sampled instruction when the mappings are unknown).
    fn user_stack<'s>(&self, addrs: &'s [u64]) -> &'s [u64] {
        let executable = |addr: &u64| {
            let next = self.code.partition_point(|range| range.end <= *addr);
            self.code.get(next).is_some_and(|range| range.contains(addr))
        };
        let len = addrs.iter().skip(1).position(|addr| !executable(addr)).map_or(addrs.len(), |bad| bad + 1);
        &addrs[..len]
    }

    /// Reads the process's executable mappings again if `addrs` leaves them
    /// (at most once per [`CODE_RANGES_REFRESH`]); true when they changed.
    fn refresh_code(&mut self, pid: u32, addrs: &[u64]) -> bool {
        if self.user_stack(addrs).len() == addrs.len() || self.exited || self.code_read.elapsed() <= CODE_RANGES_REFRESH
        {
            return false;
        }
        self.code_read = Instant::now();
        match discovery::code_ranges(pid) {
            Ok(code) if code != self.code => {
                self.code = code;
                true
            }
            _ => false,
        }
    }
}

pub async fn run(mut settings: Settings) -> Result<()> {
    let (mut sampler, events) = Sampler::start(settings.frequency, &settings.pids, settings.wall, settings.memory)?;
    // What the kernel refused is measured no further: the rest goes on.
    settings.wall &= sampler.features.wall.is_on();
    if !sampler.features.memory.is_on() {
        settings.memory = None;
    }
    let sinks = Sinks::start(&settings)?;
    let mut agent = Agent::new(&settings);
    if settings.native_unwind {
        let (rows, unwind_processes) = sampler.unwind_maps()?;
        agent.unwind = Some(unwind::Loader::start(rows, unwind_processes));
    }
    if let Some(kubernetes) = &settings.kubernetes {
        agent.pods = Some(Pods::watch(kubernetes).await?);
    }
    agent.metrics.set_features(&sampler.features);
    if let Some(address) = settings.metrics_address {
        metrics::serve(address, agent.metrics.clone(), sinks.remote.clone()).await?;
    }
    agent.native.load_kernel_symbols();
    // Before the start-up line: whoever reads it to know the agent runs may stop it at once.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    eprintln!(
        "ferroscope: sampling {} at {} Hz on {} CPUs{}; a profile every {} to {}",
        if settings.pids.is_empty() {
            "every process".to_owned()
        } else {
            format!("pid {}", settings.pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
        },
        settings.frequency,
        sampler.cpus,
        match (settings.wall, settings.memory) {
            (true, Some(_)) => ", with wall time and memory",
            (true, None) => ", with wall time",
            (false, Some(_)) => ", with memory",
            (false, None) => "",
        },
        humantime::format_duration(settings.period),
        sinks.describe(),
    );
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
    // Without the control socket (no right to create it), the rest works.
    let mut control = match control::listen(&settings.control_socket) {
        Ok(receiver) => Some(receiver),
        Err(error) => {
            log::warn!("no control socket, so processes cannot register themselves: {error:#}");
            None
        }
    };
    read_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let period_end = deadline.map_or(next_period, |deadline| next_period.min(deadline));
        let stop = tokio::select! {
            ready = events.readable_mut() => {
                let mut guard = ready?;
                agent.drain(guard.get_inner_mut(), &mut sampler);
                guard.clear_ready();
                continue;
            }
            _ = read_tick.tick() => {
                agent.drain(events.get_mut(), &mut sampler);
                agent.label_new_pods();
                for profile in agent.aggregator.finish_own_periods(SystemTime::now()) {
                    sinks.send(&profile);
                }
                ticks += 1;
                if ticks.is_multiple_of(METRICS_TICKS) {
                    agent.metrics.set_kernel(&sampler.stats()?);
                    // With --pid, nothing is left to profile once they are all gone.
                    if !settings.pids.is_empty() && settings.pids.iter().all(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                        log::info!("the processes of --pid have exited: stopping");
                        true
                    } else {
                        continue;
                    }
                } else {
                    continue;
                }
            }
            Some(command) = recv(&mut control) => {
                // Its samples so far belong to what it asks about.
                agent.drain(events.get_mut(), &mut sampler);
                let answer = agent.control(command.pid, command.request, &sinks, &mut sampler);
                let _ = command.reply.send(answer);
                continue;
            }
            _ = tokio::time::sleep_until(period_end.into()) => deadline.is_some_and(|deadline| Instant::now() >= deadline),
            _ = interrupt.recv() => true,
            _ = terminate.recv() => true,
        };
        // Samples already in the ring belong to the period that ends now.
        agent.drain(events.get_mut(), &mut sampler);
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

struct Agent<'a> {
    settings: &'a Settings,
    processes: HashMap<u32, Process>,
    native: NativeSymbolizer,
    aggregator: Aggregator,
    metrics: Arc<Metrics>,
    /// Sampled allocations still in use, with `--memory`.
    heap: LiveHeap,
    summary: PeriodSummary,
    /// Reused for every sample.
    stack: Vec<Frame>,
    /// With `--kubernetes`: this node's pods.
    pods: Option<Pods>,
    /// Loads the unwind tables of the processes' files into the kernel.
    unwind: Option<unwind::Loader>,
    /// The pods' generation the processes' labels were last set from.
    pods_seen: u64,
}

impl<'a> Agent<'a> {
    fn new(settings: &'a Settings) -> Self {
        Agent {
            settings,
            processes: HashMap::new(),
            native: NativeSymbolizer::new(),
            aggregator: Aggregator::new(
                settings.labels.clone(),
                settings.sample_period_ns(),
                settings.wall,
                settings.memory.is_some(),
                SystemTime::now(),
            ),
            heap: LiveHeap::default(),
            metrics: Arc::default(),
            summary: PeriodSummary::default(),
            stack: Vec::with_capacity(256),
            pods: None,
            pods_seen: 0,
            unwind: None,
        }
    }

    /// Labels the processes in pods that have become known since last time.
    fn label_new_pods(&mut self) {
        let Some(pods) = &self.pods else { return };
        let generation = pods.generation();
        if generation == self.pods_seen {
            return;
        }
        self.pods_seen = generation;
        for process in self.processes.values_mut().filter(|process| process.container.is_some()) {
            process.series = with_pod_labels(Some(pods), process.series.clone(), process.container.as_ref());
        }
    }

    fn drain(&mut self, events: &mut RingBuf<MapData>, sampler: &mut Sampler) {
        while let Some(record) = events.next() {
            let Some(kind) = record.get(..4).map(|bytes| u32::from_ne_bytes(bytes.try_into().unwrap())) else {
                continue;
            };
            match kind {
                kind::SAMPLE | kind::OFF_CPU | kind::ALLOC | kind::ARENA if record.len() >= size_of::<Sample>() => {
                    // SAFETY: the kernel wrote a whole `Sample`; any bytes are valid for it.
                    let sample = unsafe { record.as_ptr().cast::<Sample>().read_unaligned() };
                    self.on_sample(&sample, sampler);
                }
                kind::FREE if record.len() >= size_of::<MemoryEvent>() => {
                    // SAFETY: as above, for a `MemoryEvent`.
                    let event = unsafe { record.as_ptr().cast::<MemoryEvent>().read_unaligned() };
                    self.heap.freed(event.pid, event.address);
                }
                kind::NEW_PROCESS | kind::EXIT if record.len() >= size_of::<ProcessEvent>() => {
                    // SAFETY: as above, for a `ProcessEvent`.
                    let event = unsafe { record.as_ptr().cast::<ProcessEvent>().read_unaligned() };
                    if event.kind == kind::NEW_PROCESS {
                        self.inspect(event.pid, &event.comm, sampler);
                        let pid = event.pid;
                        // The agent's own stacks are not what users look for;
                        // CPython processes are loaded once found (`inspect`).
                        if let Some(loader) = self.unwind.as_ref().filter(|_| pid != std::process::id()) {
                            loader.process(pid, self.settings.pids.contains(&pid));
                        }
                    } else {
                        if let Some(process) = self.processes.get_mut(&event.pid) {
                            process.exited = true;
                        }
                        if let Some(loader) = &self.unwind {
                            loader.exited(event.pid);
                        }
                    }
                }
                _ => log::warn!("unexpected record of kind {kind} and {} bytes from the kernel", record.len()),
            }
        }
    }

    /// Looks at a process the kernel saw for the first time (or since its
    /// last exec) and tells the kernel how to walk it if it runs CPython.
    /// `comm` names it if it is already gone.
    fn inspect(&mut self, pid: u32, comm: &[u8; 16], sampler: &mut Sampler) {
        // First, so that its native frames can be named even if it exits
        // while we look at it.
        self.native.remember_process(pid);
        let info = match discovery::inspect(pid) {
            Ok(info) => info,
            Err(_) => {
                // Alive but not readable yet (caught in exec): look again soon.
                let alive = Path::new(&format!("/proc/{pid}")).exists();
                let recheck = match alive.then(|| self.retry(pid)).flatten() {
                    Some(recheck) => recheck,
                    None => {
                        self.summary.vanished_processes += 1;
                        Recheck::Never
                    }
                };
                let name = comm_text(comm);
                let process = Process {
                    series: Series::new(self.settings.application_name.as_deref().unwrap_or(&name)),
                    discovered: name.clone(),
                    registered: None,
                    process_name: name,
                    // What can be read of it: its samples keep their container.
                    container_pid: discovery::own_namespace_pid(pid),
                    container: containers::of_process(pid),
                    python: None,
                    exited: matches!(recheck, Recheck::Never),
                    recheck,
                    code: Vec::new(),
                    code_read: Instant::now(),
                    threads_seen: ThreadTally::default(),
                    stopped: false,
                    label_sets: HashMap::new(),
                    memory: None,
                };
                self.processes.insert(pid, process);
                return;
            }
        };
        // A new program image (exec): what was probed in the old one goes.
        if let Some(old) = self.processes.get_mut(&pid) {
            if let Some((watch, _)) = old.memory.take() {
                sampler.unwatch_memory(watch);
            }
            sampler.forget_live(pid, &self.heap.forget_process(pid));
        }
        let mut recheck = Recheck::Never;
        let mut memory = None;
        let python = match info.python {
            PythonStatus::NotPython => {
                // Without libc yet, its loader may still be mapping a libpython.
                recheck = info.libc.is_none().then(|| self.retry(pid)).flatten().unwrap_or(Recheck::OnNewCode);
                None
            }
            PythonStatus::Starting(reason) => {
                match self.retry(pid) {
                    Some(again) => recheck = again,
                    None => self.skip_unsupported(pid, &reason),
                }
                None
            }
            PythonStatus::Supported(interpreter) => match sampler.add_python(pid, &interpreter.kernel) {
                Ok(()) => {
                    self.summary.python_processes += 1;
                    log::info!("pid {pid}: {}", interpreter.describe());
                    if self.settings.memory.is_some() {
                        let root = format!("/proc/{pid}/root");
                        let object = PathBuf::from(format!("{root}{}", interpreter.path));
                        let libc_path = |libc: &str| PathBuf::from(format!("{root}{libc}"));
                        let mut watched =
                            sampler.watch_memory(pid, &object, info.libc.as_deref().map(libc_path).as_deref());
                        if watched.is_err() && info.libc.is_none() {
                            // Looked at as it started, before the loader mapped libc: a
                            // stripped build needs it, and it comes within milliseconds.
                            if let Some(libc) = discovery::wait_for_libc(pid, Duration::from_millis(100)) {
                                watched = sampler.watch_memory(pid, &object, Some(&libc_path(&libc)));
                            }
                        }
                        match watched {
                            Ok(watch) => {
                                let pymalloc = interpreter.pymalloc().filter(|_| watch.arenas);
                                if pymalloc.is_none() {
                                    log::info!(
                                        "pid {pid}: memory: objects of 512 bytes or less are not profiled (a build \
                                         without symbol table or without pymalloc)"
                                    );
                                }
                                memory = Some((watch, pymalloc));
                            }
                            Err(error) => {
                                self.summary.memory_unwatched += 1;
                                log::warn!("pid {pid}: memory not profiled: {error:#}");
                            }
                        }
                    }
                    Some(FrameSymbolizer::new(pid, &interpreter))
                }
                Err(error) => {
                    log::warn!("pid {pid}: {error:#}");
                    None
                }
            },
            PythonStatus::Unsupported(reason) => {
                self.skip_unsupported(pid, &reason);
                None
            }
        };
        // Looked at again (still starting, or new code): its threads were
        // counted up to the last period end all the same.
        let threads_seen = self.processes.get(&pid).map_or_else(ThreadTally::default, |known| known.threads_seen);
        // A process's own name for itself wins over the agent's.
        let application = info.own.application.as_deref().or(self.settings.application_name.as_deref());
        let discovered = application.map_or(info.application, Arc::from);
        // A registration (control socket) made before this look, as by a
        // forked child before its first sample, holds unless the process now
        // runs another program.
        let registered = self
            .processes
            .get(&pid)
            .and_then(|known| known.registered.clone().filter(|_| known.discovered == discovered));
        let series =
            registered.clone().unwrap_or(Series { application: discovered.clone(), labels: Arc::new(info.own.labels) });
        let series = with_pod_labels(self.pods.as_ref(), series, info.container.as_ref());
        let stopped = self.processes.get(&pid).is_some_and(|known| known.stopped && known.discovered == discovered);
        let process = Process {
            series,
            discovered,
            registered,
            process_name: info.process_name,
            container_pid: info.namespace_pid,
            container: info.container,
            python,
            recheck,
            code: info.code,
            code_read: Instant::now(),
            exited: false,
            threads_seen,
            stopped,
            label_sets: self.processes.get(&pid).map(|known| known.label_sets.clone()).unwrap_or_default(),
            memory,
        };
        if let Some(loader) = self.unwind.as_ref().filter(|_| process.python.is_some()) {
            loader.process(pid, true);
        }
        self.processes.insert(pid, process);
        self.metrics.set_python_processes(self.processes.values().filter(|process| process.python.is_some()).count());
    }

    /// When to look again at a process caught starting, unless it has been
    /// starting for [`STARTING_PATIENCE`] already.
    fn retry(&self, pid: u32) -> Option<Recheck> {
        let now = Instant::now();
        let give_up = match self.processes.get(&pid).map(|process| &process.recheck) {
            Some(Recheck::At { give_up, .. }) => *give_up,
            _ => now + STARTING_PATIENCE,
        };
        (now < give_up).then_some(Recheck::At { next: now + STARTING_RECHECK, give_up })
    }

    /// Reports, once per process, a CPython that cannot be profiled.
    fn skip_unsupported(&mut self, pid: u32, reason: &str) {
        self.summary.unsupported_processes += 1;
        log::warn!("pid {pid}: {reason}: skipped (native stacks are still profiled)");
    }

    fn on_sample(&mut self, sample: &Sample, sampler: &mut Sampler) {
        let pid = sample.pid;
        if !self.processes.contains_key(&pid) {
            // Its NEW_PROCESS event was lost: the thread's name will do.
            self.inspect(pid, &sample.comm, sampler);
        }
        let user = valid(&sample.user_stack, sample.user_len);
        let Some(process) = self.processes.get_mut(&pid) else { return };
        let recheck = match process.recheck {
            Recheck::Never => false,
            Recheck::OnNewCode => process.refresh_code(pid, user),
            Recheck::At { next, .. } => Instant::now() >= next,
        };
        if recheck {
            self.inspect(pid, &sample.comm, sampler);
        }
        let Some(process) = self.processes.get_mut(&pid).filter(|process| !process.stopped) else { return };
        let stack = &mut self.stack;
        stack.clear();
        self.native.kernel(valid(&sample.kernel_stack, sample.kernel_len), stack);
        let user_from = stack.len();
        // Unwound with tables, every frame is real: libraries loaded since
        // the process was looked at included.
        let user = if sample.user_unwound != 0 { user } else { process.user_stack(user) };
        self.native.user(pid, user, stack);
        if let Some(python) = process.python.as_mut() {
            let summary = &mut self.summary;
            let frames = valid(&sample.py_frames, sample.py_len).iter().map(|frame| {
                let named = python.symbolize(frame).unwrap_or_else(|| {
                    summary.unnamed_python_frames += 1;
                    Frame::marker("[unknown python frame]")
                });
                (named, cpython::is_entry(frame.code, python.inline_calls))
            });
            cpython::merge(stack, user_from, frames);
            match sample.py_status {
                PY_TRUNCATED => stack.push(Frame::marker("[truncated]")),
                PY_BAD_POINTER | PY_BAD_CODE | PY_CYCLE => {
                    self.summary.broken_python_stacks += 1;
                    stack.push(Frame::marker("[broken python stack]"))
                }
                _ => {}
            }
        }
        let wait = (sample.kind == kind::OFF_CPU).then(|| Wait::from_kernel(sample.wait));
        if wait == Some(Wait::Preempted) {
            // Sampled as it got the CPU back: its stacks are not known.
            stack.push(Frame::marker("[preempted]"));
        }
        let series = &process.series;
        let thread = Thread {
            pid,
            container_pid: process.container_pid,
            container_id: process.container.as_ref().and_then(|container| container.id.clone()),
            tid: sample.tid,
            thread_name: comm_text(&sample.comm),
            process_name: process.process_name.clone(),
            context: process.label_sets.get(&sample.label_set).cloned(),
        };
        match (sample.kind, wait) {
            (_, Some(wait)) => self.aggregator.add_off_cpu(series, stack, &thread, wait, sample.off_cpu_ns),
            (kind::ALLOC | kind::ARENA, _) => {
                let Some(mean) = self.settings.memory else { return };
                let origin = Origin { series: series.clone(), stack: stack.as_slice().into(), thread };
                let pymalloc = process.memory.as_ref().and_then(|(_, pymalloc)| *pymalloc);
                on_allocation(&mut self.aggregator, &mut self.heap, sample, origin, mean, pymalloc);
            }
            _ => {
                self.summary.samples += 1;
                self.aggregator.add(series, stack, &thread);
            }
        }
    }

    /// A process's request on the control socket.
    fn control(&mut self, pid: u32, request: Request, sinks: &Sinks, sampler: &mut Sampler) -> Result<(), String> {
        if !self.processes.contains_key(&pid) {
            self.inspect(pid, &[0; 16], sampler);
        }
        let process = self.processes.get_mut(&pid).ok_or("the agent cannot see this process")?;
        match request {
            Request::Start { application_name, labels, period, upload_timeout } => {
                let seconds = |value: Option<f64>, what: &str| -> Result<Option<Duration>, String> {
                    value
                        .map(|seconds| {
                            Duration::try_from_secs_f64(seconds)
                                .ok()
                                .filter(|duration| *duration >= Duration::from_secs(1))
                                .ok_or_else(|| format!("{what} must be at least 1 second"))
                        })
                        .transpose()
                };
                let (period, upload_timeout) = (seconds(period, "period")?, seconds(upload_timeout, "upload_timeout")?);
                for (key, value) in &labels {
                    crate::config::validate_label(key, value)?;
                }
                let application = match application_name {
                    Some(name) if name.trim().is_empty() => return Err("the application name is empty".into()),
                    Some(name) => Arc::from(name),
                    None => process.series.application.clone(),
                };
                process.registered = Some(Series { application, labels: Arc::new(labels) });
                process.series = with_pod_labels(
                    self.pods.as_ref(),
                    process.registered.clone().unwrap(),
                    process.container.as_ref(),
                );
                if let Some(period) = period {
                    self.aggregator.set_own_period(&process.series, period, upload_timeout, SystemTime::now());
                }
                process.stopped = false;
                log::info!("pid {pid}: registered as {}", process.series.application);
            }
            Request::Thread { tid, address } => {
                // Only a thread of its own.
                if !Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
                    return Err(format!("thread {tid} is not one of process {pid}"));
                }
                sampler.set_label_slot(tid, address).map_err(|error| format!("{error:#}"))?;
            }
            Request::LabelSet { id, labels } => {
                if id == 0 {
                    return Err("label set 0 means none".into());
                }
                for (key, value) in &labels {
                    crate::config::validate_label(key, value)?;
                }
                process.label_sets.insert(id, Arc::new(labels));
            }
            Request::Stop => {
                process.stopped = true;
                let series = process.series.clone();
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
            self.aggregator.add_inuse(series, stack, thread, in_use.objects, in_use.bytes);
        }
        let end = SystemTime::now();
        let mut profiles = if last { self.aggregator.finish_all(end) } else { self.aggregator.finish_period(end) };
        let mut summary = std::mem::take(&mut self.summary);
        summary.samples_dropped = stats.samples_dropped - before.samples_dropped;
        summary.events_dropped = stats.events_dropped - before.events_dropped;
        summary.off_cpu_samples = stats.off_cpu_samples - before.off_cpu_samples;
        summary.alloc_samples = stats.alloc_samples - before.alloc_samples;
        summary.live_overflow = stats.live_overflow - before.live_overflow;
        summary.unwound_stacks = stats.unwound_stacks - before.unwound_stacks;
        summary.unwind_cut = stats.unwind_cut - before.unwind_cut;
        if let Some(loader) = &self.unwind {
            use std::sync::atomic::Ordering::Relaxed;
            let stats = &loader.stats;
            summary.unwind_tables =
                (stats.tables.load(Relaxed), stats.rows.load(Relaxed), stats.peak_rows.load(Relaxed));
            summary.unwind_refused = stats.tables_refused.load(Relaxed);
        }
        summary.live_followed = self.heap.len();
        summary.refusals = sampler.features.refusals();
        let mut threads: Vec<_> = self
            .processes
            .iter_mut()
            .filter(|(pid, process)| process.python.is_some() || self.settings.pids.contains(pid))
            .map(|(&pid, process)| {
                let tally = sampler.thread_tally(pid);
                let live = if process.exited { 0 } else { discovery::live_threads(pid).unwrap_or(0) };
                let counts = ThreadCounts::between(process.threads_seen, tally, live);
                process.threads_seen = tally;
                (process.series.clone(), ProcessThreads { pid, process_name: process.process_name.clone(), counts })
            })
            .collect();
        threads.sort_by_key(|(_, threads)| threads.pid);
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
        let exited: Vec<u32> = self.processes.iter().filter(|(_, p)| p.exited).map(|(&pid, _)| pid).collect();
        for pid in exited {
            if let Some((watch, _)) = self.processes.remove(&pid).and_then(|process| process.memory) {
                sampler.unwatch_memory(watch);
            }
            // Its allocations were freed with it.
            sampler.forget_live(pid, &self.heap.forget_process(pid));
            sampler.forget_threads(pid);
            self.native.forget_process(pid);
        }
        for python in self.processes.values_mut().filter_map(|process| process.python.as_mut()) {
            python.forget_code();
        }
        self.metrics.set_python_processes(self.processes.values().filter(|process| process.python.is_some()).count());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn process(code: Vec<Range<u64>>) -> Process {
        Process {
            series: Series::new("app"),
            discovered: "app".into(),
            registered: None,
            process_name: "app".into(),
            container_pid: None,
            container: None,
            python: None,
            recheck: Recheck::OnNewCode,
            code,
            code_read: Instant::now(),
            exited: false,
            threads_seen: ThreadTally::default(),
            stopped: false,
            label_sets: HashMap::new(),
            memory: None,
        }
    }

    #[test]
    fn user_stacks_end_at_the_first_address_outside_code() {
        let known = process(vec![0x1000..0x2000, 0x5000..0x6000]);
        assert_eq!(known.user_stack(&[0x1500, 0x5fff, 0x9000, 0x1100]), [0x1500, 0x5fff]);
        assert_eq!(known.user_stack(&[0x1500, 0x1600]), [0x1500, 0x1600]);
        // The sampled instruction itself is always kept.
        assert_eq!(known.user_stack(&[0x9000, 0x9500, 0x1500]), [0x9000]);
        assert_eq!(known.user_stack(&[]), [] as [u64; 0]);
        let unknown = process(Vec::new());
        assert_eq!(unknown.user_stack(&[0x1500, 0x1600]), [0x1500]);
    }
}
