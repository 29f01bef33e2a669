//! Ferroscope's kernel side: a CPU sampler that, for threads of CPython
//! processes, walks the Python frame chain in place.
//!
//! The kernel does the minimum: it records addresses (code objects,
//! instructions, native and kernel return addresses) and leaves every name to
//! userspace, which reads code objects and symbol tables at leisure.
#![no_std]
#![no_main]

mod memory;
mod offcpu;
mod python;
mod unwind;

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_smp_processor_id,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, perf_event},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext},
    EbpfContext,
};
use profiler_common::{
    kind, stat, ProcessEvent, PyProcess, Sample, ThreadTally, MAX_KERNEL_FRAMES, MAX_USER_FRAMES, PY_NOT_PYTHON,
};

/// Set by the agent before load: 1 limits sampling to the pids in `TARGETS`.
#[no_mangle]
static FILTER_PIDS: u8 = 0;
/// Offsets in `task_struct`, from the kernel's BTF, set by the agent.
#[no_mangle]
static TASK_GROUP_LEADER_OFFSET: u64 = 0;
#[no_mangle]
static TASK_COMM_OFFSET: u64 = 0;
#[no_mangle]
static TASK_TGID_OFFSET: u64 = 0;

fn global(value: &'static u64) -> u64 {
    // SAFETY: globals that only the loader writes.
    unsafe { core::ptr::read_volatile(value) }
}

/// A `u32` field of a task at a loader-set offset.
fn task_u32(task: u64, offset: &'static u64) -> Option<u32> {
    // SAFETY: kernel reads fault safely.
    unsafe { bpf_probe_read_kernel((task + global(offset)) as *const u32) }.ok()
}

/// `SCRATCH` slots: a perf event may interrupt `sys_exit` on its CPU, so the
/// two programs that fill a sample never share one.
const CPU_SLOT: u32 = 0;
const OFF_CPU_SLOT: u32 = 1;
/// The allocation uprobes, which a `sys_exit` program preempted on the same
/// CPU must not share a slot with.
const MEMORY_SLOT: u32 = 2;

/// Samples and process events, in the order they happened on each CPU.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
const EVENTS_BYTES: u32 = 8 << 20;
/// Samples wake the agent only past this much unread data: a wakeup costs
/// more than the rest of a sample, and the agent also reads on a timer.
const WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 4;

/// Processes the agent was told about, so each gets one `NEW_PROCESS` event.
#[map]
static KNOWN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(32768, 0);

/// CPython processes, filled by the agent.
#[map]
static PY_PROCS: HashMap<u32, PyProcess> = HashMap::with_max_entries(8192, 0);

/// With `FILTER_PIDS`, the processes to sample.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Thread id → where the thread keeps its context label set (a `u64` in its
/// process's memory), filled by the agent when a thread tells it (the
/// Python API's `profiler.labels(...)`).
#[map]
static LABEL_SLOTS: HashMap<u32, u64> = HashMap::with_max_entries(65536, 0);

/// The current label set of thread `tid`, 0 for none: one map lookup, and
/// one read of the thread's memory for threads that have a slot.
fn label_set(tid: u32) -> u64 {
    // SAFETY: a copy of a map value; user reads fault safely.
    unsafe { LABEL_SLOTS.get(tid) }
        .and_then(|&address| unsafe { aya_ebpf::helpers::bpf_probe_read_user(address as *const u64) }.ok())
        .unwrap_or(0)
}

/// Threads started and ended per process, for every process on the host:
/// counting from the start (not from when the agent first looks at a
/// process) makes the counts exact, and threads start rarely enough that
/// the cost does not show. Per CPU, as threads of one process start and end
/// on several CPUs at once (this target has no atomic add). The agent
/// removes the entry of a process it knew once it has read it after the
/// exit; the LRU drops the others.
#[map]
static THREAD_TALLY: LruPerCpuHashMap<u32, ThreadTally> = LruPerCpuHashMap::with_max_entries(16384, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program runs with preemption off.
        unsafe { *counter += 1 };
    }
}

