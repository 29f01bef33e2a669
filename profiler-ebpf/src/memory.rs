//! Memory: allocations of CPython processes, sampled by bytes at the
//! allocator's sites that fire rarely for the bytes they cover.
//!
//! - `_PyMem_RawMalloc`, `_PyMem_RawCalloc`, `_PyMem_RawRealloc` and
//!   `_PyMem_RawFree`: the raw domain, where objects larger than pymalloc's
//!   512-byte blocks go, and `PyMem_Raw*` calls. A build without a symbol
//!   table (stripped) is probed at libc's `malloc`, `calloc`, `realloc` and
//!   `free` instead, which the raw domain calls: the same functions without
//!   their first argument (`void *ctx`). The attach cookie says which.
//! - pymalloc's arena allocator (`_PyObject_ArenaMmap` up to 3.11,
//!   `_PyMem_ArenaAlloc` from 3.12, and their frees): small objects are
//!   counted by the arenas (1 MiB, 256 KiB before 3.10) their pools take, not
//!   one by one. A probe on every small allocation costs more than the
//!   allocation; one on every pool (16 KiB) still cost 18% on an
//!   allocation-heavy program.
//!
//! Every site draws on one byte budget per thread, drawn from an exponential
//! distribution (as tcmalloc and Go do): an allocation of `n` bytes is
//! sampled with probability `1 - exp(-n / mean)`, which userspace inverts
//! into unbiased estimates. Only sampled allocations go into `LIVE`, so only
//! their frees send an event.

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_get_prandom_u32},
    macros::map,
    maps::{Array, HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use profiler_common::{kind, stat, LiveKey, MemoryEvent, ALLOC_BUDGETS};

use crate::{
    maps::{count, pid_tid},
    record::{capture, send_sample, wakeup, EVENTS, MEMORY_SLOT},
};

/// Exponential quantiles of the byte budget, filled by the agent.
#[map]
static BUDGETS: Array<u64> = Array::with_max_entries(ALLOC_BUDGETS, 0);

/// Thread id → bytes left before the next sampled allocation.
#[map]
static BUDGET_LEFT: LruHashMap<u32, i64> = LruHashMap::with_max_entries(65536, 0);

/// Thread id → bytes of a sampled raw allocation, until it returns.
#[map]
static SAMPLED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Sampled allocations not yet freed. Not LRU: an evicted entry would be a
/// free missed, a leak that is not one.
#[map]
static LIVE: HashMap<LiveKey, u8> = HashMap::with_max_entries(LIVE_ENTRIES, 0);
const LIVE_ENTRIES: u32 = 65536;

/// Draws `bytes` from the thread's budget: whether this allocation is sampled.
fn sampled(tid: u32, bytes: u64) -> bool {
    let Some(left) = BUDGET_LEFT.get_ptr_mut(tid) else {
        let _ = BUDGET_LEFT.insert(tid, draw() - bytes as i64, 0);
        return false;
    };
    // SAFETY: a valid map value; one thread updates its own entry.
    unsafe {
        *left -= bytes as i64;
        if *left > 0 {
            return false;
        }
        // The overshoot is not carried over: each draw is a fresh exponential,
        // whose memorylessness keeps sampling independent of where it started.
        *left = draw();
    }
    true
}

fn draw() -> i64 {
    // SAFETY: no preconditions.
    let index = unsafe { bpf_get_prandom_u32() } % ALLOC_BUDGETS;
    BUDGETS.get(index).map_or(i64::MAX, |&budget| budget as i64)
}

/// An allocation of `bytes` of the raw domain starts.
fn raw_alloc(bytes: u64) {
    let (_, tid) = pid_tid();
    if sampled(tid, bytes) {
        let _ = SAMPLED.insert(tid, bytes, 0);
    }
}

/// `ptr` is freed (or reallocated): if it was sampled, userspace hears of it.
fn raw_free(ptr: u64) {
    if ptr == 0 {
        return;
    }
    let (pid, _) = pid_tid();
    let key = LiveKey { pid, _pad: 0, address: ptr };
    if LIVE.remove(key).is_ok() && EVENTS.output(MemoryEvent { kind: kind::FREE, pid, address: ptr }, 0).is_err() {
        count(stat::EVENTS_DROPPED);
    }
}

/// Argument `n` of the probed function, not counting CPython's `ctx`.
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    // SAFETY: the context of the running program.
    let skip_ctx = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } != 0;
    // Both read, at constant offsets, and kept apart (black_box): the
    // verifier refuses a context read at a computed offset, which LLVM would
    // otherwise make of the two.
    let without = core::hint::black_box(ctx.arg::<u64>(n).unwrap_or(0));
    let with = core::hint::black_box(ctx.arg::<u64>(n + 1).unwrap_or(0));
    if skip_ctx {
        with
    } else {
        without
    }
}

/// `raw_malloc`: `_PyMem_RawMalloc(void *ctx, size_t size)`, `malloc(size_t
/// size)`, and the arena allocator's entry.
#[inline(always)]
pub fn malloc(ctx: &ProbeContext) {
    raw_alloc(arg(ctx, 0));
}

/// `raw_calloc`: `_PyMem_RawCalloc(void *ctx, size_t nelem, size_t elsize)`,
/// `calloc`.
#[inline(always)]
pub fn calloc(ctx: &ProbeContext) {
    let (nelem, elsize) = (arg(ctx, 0), arg(ctx, 1));
    // An overflowing product fails the allocation, which then records
    // nothing (no 128-bit multiply on this target).
    raw_alloc(nelem.wrapping_mul(elsize));
}

/// `raw_realloc`: `_PyMem_RawRealloc(void *ctx, void *ptr, size_t size)`,
/// `realloc`: the old block is freed, a new one allocated (often at the same
/// place).
#[inline(always)]
pub fn realloc(ctx: &ProbeContext) {
    raw_free(arg(ctx, 0));
    raw_alloc(arg(ctx, 1));
}

/// `raw_free_entry`: `_PyMem_RawFree(void *ctx, void *ptr)`, `free(void
/// *ptr)`.
#[inline(always)]
pub fn free(ctx: &ProbeContext) {
    raw_free(arg(ctx, 0));
}

/// A sampled allocation returns (`raw_alloc_return`, `arena_return`, with
/// `kind` `ALLOC` or `ARENA`): it is followed until freed and sent with its
/// stacks.
#[inline(always)]
pub fn sampled_return(ctx: &RetProbeContext, kind: u32) {
    let (pid, tid) = pid_tid();
    // SAFETY: a copy of a map value.
    let Some(&bytes) = (unsafe { SAMPLED.get(tid) }) else { return };
    let _ = SAMPLED.remove(tid);
    let address: u64 = ctx.ret();
    if address == 0 {
        return;
    }
    let tracked = LIVE.insert(LiveKey { pid, _pad: 0, address }, 0, 0).is_ok();
    if !tracked {
        count(stat::LIVE_OVERFLOW);
    }
    send(ctx, kind, bytes, if tracked { address } else { 0 });
}

/// A sample of the current thread's stacks with `bytes` at `address`.
fn send(ctx: &impl EbpfContext, kind: u32, bytes: u64, address: u64) {
    let (pid, tid) = pid_tid();
    if let Some(sample) = capture(ctx, MEMORY_SLOT, kind, pid, tid) {
        // SAFETY: this CPU's memory scratch slot.
        unsafe {
            (*sample).bytes = bytes;
            (*sample).address = address;
        }
        count(stat::ALLOC_SAMPLES);
        send_sample(sample, wakeup());
    }
}
