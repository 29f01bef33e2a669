//! Loading the embedded eBPF programs into the kernel, attaching them, and
//! the maps through which the agent talks to them.

use std::{num::NonZeroU32, path::PathBuf};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        BtfTracePoint, PerfEvent, Program, ProgramError, UProbe,
    },
    Btf, Ebpf, EbpfLoader,
};
use profiler_common::{config, stat, LiveKey, ProcessUnwind, PyProcess, ThreadTally, UnwindChunk};

use super::features::{Features, State};

static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("FERROSCOPE_EBPF_OBJECT"));

/// `UNWIND_ROWS` and `UNWIND_PROCS`, which the unwind table loader fills.
pub type UnwindMaps = (Array<MapData, UnwindChunk>, HashMap<MapData, u32, ProcessUnwind>);

/// The loaded and attached programs with the maps the agent uses.
pub struct Sampler {
    /// Keeps programs and links alive; dropping it detaches everything.
    ebpf: Ebpf,
    /// Sampled allocations not yet freed, with `--memory`.
    live: Option<HashMap<MapData, LiveKey, u8>>,
    py_procs: HashMap<MapData, u32, PyProcess>,
    thread_tally: PerCpuHashMap<MapData, u32, ThreadTally>,
    label_slots: HashMap<MapData, u32, u64>,
    stats: PerCpuArray<MapData, u64>,
    pub cpus: usize,
    /// Which dimensions this kernel runs.
    pub features: Features,
}

/// Counters kept by the kernel side, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub samples: u64,
    pub samples_dropped: u64,
    pub events_dropped: u64,
    pub thread_scans: u64,
    pub off_cpu_samples: u64,
    pub alloc_samples: u64,
    pub live_overflow: u64,
    pub unwound_stacks: u64,
    pub unwind_cut: u64,
}

/// The allocation probes attached to one process.
pub struct MemoryWatch {
    probes: Vec<(&'static str, UProbeLinkId)>,
    /// Whether pymalloc's arenas are probed (not with libc's functions).
    pub arenas: bool,
}

/// The programs of `--memory`, which [`Sampler::watch_memory`] attaches
/// where `cpython::memory_sites` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryProgram {
    RawMalloc,
    RawCalloc,
    RawRealloc,
    RawFree,
    /// The return of any of the raw allocators.
    RawReturn,
    /// The return of pymalloc's arena allocator.
    ArenaReturn,
}

impl MemoryProgram {
    const ALL: [MemoryProgram; 6] = {
        use MemoryProgram::*;
        [RawMalloc, RawCalloc, RawRealloc, RawFree, RawReturn, ArenaReturn]
    };

    /// Its name in the eBPF object.
    fn name(self) -> &'static str {
        match self {
            MemoryProgram::RawMalloc => "raw_malloc",
            MemoryProgram::RawCalloc => "raw_calloc",
            MemoryProgram::RawRealloc => "raw_realloc",
            MemoryProgram::RawFree => "raw_free_entry",
            MemoryProgram::RawReturn => "raw_alloc_return",
            MemoryProgram::ArenaReturn => "arena_return",
        }
    }
}

/// Where to attach one allocation probe: a file offset of a file as the
/// agent sees it, and whether the probed function takes CPython's `ctx`
/// first (probed at its entry rather than at its tail call into libc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    pub program: MemoryProgram,
    pub file: PathBuf,
    pub offset: u64,
    pub skip_ctx: bool,
}

impl Sampler {
    /// Loads the programs, samples every CPU at `frequency` Hz (only `pids`
    /// when not empty), follows process exec and exit and, with `wall`, the
    /// off-CPU time of profiled threads and, with `memory` (the mean bytes
    /// between two samples), gets the allocation probes ready for
    /// [`Sampler::watch_memory`]. Returns the ring buffer of samples and
    /// process events with the sampler.
    pub fn start(frequency: u64, pids: &[u32], wall: bool, memory: Option<u64>) -> Result<(Self, RingBuf<MapData>)> {
        Self::start_with(frequency, pids, wall, memory, &WALL_TRACEPOINTS)
    }

    /// [`Sampler::start`] with wall time measured by `wall_tracepoints`
    /// (program, tracepoint), so that a test can hand it one the kernel refuses.
    fn start_with(
        frequency: u64,
        pids: &[u32],
        wall: bool,
        memory: Option<u64>,
        wall_tracepoints: &[(&'static str, &'static str)],
    ) -> Result<(Self, RingBuf<MapData>)> {
        check_privileges()?;
        for &pid in pids {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("`--pid {pid}`: no such process");
            }
        }
        let filter_pids = u8::from(!pids.is_empty());
        let sample_period_ns = 1_000_000_000 / frequency;
        let (mut ebpf, btf) = load_object(filter_pids, sample_period_ns)?;