fn pid_tid() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Whether the off-CPU time of `pid` is measured: the `--pid` targets, else
/// the CPython processes.
fn profiled(pid: u32) -> bool {
    // SAFETY: a global that only the loader writes.
    if unsafe { core::ptr::read_volatile(&FILTER_PIDS) } == 0 {
        PY_PROCS.get_ptr(pid).is_some()
    } else {
        TARGETS.get_ptr(pid).is_some()
    }
}

fn sampled(pid: u32) -> bool {
    // SAFETY: a global that only the loader writes.
    let filter = unsafe { core::ptr::read_volatile(&FILTER_PIDS) };
    filter == 0 || TARGETS.get_ptr(pid).is_some()
}

fn send_process_event(kind: u32, pid: u32) {
    if EVENTS.output(ProcessEvent { kind, pid, comm: process_comm() }, 0).is_err() {
        count(stat::EVENTS_DROPPED);
    }
}

/// The `comm` of the current process's main thread.
fn process_comm() -> [u8; 16] {
    // SAFETY: globals written by the loader only; kernel reads fault safely.
    unsafe {
        let leader_offset = core::ptr::read_volatile(&TASK_GROUP_LEADER_OFFSET);
        let comm_offset = core::ptr::read_volatile(&TASK_COMM_OFFSET);
        let task = bpf_get_current_task();
        bpf_probe_read_kernel((task + leader_offset) as *const u64)
            .and_then(|leader| bpf_probe_read_kernel((leader + comm_offset) as *const [u8; 16]))
            .unwrap_or_default()
    }
}

/// Where a sample is assembled before it is copied to the ring buffer; too
/// big for the 512-byte stack. One slot per program, see `CPU_SLOT`.
#[map]
static SCRATCH: PerCpuArray<Sample> = PerCpuArray::with_max_entries(3, 0);

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    let (pid, tid) = pid_tid();
    // tid 0 is the idle task: nothing ran.
    if tid == 0 || !sampled(pid) {
        return 0;
    }
    count(stat::SAMPLES);
    // An LRU insert takes a node before it looks for the key: look first.
    if KNOWN.get_ptr(pid).is_none() && KNOWN.insert(pid, 0, BPF_NOEXIST as u64).is_ok() {
        send_process_event(kind::NEW_PROCESS, pid);
    }
    if let Some(sample) = capture(&ctx, CPU_SLOT, kind::SAMPLE, pid, tid) {
        send_sample(sample, wakeup());
    }
    0
}

/// The current thread's stacks in this CPU's scratch `slot`, as a sample of
/// `kind` with no off-CPU time. Off-CPU samples have no kernel stack: theirs
/// would be the system call exit path, the same for every wait.
fn capture(ctx: &impl EbpfContext, slot: u32, kind: u32, pid: u32, tid: u32) -> Option<*mut Sample> {
    let sample = SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: `sample` is this CPU's slot of the calling program, which does
    // not nest with itself on one CPU.
    unsafe {
        (*sample).kind = kind;
        (*sample).pid = pid;
        (*sample).tid = tid;
        (*sample).time_ns = bpf_ktime_get_ns();
        (*sample).off_cpu_ns = 0;
        (*sample).bytes = 0;
        (*sample).address = 0;
        (*sample).label_set = label_set(tid);
        (*sample).wait = 0;
        (*sample).cpu = bpf_get_smp_processor_id();
        (*sample).comm = bpf_get_current_comm().unwrap_or_default();
        (*sample).kernel_len =
            if kind == kind::SAMPLE { stack(ctx, (*sample).kernel_stack.as_mut_ptr(), MAX_KERNEL_FRAMES, 0) } else { 0 };
        // Without tables (yet), the leaf frames the kernel's unwinder finds.
        let tables = unwind::has_tables(pid);
        (*sample).user_unwound = tables.is_some() as u32;
        (*sample).user_len = match tables {
            Some(process) => unwind::walk(process, sample),
            None => stack(ctx, (*sample).user_stack.as_mut_ptr(), MAX_USER_FRAMES, BPF_F_USER_STACK as u64),
        };
        match PY_PROCS.get(pid) {
            Some(process) => python::walk(process, tid, sample),
            None => {
                (*sample).py_len = 0;
                (*sample).py_status = PY_NOT_PYTHON;
            }
        }
    }
    Some(sample)
}

