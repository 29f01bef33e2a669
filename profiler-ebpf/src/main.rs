//! Ferroscope's kernel side: a CPU sampler that, for threads of CPython
//! processes, walks the Python frame chain in place, with off-CPU and
//! allocation samples of the same stacks.
//!
//! The kernel does the minimum: it records addresses (code objects,
//! instructions, native and kernel return addresses) and leaves every name to
//! userspace, which reads code objects and symbol tables at leisure.
//!
//! This file holds the programs' entry points only, each a call into the
//! module that does the work.
#![no_std]
#![no_main]

mod cpu;
mod maps;
mod memory;
mod offcpu;
mod process;
mod python;
mod record;
mod unwind;

use aya_ebpf::{
    macros::{btf_tracepoint, perf_event, uprobe, uretprobe},
    programs::{BtfTracePointContext, PerfEventContext, ProbeContext, RetProbeContext},
};
use profiler_common::kind;

/// A tick of the CPU sampling perf event (see `cpu`).
#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    cpu::sample(&ctx);
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn process_exec(_ctx: BtfTracePointContext) -> i32 {
    process::exec();
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn process_exit(_ctx: BtfTracePointContext) -> i32 {
    process::exit();
    0
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn process_fork(ctx: BtfTracePointContext) -> i32 {
    process::fork(&ctx);
    0
}

/// A thread leaves the CPU to another (see `offcpu`).
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    offcpu::switch(&ctx);
    0
}

/// A thread returns to user space: the off-CPU sample of its last wait.
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    offcpu::sys_exit(&ctx);
    0
}

// The allocator's sites (see `memory`).

#[uprobe]
pub fn raw_malloc(ctx: ProbeContext) -> u32 {
    memory::malloc(&ctx);
    0
}

#[uprobe]
pub fn raw_calloc(ctx: ProbeContext) -> u32 {
    memory::calloc(&ctx);
    0
}

#[uprobe]
pub fn raw_realloc(ctx: ProbeContext) -> u32 {
    memory::realloc(&ctx);
    0
}

#[uprobe]
pub fn raw_free_entry(ctx: ProbeContext) -> u32 {
    memory::free(&ctx);
    0
}

/// Returns from `_PyMem_RawMalloc`, `_PyMem_RawCalloc` and
/// `_PyMem_RawRealloc`: a sampled allocation gets its address.
#[uretprobe]
pub fn raw_alloc_return(ctx: RetProbeContext) -> u32 {
    memory::sampled_return(&ctx, kind::ALLOC);
    0
}

/// Returns from the arena allocator (whose entry is `raw_malloc`'s).
#[uretprobe]
pub fn arena_return(ctx: RetProbeContext) -> u32 {
    memory::sampled_return(&ctx, kind::ARENA);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
