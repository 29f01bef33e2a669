//! The life of processes and threads: which processes the agent has heard
//! of, and how many threads each started and ended.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::BtfTracePointContext};
use profiler_common::{kind, ThreadTally};

use crate::{
    maps::{pid_tid, task_u32, KNOWN, LABEL_SLOTS, PY_PROCS, TASK_TGID_OFFSET, THREAD_TALLY},
    offcpu,
    record::send_process_event,
};

/// Sends a `NEW_PROCESS` event for `pid` the first time it is sampled (since
/// the agent started or since its last exec).
#[inline(always)]
pub fn announce(pid: u32) {
    // An LRU insert takes a node before it looks for the key: look first.
    if KNOWN.get_ptr(pid).is_none() && KNOWN.insert(pid, 0, BPF_NOEXIST as u64).is_ok() {
        send_process_event(kind::NEW_PROCESS, pid);
    }
}

/// A new program image: forget what was known so that the next sample
/// announces the process again.
#[inline(always)]
pub fn exec() {
    let (pid, _) = pid_tid();
    let _ = KNOWN.remove(pid);
    let _ = PY_PROCS.remove(pid);
    // The other threads are gone (counted as ended): a new program starts
    // with its own count.
    let _ = THREAD_TALLY.remove(pid);
}

/// The current thread exits.
#[inline(always)]
pub fn exit() {
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
}

/// Runs in the parent: a child with the parent's tgid is a new thread, any
/// other child a new process, whose pid may have served another before.
#[inline(always)]
pub fn fork(ctx: &BtfTracePointContext) {
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
