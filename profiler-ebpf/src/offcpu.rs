//! Off-CPU time of profiled threads, so that CPU plus off-CPU time is each
//! thread's wall-clock time.
//!
//! `sched_switch` notes when a thread leaves the CPU and, when it comes back
//! after `d` ns, keeps the wait if `d` ≥ the CPU sampling period `T`, else
//! with probability `d / T` as `T` ns: unbiased, and a thread that blocks
//! thousands of times a second costs a map update per switch. A kept wait is
//! sampled at the thread's next `sys_exit`, where its user and Python stacks
//! are still those it blocked with, and the system call says what it waited
//! for. A preempted thread (still runnable) is sampled at once, without
//! stacks: it will not go through a system call exit to end that wait.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use profiler_common::{kind, stat, wait, StackRecord, PY_NOT_PYTHON};

use crate::{
    maps::{count, global, pid_tid, profiled, task_u32, PY_PROCS, TASK_COMM_OFFSET, TASK_TGID_OFFSET},
    record::{capture, send_sample, wakeup, EVENTS, OFF_CPU_SLOT},
};

/// CPU sampling period in ns, set by the agent.
#[no_mangle]
static SAMPLE_PERIOD_NS: u64 = 10_000_000;
/// Offset of `task_struct.pid` (the thread id), from the kernel's BTF.
#[no_mangle]
static TASK_PID_OFFSET: u64 = 0;
/// Offset of `task_struct.__state`, from the kernel's BTF: the tracepoint's
/// own `prev_state` argument only exists from 5.18.
#[no_mangle]
static TASK_STATE_OFFSET: u64 = 0;

/// `task_struct.__state` of a task switching out for the last time.
const TASK_DEAD: u32 = 0x80;

#[repr(C)]
#[derive(Clone, Copy)]
struct OffCpu {
    since_ns: u64,
    /// 1 when the thread was preempted (still runnable), else 0.
    preempted: u64,
}

/// Thread id → when it left the CPU; `since_ns` 0 while it runs. Entries
/// are updated in place and removed only when the thread exits: an insert or
/// a removal in an LRU map costs several times a lookup. LRU: an entry of a
/// thread that never runs again is not kept forever.
#[map]
static OFF_CPU_START: LruHashMap<u32, OffCpu> = LruHashMap::with_max_entries(65536, 0);

/// Thread id → off-CPU ns kept, to sample at its next `sys_exit`; 0 when
/// none. In place, as above.
#[map]
static PENDING: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);

/// `sched_switch`: runs in the context of `prev`, which leaves the CPU to
/// `next`.
#[inline(always)]
pub fn switch(ctx: &BtfTracePointContext) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (pid, tid) = pid_tid();
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    if tid != 0 && profiled(pid) {
        // A state that cannot be read counts as running: preempted, which
        // keeps the wait without guessing its reason.
        let prev_state = task_u32(prev, &TASK_STATE_OFFSET).unwrap_or(0);
        if prev_state & TASK_DEAD == 0 {
            let off_cpu = OffCpu { since_ns: now, preempted: u64::from(preempt & 1 != 0 || prev_state == 0) };
            match OFF_CPU_START.get_ptr_mut(tid) {
                // SAFETY: a valid map value.
                Some(entry) => unsafe { *entry = off_cpu },
                None => {
                    let _ = OFF_CPU_START.insert(tid, off_cpu, 0);
                }
            }
        }
    }
    let Some(next_tid) = task_u32(next, &TASK_PID_OFFSET) else { return };
    let Some(entry) = OFF_CPU_START.get_ptr_mut(next_tid) else { return };
    // SAFETY: a valid map value, copied, then marked as running.
    let off_cpu = unsafe { core::mem::replace(&mut *entry, OffCpu { since_ns: 0, preempted: 0 }) };
    if off_cpu.since_ns == 0 {
        return;
    }
    let Some(ns) = kept(now.saturating_sub(off_cpu.since_ns)) else { return };
    if off_cpu.preempted != 0 {
        send_preempted(next, next_tid, ns, now);
    } else if let Some(pending) = PENDING.get_ptr_mut(next_tid) {
        // Added: woken within one system call several times (a futex retried).
        // SAFETY: a valid map value.
        unsafe { *pending += ns };
    } else {
        let _ = PENDING.insert(next_tid, ns, 0);
    }
}

/// The off-CPU time a wait of `ns` stands for: all of it from one sampling
/// period `T` on, else `T` with probability `ns / T`.
fn kept(ns: u64) -> Option<u64> {
    let period = global(&SAMPLE_PERIOD_NS);
    if ns >= period {
        return Some(ns);
    }
    // random / 2^32 < ns / T, in integers (T < 2^32, so no overflow).
    // SAFETY: no preconditions.
    let random = u64::from(unsafe { bpf_get_prandom_u32() });
    (random * period < ns << 32).then_some(period)
}