        let mut targets: HashMap<_, u32, u8> = HashMap::try_from(ebpf.map_mut("TARGETS").context("map TARGETS")?)?;
        for &pid in pids {
            targets.insert(pid, 1, 0).with_context(|| format!("cannot add pid {pid} to the targets"))?;
        }

        // Without them no process would be followed: they are not optional.
        for &(name, tracepoint) in &LIFECYCLE_TRACEPOINTS {
            load_program(&mut ebpf, name, Some((tracepoint, &btf))).map_err(|why| anyhow::anyhow!("{why}"))?;
            let program: &mut BtfTracePoint = ebpf.program_mut(name).context(name)?.try_into()?;
            program.attach().with_context(|| format!("cannot attach to the {tracepoint} tracepoint"))?;
        }
        let wall = if wall { start_wall(&mut ebpf, &btf, wall_tracepoints) } else { State::NotAsked };
        drop(btf);
        // Give the parsed BTF's memory back to the system; the agent runs for
        // days. (glibc's; musl's allocator has no such call.)
        // SAFETY: plain libc call.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0)
        };

        let cpus = aya::util::online_cpus().map_err(|(what, error)| anyhow::anyhow!("{what}: {error}"))?;
        let cpu = start_sampler(&mut ebpf, &cpus, sample_period_ns);
        let memory = match memory {
            Some(mean) => load_memory(&mut ebpf, mean),
            None => State::NotAsked,
        };
        let features = Features { cpu, wall, memory };
        if !features.cpu.is_on() {
            // Processes are found through their CPU samples: without the
            // sampler nothing else can work.
            bail!("this kernel cannot run Ferroscope's CPU sampler, which every other dimension needs: {features}");
        }

        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS")?)?;
        let live = match features.memory {
            State::On => Some(HashMap::try_from(ebpf.take_map("LIVE").context("map LIVE")?)?),
            _ => None,
        };
        let sampler = Sampler {
            live,
            py_procs: HashMap::try_from(ebpf.take_map("PY_PROCS").context("map PY_PROCS")?)?,
            label_slots: HashMap::try_from(ebpf.take_map("LABEL_SLOTS").context("map LABEL_SLOTS")?)?,
            thread_tally: PerCpuHashMap::try_from(ebpf.take_map("THREAD_TALLY").context("map THREAD_TALLY")?)?,
            stats: PerCpuArray::try_from(ebpf.take_map("STATS").context("map STATS")?)?,
            ebpf,
            cpus: cpus.len(),
            features,
        };
        Ok((sampler, events))
    }

    /// The maps of native unwinding, for the thread that fills them.
    pub fn unwind_maps(&mut self) -> Result<UnwindMaps> {
        Ok((
            Array::try_from(self.ebpf.take_map("UNWIND_ROWS").context("map UNWIND_ROWS")?)?,
            HashMap::try_from(self.ebpf.take_map("UNWIND_PROCS").context("map UNWIND_PROCS")?)?,
        ))
    }

    /// Lets the kernel walk the Python stacks of `pid`.
    pub fn add_python(&mut self, pid: u32, process: &PyProcess) -> Result<()> {
        self.py_procs.insert(pid, process, 0).with_context(|| format!("cannot register CPython process {pid}"))
    }

    /// The threads `pid` started and ended since its exec or since the
    /// agent started; none if it started none.
    pub fn thread_tally(&self, pid: u32) -> ThreadTally {
        let per_cpu = self.thread_tally.get(&pid, 0);
        per_cpu.iter().flat_map(|values| values.iter()).fold(ThreadTally::default(), |sum, cpu| ThreadTally {
            started: sum.started + cpu.started,
            ended: sum.ended + cpu.ended,
        })
    }

    /// Attaches the allocation probes of `sites` to process `pid`. Fails,
    /// attaching nothing, when one cannot be attached.
    pub fn watch_memory(&mut self, pid: u32, sites: &[ProbeSite]) -> Result<MemoryWatch> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).context("pid 0")?);
        let mut watch = MemoryWatch { probes: Vec::new(), arenas: false };
        for &ProbeSite { program, ref file, offset, skip_ctx } in sites {
            let program = program.name();
            let attached = self.ebpf.program_mut(program).context(program).and_then(|uprobe| {
                let uprobe: &mut UProbe = uprobe.try_into()?;
                let location = UProbeAttachLocation::AbsoluteOffset(offset);
                let point = UProbeAttachPoint { location, cookie: Some(u64::from(skip_ctx)) };
                Ok(uprobe.attach(point, file, scope)?)
            });
            match attached {
                Ok(link) => {
                    watch.arenas |= program == MemoryProgram::ArenaReturn.name();
                    watch.probes.push((program, link));
                }
                Err(error) => {
                    self.unwatch_memory(watch);
                    return Err(error).with_context(|| format!("cannot probe {} at {offset:#x}", file.display()));
                }
            }
        }
        Ok(watch)
    }

    /// Detaches the allocation probes of a process.
    pub fn unwatch_memory(&mut self, watch: MemoryWatch) {
        for (program, link) in watch.probes {
            let program: Option<&mut UProbe> = self.ebpf.program_mut(program).and_then(|p| p.try_into().ok());
            if let Some(program) = program {
                // Fails only for a link already gone with its process.
                let _ = program.detach(link);
            }
        }
    }

    /// Drops the kernel's entries of sampled allocations of a process that
    /// exited.
    pub fn forget_live(&mut self, pid: u32, addresses: &[u64]) {
        if let Some(live) = self.live.as_mut() {
            for &address in addresses {
                let _ = live.remove(&LiveKey { pid, _pad: 0, address });
            }
        }
    }

    /// Tells the kernel where thread `tid` keeps its context label set.
    pub fn set_label_slot(&mut self, tid: u32, address: u64) -> Result<()> {
        self.label_slots.insert(tid, address, 0).context("the table of label slots is full")
    }

    /// Drops the thread tally of a process that exited, once read.
    pub fn forget_threads(&mut self, pid: u32) {
        // Absent when it started no thread.
        let _ = self.thread_tally.remove(&pid);
    }

    pub fn stats(&self) -> Result<KernelStats> {
        let sum = |index: u32| -> Result<u64> { Ok(self.stats.get(&index, 0)?.iter().sum()) };
        Ok(KernelStats {
            samples: sum(stat::SAMPLES)?,
            samples_dropped: sum(stat::SAMPLES_DROPPED)?,
            events_dropped: sum(stat::EVENTS_DROPPED)?,
            thread_scans: sum(stat::THREAD_SCANS)?,
            off_cpu_samples: sum(stat::OFF_CPU_SAMPLES)?,
            alloc_samples: sum(stat::ALLOC_SAMPLES)?,
            live_overflow: sum(stat::LIVE_OVERFLOW)?,
            unwound_stacks: sum(stat::UNWOUND_STACKS)?,
            unwind_cut: sum(stat::UNWIND_CUT)?,
        })
    }
}