/// The ring buffer flag of a sample: wake the agent only past `WAKEUP_BYTES`.
fn wakeup() -> u64 {
    (if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }) as u64
}

/// Copies a captured sample to the ring buffer with the wakeup `flags`,
/// counting it if it is full.
fn send_sample(sample: *const Sample, flags: u64) {
    // SAFETY: `sample` comes from `capture`.
    if EVENTS.output::<Sample>(unsafe { &*sample }, flags).is_err() {
        count(stat::SAMPLES_DROPPED);
    }
}

/// Fills `buf` with up to `max` return addresses, innermost first; returns
/// how many.
///
/// # Safety
/// `buf` must be valid for `max` writes.
unsafe fn stack(ctx: &impl EbpfContext, buf: *mut u64, max: usize, flags: u64) -> u32 {
    let bytes = aya_ebpf::helpers::generated::bpf_get_stack(ctx.as_ptr(), buf.cast(), (max * 8) as u32, flags);
    if bytes > 0 {
        (bytes / 8) as u32
    } else {
        0
    }
}

/// A new program image: forget what was known so that the next sample
/// announces the process again.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn process_exec(_ctx: BtfTracePointContext) -> i32 {
    let (pid, _) = pid_tid();
    let _ = KNOWN.remove(pid);
    let _ = PY_PROCS.remove(pid);
    // The other threads are gone (counted as ended): a new program starts
    // with its own count.
    let _ = THREAD_TALLY.remove(pid);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn process_exit(_ctx: BtfTracePointContext) -> i32 {
    let (pid, tid) = pid_tid();
    offcpu::forget(tid);
    let _ = LABEL_SLOTS.remove(tid);
    // Every thread exits through here; the process ends with its leader.
    if pid != tid {
        tally(pid, |tally| &mut tally.ended);
    } else if KNOWN.remove(pid).is_ok() {
        let _ = PY_PROCS.remove(pid);
        // Its `THREAD_TALLY` stays for the agent to read.
        send_process_event(kind::EXIT, pid);
    } else {
        let _ = THREAD_TALLY.remove(pid);
    }
    0
}

/// Runs in the parent: a child with the parent's tgid is a new thread, any
/// other child a new process, whose pid may have served another before.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn process_fork(ctx: BtfTracePointContext) -> i32 {
    let (pid, _) = pid_tid();
    // Argument 1 of sched_process_fork is the child task.
    let child: u64 = ctx.arg(1);
    match task_u32(child, &TASK_TGID_OFFSET) {
        Some(tgid) if tgid == pid => tally(pid, |tally| &mut tally.started),
        Some(tgid) => {
            let _ = THREAD_TALLY.remove(tgid);
        }
        None => {}
    }
    0
}

/// Adds one to a counter of this CPU's `THREAD_TALLY` of `pid`.
fn tally(pid: u32, counter: fn(&mut ThreadTally) -> &mut u32) {
    if THREAD_TALLY.get_ptr_mut(pid).is_none() {
        let _ = THREAD_TALLY.insert(pid, ThreadTally::default(), BPF_NOEXIST as u64);
    }
    if let Some(tally) = THREAD_TALLY.get_ptr_mut(pid) {
        // SAFETY: this CPU's slot of a map value; the program runs with
        // preemption off.
        unsafe { *counter(&mut *tally) += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