/// A sample of `ns` preempted, without stacks, for thread `tid` of `task`.
fn send_preempted(task: u64, tid: u32, ns: u64, now: u64) {
    let Some(pid) = task_u32(task, &TASK_TGID_OFFSET) else { return };
    let Some(mut entry) = EVENTS.reserve::<StackRecord>(0) else {
        count(stat::SAMPLES_DROPPED);
        return;
    };
    let sample = entry.as_mut_ptr();
    // SAFETY: `sample` is the reserved record, written field by field; the
    // stack arrays stay unwritten, their lengths 0.
    unsafe {
        (*sample).kind = kind::OFF_CPU;
        (*sample).pid = pid;
        (*sample).tid = tid;
        (*sample).time_ns = now;
        (*sample).off_cpu_ns = ns;
        (*sample).wait = wait::PREEMPTED;
        (*sample).cpu = bpf_get_smp_processor_id();
        (*sample).comm =
            bpf_probe_read_kernel((task + global(&TASK_COMM_OFFSET)) as *const [u8; 16]).unwrap_or_default();
        (*sample).py_status = PY_NOT_PYTHON;
        (*sample).py_len = 0;
        (*sample).kernel_len = 0;
        (*sample).user_len = 0;
        (*sample).user_unwound = profiler_common::unwound::NO_TABLES;
        // Ring-buffer space is not zeroed: unset, these would hold an earlier
        // record's values. The thread's label set is in its own memory, which
        // this context (another task's) cannot read.
        (*sample).label_set = 0;
        (*sample).bytes = 0;
        (*sample).address = 0;
    }
    count(stat::OFF_CPU_SAMPLES);
    entry.submit(wakeup());
}

/// `sys_exit`: runs in the thread returning to user space, which has run no
/// user code since it blocked: its stacks are those of the wait.
#[inline(always)]
pub fn sys_exit(ctx: &BtfTracePointContext) {
    let (pid, tid) = pid_tid();
    let Some(pending) = PENDING.get_ptr_mut(tid) else { return };
    // SAFETY: a valid map value, taken.
    let ns = unsafe { core::mem::take(&mut *pending) };
    if ns == 0 {
        return;
    }
    let regs: u64 = ctx.arg(0);
    if let Some(sample) = capture(ctx, OFF_CPU_SLOT, kind::OFF_CPU, pid, tid) {
        // SAFETY: this CPU's off-CPU scratch slot.
        unsafe {
            (*sample).off_cpu_ns = ns;
            (*sample).wait = reason(regs, pid);
        }
        count(stat::OFF_CPU_SAMPLES);
        // Long waits often end as their process shuts down (workers told to
        // stop): wake the agent to name the frames while the process lives.
        send_sample(sample, if ns >= WAKE_AGENT_NS { BPF_RB_FORCE_WAKEUP as u64 } else { wakeup() });
    }
}

/// Off-CPU samples of waits this long wake the agent at once, at most 10
/// times a second per thread.
const WAKE_AGENT_NS: u64 = 100_000_000;

/// Offsets in x86-64 `struct pt_regs` (a fixed layout).
const REGS_SI: u64 = 104;
const REGS_DI: u64 = 112;
const REGS_ORIG_AX: u64 = 120;

/// What a thread of process `pid` that blocked in the system call of `regs`
/// waited for.
fn reason(regs: u64, pid: u32) -> u32 {
    // SAFETY: kernel reads fault safely.
    let reg = |offset: u64| unsafe { bpf_probe_read_kernel((regs + offset) as *const u64) }.unwrap_or(u64::MAX);
    // x86-64 system call numbers.
    match reg(REGS_ORIG_AX) {
        // nanosleep, clock_nanosleep, pause
        35 | 230 | 34 => wait::SLEEP,
        // select and pselect6 without descriptors (nfds = 0)
        23 | 270 if reg(REGS_DI) == 0 => wait::SLEEP,
        // poll and ppoll without descriptors
        7 | 271 if reg(REGS_SI) == 0 => wait::SLEEP,
        // read, write, poll, pread64, pwrite64, readv, writev, select,
        // sendfile, connect, accept, sendto, recvfrom, sendmsg, recvmsg,
        // epoll_wait, pselect6, ppoll, epoll_pwait, accept4, preadv,
        // pwritev, recvmmsg, sendmmsg, preadv2, pwritev2, epoll_pwait2
        0
        | 1
        | 7
        | 17..=20
        | 23
        | 40
        | 42..=47
        | 232
        | 270
        | 271
        | 281
        | 288
        | 295
        | 296
        | 299
        | 307
        | 327
        | 328
        | 441 => wait::IO,
        // futex on the GIL's state
        202 if is_gil(pid, reg(REGS_DI)) => wait::GIL,
        // futex, futex_waitv
        202 | 449 => wait::LOCK,
        _ => wait::OTHER,
    }
}

/// Whether `futex` lies in the GIL's state of CPython process `pid`.
fn is_gil(pid: u32, futex: u64) -> bool {
    // SAFETY: plain data, read once.
    unsafe { PY_PROCS.get(pid) }.is_some_and(|process| futex.wrapping_sub(process.gil) < process.gil_size)
}

/// An exiting thread neither runs nor returns from a system call again.
pub fn forget(tid: u32) {
    let _ = OFF_CPU_START.remove(tid);
    let _ = PENDING.remove(tid);
}