/// Programs that follow processes' lives: (program, tracepoint).
const LIFECYCLE_TRACEPOINTS: [(&str, &str); 3] = [
    ("process_exec", "sched_process_exec"),
    ("process_exit", "sched_process_exit"),
    ("process_fork", "sched_process_fork"),
];
/// Programs of wall and off-CPU time: (program, tracepoint).
const WALL_TRACEPOINTS: [(&str, &str); 2] = [("sched_switch", "sched_switch"), ("sys_exit", "sys_exit")];
const SAMPLER_PROGRAM: &str = "sample_cpu";

/// The combined stack every program keeps under, of the verifier's 512
/// bytes: kernels count it differently (see `headroom`), and a program at
/// the limit on one kernel is refused by the next.
pub const STACK_BUDGET: u32 = 448;

/// The embedded eBPF object (empty when the agent was built without it).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Parses the object, creates its maps and sets the globals the programs
/// read; no program is loaded yet. Returns the kernel's BTF with it.
fn load_object(filter_pids: u8, sample_period_ns: u64) -> Result<(Ebpf, Btf)> {
    if OBJECT.is_empty() {
        bail!("this ferroscope was built without its eBPF programs: build it with `cargo xtask build`");
    }
    // The kernel's BTF is parsed twice (for offsets, then by aya): one
    // after the other, so that the agent's peak memory holds only one.
    let task = TaskOffsets::from_kernel_btf()?;
    let btf = Btf::from_sys_fs().context("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global(config::FILTER_PIDS, &filter_pids, true)
        .override_global(config::TASK_FSBASE_OFFSET, &task.fsbase, true)
        .override_global(config::TASK_GROUP_LEADER_OFFSET, &task.group_leader, true)
        .override_global(config::TASK_COMM_OFFSET, &task.comm, true)
        .override_global(config::TASK_PID_OFFSET, &task.pid, true)
        .override_global(config::TASK_TGID_OFFSET, &task.tgid, true)
        .override_global(config::TASK_STATE_OFFSET, &task.state, true)
        .override_global(config::SAMPLE_PERIOD_NS, &sample_period_ns, true)
        .load(OBJECT)
        .map_err(explain_load_error)?;
    Ok((ebpf, btf))
}

/// Loads program `name` into the kernel (a BTF tracepoint's at
/// `tracepoint`); `Err` says in plain words why the kernel refused it.
fn load_program(ebpf: &mut Ebpf, name: &str, tracepoint: Option<(&str, &Btf)>) -> Result<(), String> {
    let program = ebpf.program_mut(name).ok_or_else(|| format!("the eBPF object has no {name} program"))?;
    let loaded = match (program, tracepoint) {
        (Program::BtfTracePoint(program), Some((tracepoint, btf))) => program.load(tracepoint, btf),
        (Program::PerfEvent(program), None) => program.load(),
        (Program::UProbe(program), None) => program.load(),
        _ => return Err(format!("{name} is not a program of the expected type")),
    };
    loaded.map_err(|error| refusal(name, &error))
}

/// Set, a refused program's whole verifier log goes to stderr.
const VERIFIER_LOG_VAR: &str = "FERROSCOPE_VERIFIER_LOG";

/// Why the kernel refused `program`, e.g. `this kernel's verifier refused
/// raw_alloc_return (combined stack size of 4 calls is 528. Too large)`.
fn refusal(program: &str, error: &ProgramError) -> String {
    match error {
        ProgramError::LoadError { io_error, verifier_log } => {
            if std::env::var_os(VERIFIER_LOG_VAR).is_some() {
                eprintln!("{program}: the verifier's log:\n{verifier_log}");
            }
            match crate::kernel::features::verifier_complaint(&verifier_log.to_string()) {
                Some(complaint) => format!("this kernel's verifier refused {program} ({complaint})"),
                None => format!("this kernel refused {program} ({io_error})"),
            }
        }
        error => format!("cannot load {program}: {error}"),
    }
}

/// Unloads (and so detaches) programs `names`, after one of a dimension's
/// was refused: a dimension runs whole or not at all.
fn unload(ebpf: &mut Ebpf, names: &[&str]) {
    for &name in names {
        // Fails only for a program never loaded.
        let _ = match ebpf.program_mut(name) {
            Some(Program::BtfTracePoint(program)) => program.unload(),
            Some(Program::PerfEvent(program)) => program.unload(),
            Some(Program::UProbe(program)) => program.unload(),
            _ => Ok(()),
        };
    }
}

/// Loads and attaches the wall-time programs `tracepoints`.
fn start_wall(ebpf: &mut Ebpf, btf: &Btf, tracepoints: &[(&'static str, &'static str)]) -> State {
    let names: Vec<&str> = tracepoints.iter().map(|(name, _)| *name).collect();
    let started = tracepoints.iter().try_for_each(|&(name, tracepoint)| {
        load_program(ebpf, name, Some((tracepoint, btf)))?;
        let program: &mut BtfTracePoint =
            ebpf.program_mut(name).and_then(|program| program.try_into().ok()).ok_or("no such program")?;
        program.attach().map(drop).map_err(|error| format!("cannot attach to the {tracepoint} tracepoint: {error}"))
    });
    match started {
        Ok(()) => State::On,
        Err(why) => {
            unload(ebpf, &names);
            State::Refused(why)
        }
    }
}

/// Loads the CPU sampler and opens its cpu-clock event on every CPU.
fn start_sampler(ebpf: &mut Ebpf, cpus: &[u32], sample_period_ns: u64) -> State {
    let started = load_program(ebpf, SAMPLER_PROGRAM, None).and_then(|()| {
        let program: &mut PerfEvent =
            ebpf.program_mut(SAMPLER_PROGRAM).and_then(|program| program.try_into().ok()).ok_or("no such program")?;
        cpus.iter().try_for_each(|&cpu| {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    // A fixed period of CPU time makes every sample worth the same.
                    SamplePolicy::Period(sample_period_ns),
                    false,
                )
                .map(drop)
                .map_err(|error| format!("cannot open the cpu-clock perf event on CPU {cpu}: {error}"))
        })
    });
    match started {
        Ok(()) => State::On,
        Err(why) => {
            unload(ebpf, &[SAMPLER_PROGRAM]);
            State::Refused(why)
        }
    }
}

