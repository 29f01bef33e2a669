//! The state the programs share: the globals the agent sets before load, the
//! maps that more than one program (or the agent) reads, and the small
//! lookups on them.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::map,
    maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use profiler_common::{stat, PyProcess, ThreadTally};

/// Set by the agent before load: 1 limits sampling to the pids in `TARGETS`.
#[no_mangle]
static FILTER_PIDS: u8 = 0;
/// Offsets in `task_struct`, from the kernel's BTF, set by the agent.
#[no_mangle]
pub static TASK_GROUP_LEADER_OFFSET: u64 = 0;
#[no_mangle]
pub static TASK_COMM_OFFSET: u64 = 0;
#[no_mangle]
pub static TASK_TGID_OFFSET: u64 = 0;

/// The value of a global that only the loader writes.
pub fn global(value: &'static u64) -> u64 {
    // SAFETY: globals that only the loader writes.
    unsafe { core::ptr::read_volatile(value) }
}

/// A `u32` field of a task at a loader-set offset.
pub fn task_u32(task: u64, offset: &'static u64) -> Option<u32> {
    // SAFETY: kernel reads fault safely.
    unsafe { bpf_probe_read_kernel((task + global(offset)) as *const u32) }.ok()
}

/// Processes the agent was told about, so each gets one `NEW_PROCESS` event.
#[map]
pub static KNOWN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(32768, 0);

/// CPython processes, filled by the agent.
#[map]
pub static PY_PROCS: HashMap<u32, PyProcess> = HashMap::with_max_entries(8192, 0);

/// With `FILTER_PIDS`, the processes to sample.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Thread id → where the thread keeps its context label set (a `u64` in its
/// process's memory), filled by the agent when a thread tells it (the
/// Python API's `profiler.labels(...)`).
#[map]
pub static LABEL_SLOTS: HashMap<u32, u64> = HashMap::with_max_entries(65536, 0);

/// The current label set of thread `tid`, 0 for none: one map lookup, and
/// one read of the thread's memory for threads that have a slot.
pub fn label_set(tid: u32) -> u64 {
    // SAFETY: a copy of a map value; user reads fault safely.
    unsafe { LABEL_SLOTS.get(tid) }
        .and_then(|&address| unsafe { bpf_probe_read_user(address as *const u64) }.ok())
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
pub static THREAD_TALLY: LruPerCpuHashMap<u32, ThreadTally> = LruPerCpuHashMap::with_max_entries(16384, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Adds one to this CPU's counter `index` of `STATS` (a `stat` constant).
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program runs with preemption off.
        unsafe { *counter += 1 };
    }
}

/// The current process (tgid) and thread ids.
pub fn pid_tid() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Whether the off-CPU time of `pid` is measured: the `--pid` targets, else
/// the CPython processes.
pub fn profiled(pid: u32) -> bool {
    // SAFETY: a global that only the loader writes.
    if unsafe { core::ptr::read_volatile(&FILTER_PIDS) } == 0 {
        PY_PROCS.get_ptr(pid).is_some()
    } else {
        TARGETS.get_ptr(pid).is_some()
    }
}

/// Whether `pid` is CPU-sampled: every process, else the `--pid` targets.
pub fn sampled(pid: u32) -> bool {
    // SAFETY: a global that only the loader writes.
    let filter = unsafe { core::ptr::read_volatile(&FILTER_PIDS) };
    filter == 0 || TARGETS.get_ptr(pid).is_some()
}
