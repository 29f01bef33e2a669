//! CPU samples: the current thread's stacks, at each tick of the agent's
//! per-CPU perf event.

use aya_ebpf::programs::PerfEventContext;
use profiler_common::{kind, stat};

use crate::{
    maps::{count, pid_tid, sampled},
    process,
    record::{capture, send_sample, wakeup, CPU_SLOT},
};

/// Samples the thread the perf event interrupted, if it is to be sampled.
#[inline(always)]
pub fn sample(ctx: &PerfEventContext) {
    let (pid, tid) = pid_tid();
    // tid 0 is the idle task: nothing ran.
    if tid == 0 || !sampled(pid) {
        return;
    }
    count(stat::SAMPLES);
    process::announce(pid);
    if let Some(sample) = capture(ctx, CPU_SLOT, kind::SAMPLE, pid, tid) {
        send_sample(sample, wakeup());
    }
}