/// The distinct programs of `--memory`.
fn memory_programs() -> Vec<&'static str> {
    MemoryProgram::ALL.iter().map(|program| program.name()).collect()
}

/// Fills the byte budgets with `mean` bytes between samples and loads the
/// allocation probes, which [`Sampler::watch_memory`] attaches per process.
fn load_memory(ebpf: &mut Ebpf, mean: u64) -> State {
    let names = memory_programs();
    let loaded = (|| {
        let map = ebpf.map_mut("BUDGETS").ok_or("the eBPF object has no BUDGETS map")?;
        let mut budgets: Array<_, u64> = Array::try_from(map).map_err(|error| error.to_string())?;
        for (index, budget) in crate::aggregate::heap::budgets(mean).into_iter().enumerate() {
            budgets.set(index as u32, budget, 0).map_err(|error| format!("cannot fill BUDGETS: {error}"))?;
        }
        names.iter().try_for_each(|name| load_program(ebpf, name, None))
    })();
    match loaded {
        Ok(()) => State::On,
        Err(why) => {
            unload(ebpf, &names);
            State::Refused(why)
        }
    }
}

/// One program of the object as this kernel's verifier saw it.
pub struct ProgramCheck {
    pub program: &'static str,
    /// The dimension it serves (`process` for the programs every one needs).
    pub feature: &'static str,
    /// Instructions the verifier processed (kernels before 5.16 do not
    /// say), or why it refused the program.
    pub verified: Result<Option<u32>, String>,
    /// Combined stack of its deepest call chain, from the object.
    pub stack: u32,
}

