//! The `EVENTS` ring buffer and the records written to it: stack records
//! (CPU, off-CPU and allocation samples) assembled in a per-CPU scratch slot,
//! and process events.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::map,
    maps::{PerCpuArray, RingBuf},
    EbpfContext,
};
use profiler_common::{
    kind, stat, unwound, ProcessEvent, StackRecord, MAX_KERNEL_FRAMES, MAX_USER_FRAMES, PY_NOT_PYTHON,
};

use crate::{
    maps::{count, label_set, PY_PROCS, TASK_COMM_OFFSET, TASK_GROUP_LEADER_OFFSET},
    python, unwind,
};

/// `SCRATCH` slots: a perf event may interrupt `sys_exit` on its CPU, so the
/// two programs that fill a sample never share one.
pub const CPU_SLOT: u32 = 0;
pub const OFF_CPU_SLOT: u32 = 1;
/// The allocation uprobes, which a `sys_exit` program preempted on the same
/// CPU must not share a slot with.
pub const MEMORY_SLOT: u32 = 2;

/// Samples and process events, in the order they happened on each CPU.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
const EVENTS_BYTES: u32 = 8 << 20;
/// Samples wake the agent only past this much unread data: a wakeup costs
/// more than the rest of a sample, and the agent also reads on a timer.
const WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 4;

/// Where a sample is assembled before it is copied to the ring buffer; too
/// big for the 512-byte stack. One slot per program, see `CPU_SLOT`.
#[map]
static SCRATCH: PerCpuArray<StackRecord> = PerCpuArray::with_max_entries(3, 0);

/// Sends a [`ProcessEvent`] of `kind` for `pid`, the current process.
pub fn send_process_event(kind: u32, pid: u32) {
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

/// The current thread's stacks in this CPU's scratch `slot`, as a sample of
/// `kind` with no off-CPU time. Off-CPU samples have no kernel stack: theirs
/// would be the system call exit path, the same for every wait.
pub fn capture(ctx: &impl EbpfContext, slot: u32, kind: u32, pid: u32, tid: u32) -> Option<*mut StackRecord> {
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
        (*sample).kernel_len = if kind == kind::SAMPLE {
            stack(ctx, (*sample).kernel_stack.as_mut_ptr(), MAX_KERNEL_FRAMES, 0)
        } else {
            0
        };
        // Without tables (yet), the leaf frames the kernel's unwinder finds.
        let tables = unwind::has_tables(pid);
        (*sample).user_unwound = if tables.is_some() { unwound::TABLES } else { unwound::NO_TABLES };
        (*sample).user_len = match tables {
            Some(process) => unwind::walk(process, sample, slot),
            None => stack(ctx, (*sample).user_stack.as_mut_ptr(), MAX_USER_FRAMES, BPF_F_USER_STACK as u64),
        };
        match PY_PROCS.get(pid) {
            Some(process) => python::walk(process, tid, sample, slot),
            None => {
                (*sample).py_len = 0;
                (*sample).py_status = PY_NOT_PYTHON;
            }
        }
    }
    Some(sample)
}

/// The ring buffer flag of a sample: wake the agent only past `WAKEUP_BYTES`.
pub fn wakeup() -> u64 {
    (if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }) as u64
}

/// Copies a captured sample to the ring buffer with the wakeup `flags`,
/// counting it if it is full.
pub fn send_sample(sample: *const StackRecord, flags: u64) {
    // SAFETY: `sample` comes from `capture`.
    if EVENTS.output::<StackRecord>(unsafe { &*sample }, flags).is_err() {
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