/// Loads every program (attaching none) and reports how each fared.
pub fn check_programs() -> Result<Vec<ProgramCheck>> {
    check_privileges()?;
    let (mut ebpf, btf) = load_object(0, 10_000_000)?;
    let stacks: std::collections::HashMap<String, u32> =
        crate::kernel::headroom::program_stacks(object())?.into_iter().collect();
    let mut programs: Vec<(&'static str, &'static str, Option<&'static str>)> = Vec::new();
    programs.extend(LIFECYCLE_TRACEPOINTS.iter().map(|&(name, tracepoint)| ("process", name, Some(tracepoint))));
    programs.push(("cpu", SAMPLER_PROGRAM, None));
    programs.extend(WALL_TRACEPOINTS.iter().map(|&(name, tracepoint)| ("wall", name, Some(tracepoint))));
    programs.extend(memory_programs().into_iter().map(|name| ("memory", name, None)));
    Ok(programs
        .into_iter()
        .map(|(feature, program, tracepoint)| {
            let verified =
                load_program(&mut ebpf, program, tracepoint.map(|tracepoint| (tracepoint, &btf))).map(|()| {
                    let info = ebpf.program(program).and_then(|program| program.info().ok());
                    info.and_then(|info| info.verified_instruction_count())
                });
            ProgramCheck { program, feature, verified, stack: stacks.get(program).copied().unwrap_or(0) }
        })
        .collect())
}

/// Where the fields the programs read live in this kernel's `task_struct`,
/// from its BTF (aya-ebpf has no CO-RE relocations).
struct TaskOffsets {
    /// `thread.fsbase`: compared with `PyThreadState.thread_id`.
    fsbase: u64,
    group_leader: u64,
    comm: u64,
    /// The thread id.
    pid: u64,
    /// The process id.
    tgid: u64,
    /// What the task is doing (`TASK_RUNNING`, sleeping, dead).
    state: u64,
}

impl TaskOffsets {
    fn from_kernel_btf() -> Result<Self> {
        use btf_rs::{Btf, Type};
        let btf = Btf::from_file("/sys/kernel/btf/vmlinux").context("cannot read /sys/kernel/btf/vmlinux")?;
        let offset = |struct_name: &str, member_name: &str| -> Result<u64> {
            for candidate in btf.resolve_types_by_name(struct_name)? {
                let Type::Struct(s) = candidate else { continue };
                for member in &s.members {
                    if btf.resolve_name(member).ok().as_deref() == Some(member_name) {
                        return Ok(u64::from(member.bit_offset() / 8));
                    }
                }
            }
            bail!("the kernel's BTF has no {struct_name}.{member_name}")
        };
        Ok(TaskOffsets {
            fsbase: offset("task_struct", "thread")? + offset("thread_struct", "fsbase")?,
            group_leader: offset("task_struct", "group_leader")?,
            comm: offset("task_struct", "comm")?,
            pid: offset("task_struct", "pid")?,
            tgid: offset("task_struct", "tgid")?,
            // Renamed in 5.14.
            state: offset("task_struct", "__state").or_else(|_| offset("task_struct", "state"))?,
        })
    }
}

/// Fails with a message naming what is missing rather than an errno later.
fn check_privileges() -> Result<()> {
    let missing = crate::kernel::capabilities::missing();
    if !missing.is_empty() {
        bail!(
            "ferroscope needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE \
             (missing: {}); run it with sudo, or grant them: \
             sudo setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep $(command -v ferroscope)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn explain_load_error(error: aya::EbpfError) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        anyhow::anyhow!(
            "the kernel refused to load the eBPF programs ({text}): ferroscope needs root or \
             CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE, and a kernel with BPF enabled"
        )
    } else {
        anyhow::Error::new(error).context("cannot load the eBPF programs")
    }
}

// Left out by build.rs where they cannot load programs (see tests/ebpf_tests_left_out.rs).
#[cfg(all(test, not(ferroscope_root_tests_left_out)))]
mod tests {
    use std::time::{Duration, Instant};

    use profiler_common::{
        wait, OffCpuSample, PyFrame, PyOffsets, MAX_PY_FRAMES, NO_OFFSET, PY_BAD_CODE, PY_BAD_POINTER, PY_CYCLE,
        PY_ENTRY_FRAME, PY_NOT_PYTHON, PY_OK, PY_TRUNCATED,
    };

    use super::*;
    use crate::kernel::events::{self, Event};

    /// Loads the real programs into the real kernel (needs root) and checks
    /// that a busy thread of this process is sampled with its stacks.
    #[test]
    fn samples_a_busy_thread_of_this_process() {
        let me = std::process::id();
        let (sampler, mut events) = Sampler::start(1000, &[me], false, None).expect("load and attach (run as root)");
        let until = Instant::now() + Duration::from_millis(300);
        let mut spin = 0u64;
        while Instant::now() < until {
            spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(7));
        }
        let mut ours = 0;
        while let Some(record) = events.next() {
            if let Ok(Event::Cpu(sample)) = events::decode(&record) {
                assert_eq!(sample.pid, me, "--pid filtering lets only this process through");
                assert!(sample.user_len > 0, "a user stack is recorded");
                ours += 1;
            }
        }
        let stats = sampler.stats().unwrap();
        assert!(ours >= 100, "300 ms of CPU at 1000 Hz gives ~300 samples, got {ours}");
        assert_eq!(stats.samples_dropped, 0);
        assert!(stats.samples >= ours);
    }

    /// With wall time, a thread of this process that sleeps yields an off-CPU
    /// sample of the time it slept, with its user stack and reason.
    #[test]
    fn a_sleeping_thread_yields_an_off_cpu_sample_of_its_sleep() {
        let me = std::process::id();
        let (sampler, mut events) = Sampler::start(100, &[me], true, None).expect("load and attach (run as root)");
        // SAFETY: no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let slept = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        let slept = slept.elapsed().as_nanos() as u64;
        let sleeps = sleeps_of(&mut events, tid);
        assert!(sleeps.iter().all(|sample| sample.user_len > 0), "the user stack of the wait is recorded");
        let sleeps: Vec<u64> = sleeps.iter().map(|sample| sample.off_cpu_ns).collect();
        assert_eq!(sleeps.len(), 1, "one sleep, one sample: {sleeps:?}");
        assert!(sleeps[0] <= slept && sleeps[0] >= slept * 9 / 10, "slept {slept} ns, sampled {sleeps:?} ns");
        assert!(sampler.stats().unwrap().off_cpu_samples >= 1);
    }

    /// The off-CPU samples of thread `tid` sleeping, from what `events` holds.
    fn sleeps_of(events: &mut RingBuf<MapData>, tid: u32) -> Vec<OffCpuSample> {
        let mut sleeps = Vec::new();
        while let Some(record) = events.next() {
            if let Ok(Event::OffCpu(sample)) = events::decode(&record) {
                if sample.tid == tid && sample.wait == wait::SLEEP {
                    sleeps.push(sample);
                }
            }
        }
        sleeps
    }

    /// A wall-time program the kernel refuses (sched_switch's, loaded on a
    /// tracepoint with fewer arguments than it reads: the verifier says no)
    /// costs wall time only: CPU sampling and memory come up, and the
    /// refusal is reported with the verifier's words.
    #[test]
    fn a_refused_program_turns_off_its_dimension_only() {
        let me = std::process::id();
        let refused = [("sched_switch", "sched_process_exit"), ("sys_exit", "sys_exit")];
        let (sampler, mut events) = Sampler::start_with(1000, &[me], true, Some(1 << 20), &refused)
            .expect("the other dimensions come up (run as root)");
        assert_eq!(sampler.features.cpu, State::On);
        assert_eq!(sampler.features.memory, State::On);
        let State::Refused(why) = &sampler.features.wall else { panic!("wall is refused: {:?}", sampler.features) };
        assert!(why.starts_with("this kernel's verifier refused sched_switch ("), "{why}");
        assert!(sampler.features.to_string().contains("wall: off: this kernel's verifier refused sched_switch"));
        // The sampler samples.
        let until = Instant::now() + Duration::from_millis(200);
        let mut spin = 0u64;
        while Instant::now() < until {
            spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(7));
        }
        let mut samples = 0;
        while let Some(record) = events.next() {
            samples += usize::from(matches!(events::decode(&record), Ok(Event::Cpu(_))));
        }
        assert!(samples >= 50, "200 ms at 1000 Hz: {samples} samples");
    }

    /// Sleeps far shorter than the sampling period are kept with probability
    /// (sleep / period), each as one period: their total is unbiased.
    #[test]
    fn short_sleeps_add_up_to_their_total_in_expectation() {
        let me = std::process::id();
        let period_ns = 10_000_000;
        let (_sampler, mut events) = Sampler::start(100, &[me], true, None).expect("load and attach (run as root)");
        // SAFETY: no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let started = Instant::now();
        // On a busy host some 1 ms sleeps last a period or more: those are
        // kept whole, the others count one period when kept.
        let mut long_sleeps = 0;
        for _ in 0..1000 {
            let sleep = Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            long_sleeps += usize::from(sleep.elapsed() >= Duration::from_nanos(period_ns));
        }
        let slept = started.elapsed().as_nanos() as f64;
        let kept: Vec<u64> = sleeps_of(&mut events, tid).iter().map(|sample| sample.off_cpu_ns).collect();
        assert!(kept.iter().all(|&ns| ns >= period_ns), "no kept sleep counts less than a period: {kept:?}");
        let whole = kept.iter().filter(|&&ns| ns > period_ns).count();
        assert!(whole <= long_sleeps, "{whole} sleeps kept whole, but only {long_sleeps} lasted a period: {kept:?}");
        // ~110 kept of ~1000: 30% is about 3 standard deviations.
        let total = kept.iter().sum::<u64>() as f64;
        assert!((total - slept).abs() <= 0.3 * slept, "slept {slept} ns in all, {} kept, {total} ns", kept.len());
    }

    /// A Python stack laid out in this process's memory, as an interpreter
    /// with the offsets of [`SYNTHETIC`] would: it lets every path of the
    /// kernel's frame walker be checked without a real CPython.
    struct SyntheticPython {
        memory: Vec<u64>,
        /// 3.11's `is_entry` offset, if the synthetic version has it.
        is_entry: u16,
    }

    /// Object addresses, as byte offsets into the memory.
    const RUNTIME: usize = 0;
    const INTERP: usize = 512;
    const DECOY_TSTATE: usize = 1024;
    const TSTATE: usize = 1536;
    const CFRAME: usize = 2048;
    const CODE_TYPE: usize = 2560;
    const FRAMES: usize = 4096;
    /// Room for `MAX_PY_FRAMES` and more, frames then code objects.
    const CODES: usize = FRAMES + 256 * FRAME_SIZE;
    const FRAME_SIZE: usize = 128;

    const SYNTHETIC: PyOffsets = PyOffsets {
        runtime_interpreters_head: 40,
        interp_next: 0,
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_thread_id: 152,
        tstate_frame: 56,
        cframe_current_frame: 8,
        frame_code: 0,
        frame_previous: 8,
        frame_instr: 56,
        frame_owner: 70,
        object_type: 8,
    };
    const OWNER_CSTACK: u8 = 3;
    /// 3.11's `is_entry`, in the synthetic frame.
    const IS_ENTRY: u16 = 71;

    impl SyntheticPython {
        /// A thread whose state is the second of its interpreter (so it is
        /// found by a scan), running `depth` frames.
        fn new(depth: usize) -> Self {
            assert!(depth <= 256);
            let mut python = SyntheticPython { memory: vec![0; (CODES + 256 * 64) / 8], is_entry: NO_OFFSET };
            python.set(RUNTIME + 40, python.addr(INTERP));
            python.set(INTERP + 16, python.addr(DECOY_TSTATE));
            python.set(DECOY_TSTATE + 8, python.addr(TSTATE));
            python.set(DECOY_TSTATE + 152, 1);
            // SAFETY: no preconditions.
            python.set(TSTATE + 152, unsafe { libc::pthread_self() } as u64);
            python.set(TSTATE + 56, python.addr(CFRAME));
            python.set(CFRAME + 8, python.addr(FRAMES));
            for i in 0..depth {
                let frame = FRAMES + i * FRAME_SIZE;
                python.set(frame, python.addr(CODES + i * 64));
                python.set(CODES + i * 64 + 8, python.addr(CODE_TYPE));
                python.set(frame + 56, 0x1000 + i as u64);
                if i + 1 < depth {
                    python.set(frame + 8, python.addr(frame + FRAME_SIZE));
                }
            }
            python
        }

        fn addr(&self, offset: usize) -> u64 {
            self.memory.as_ptr() as u64 + offset as u64
        }

        fn set(&mut self, offset: usize, value: u64) {
            self.memory[offset / 8] = value;
        }

        fn set_byte(&mut self, offset: usize, value: u8) {
            let word = &mut self.memory[offset / 8];
            let shift = (offset % 8) * 8;
            *word = (*word & !(0xff << shift)) | (u64::from(value) << shift);
        }

        fn process(&self) -> PyProcess {
            PyProcess {
                runtime: self.addr(RUNTIME),
                code_type: self.addr(CODE_TYPE),
                offsets: SYNTHETIC,
                owner_cstack: OWNER_CSTACK,
                _pad0: 0,
                frame_is_entry: self.is_entry,
                frame_span: PyProcess::frame_span_of(&SYNTHETIC, self.is_entry).unwrap(),
                _pad: [0; 2],
                gil: 0,
                gil_size: 0,
            }
        }

        fn frame(&self, i: usize) -> PyFrame {
            PyFrame { code: self.addr(CODES + i * 64), instr: 0x1000 + i as u64 }
        }
    }

    /// Runs on this thread for a while and returns the Python walks of its
    /// samples: status and frames.
    fn walks(python: &SyntheticPython) -> Vec<(u32, Vec<PyFrame>)> {
        let me = std::process::id();
        let (mut sampler, mut events) =
            Sampler::start(1000, &[me], false, None).expect("load and attach (run as root)");
        sampler.add_python(me, &python.process()).unwrap();
        // SAFETY: no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let until = Instant::now() + Duration::from_millis(200);
        let mut spin = 0u64;
        while Instant::now() < until {
            spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(7));
        }
        let mut walks = Vec::new();
        while let Some(record) = events.next() {
            if let Ok(Event::Cpu(sample)) = events::decode(&record) {
                // Samples taken before `add_python` are not walked.
                if sample.tid == tid && sample.py_status != PY_NOT_PYTHON {
                    walks.push((sample.py_status, sample.py_frames[..sample.py_len as usize].to_vec()));
                }
            }
        }
        assert!(walks.len() >= 50, "200 ms at 1000 Hz gives ~200 samples of this thread, got {}", walks.len());
        walks
    }

    /// Every walk has `status` and `frames`.
    fn assert_walks(python: &SyntheticPython, status: u32, frames: &[PyFrame]) {
        for (got_status, got_frames) in walks(python) {
            assert_eq!(got_status, status);
            assert!(
                got_frames == frames,
                "got {} frames, {:?}...",
                got_frames.len(),
                &got_frames[..got_frames.len().min(3)]
            );
        }
    }

    #[test]
    fn walks_a_synthetic_python_stack() {
        let python = SyntheticPython::new(3);
        assert_walks(&python, PY_OK, &[python.frame(0), python.frame(1), python.frame(2)]);
    }

    #[test]
    fn strips_pointer_tags_and_skips_c_stack_frames() {
        let mut python = SyntheticPython::new(3);
        // 3.14 tags `_PyStackRef`s in their low bits.
        python.set(FRAMES, python.addr(CODES) | 1);
        python.set_byte(FRAMES + FRAME_SIZE + 70, OWNER_CSTACK);
        // The frame the shim frame's C code called started an evaluation-loop run.
        let entry = PyFrame { code: python.frame(0).code | PY_ENTRY_FRAME, ..python.frame(0) };
        assert_walks(&python, PY_OK, &[entry, python.frame(2)]);
    }

    #[test]
    fn marks_the_entry_frames_of_3_11() {
        let mut python = SyntheticPython::new(3);
        python.is_entry = IS_ENTRY;
        python.set_byte(FRAMES + FRAME_SIZE + IS_ENTRY as usize, 1);
        let entry = PyFrame { code: python.frame(1).code | PY_ENTRY_FRAME, ..python.frame(1) };
        assert_walks(&python, PY_OK, &[python.frame(0), entry, python.frame(2)]);
    }

    #[test]
    fn a_frame_chain_that_loops_is_a_cycle() {
        let mut python = SyntheticPython::new(5);
        python.set(FRAMES + 4 * FRAME_SIZE + 8, python.addr(FRAMES + FRAME_SIZE));
        for (status, frames) in walks(&python) {
            assert_eq!(status, PY_CYCLE);
            assert!(frames.len() < 16, "the loop is found within a few rounds, not after {}", frames.len());
        }
    }

    #[test]
    fn a_code_object_of_another_type_ends_the_walk() {
        let mut python = SyntheticPython::new(3);
        python.set(CODES + 64 + 8, python.addr(RUNTIME));
        assert_walks(&python, PY_BAD_CODE, &[python.frame(0)]);
    }

    #[test]
    fn a_pointer_outside_the_process_ends_the_walk() {
        let mut python = SyntheticPython::new(3);
        python.set(FRAMES + FRAME_SIZE + 8, 0xdead_0000_0000);
        assert_walks(&python, PY_BAD_POINTER, &[python.frame(0), python.frame(1)]);
    }

    #[test]
    fn a_stack_deeper_than_the_limit_is_truncated() {
        let python = SyntheticPython::new(MAX_PY_FRAMES + 10);
        let expected: Vec<_> = (0..MAX_PY_FRAMES).map(|i| python.frame(i)).collect();
        assert_walks(&python, PY_TRUNCATED, &expected);
    }

    #[test]
    fn finds_task_offsets_in_the_kernel_btf() {
        let task = TaskOffsets::from_kernel_btf().unwrap();
        for offset in [task.fsbase, task.group_leader, task.comm, task.pid, task.tgid, task.state] {
            assert!(offset > 0 && offset < 16384, "{offset}");
        }
    }
}
