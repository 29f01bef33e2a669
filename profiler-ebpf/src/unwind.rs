//! The native unwinder: walks the user stack of the current thread with the
//! compact `.eh_frame` tables userspace loaded for its process's files, since
//! the programs users run (CPython among them) have no frame pointers.
//!
//! Per frame: the mapping that holds the address (binary search of the
//! process's mappings), the table row that covers it (binary search of the
//! file's rows), then CFA = rsp or rbp + offset, return address at CFA - 8,
//! rbp restored if the row saved it, rsp = CFA. Frames are a `bpf_loop`.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_NO_PREALLOC},
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use profiler_common::{
    stat, unwind, unwound, ProcessUnwind, StackRecord, UnwindChunk, UnwindMapping, UnwindRow, MAX_UNWIND_MAPPINGS,
    MAX_USER_FRAMES, UNWIND_CHUNKS, UNWIND_CHUNK_ROWS,
};

/// Rows of every loaded table, in chunks; userspace allocates them.
#[map]
static UNWIND_ROWS: Array<UnwindChunk> = Array::with_max_entries(UNWIND_CHUNKS, 0);

/// Per process, the mappings with a table; filled by userspace.
#[map]
static UNWIND_PROCS: HashMap<u32, ProcessUnwind> = HashMap::with_max_entries(8192, BPF_F_NO_PREALLOC);

/// Rows found for recent addresses, per CPU and program (slots as
/// `record::CPU_SLOT`), by address: most samples repeat the return addresses
/// of the ones before, so most frames need neither binary search.
#[repr(C)]
struct RowCache {
    rows: [CachedRow; CACHED_ROWS],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CachedRow {
    pc: u64,
    pid: u32,
    /// `ProcessUnwind::generation` when the row was found.
    generation: u32,
    row: UnwindRow,
}

const CACHED_ROWS: usize = 256;

#[map]
static ROW_CACHE: PerCpuArray<RowCache> = PerCpuArray::with_max_entries(3, 0);

/// Binary search steps: enough for 2^7 mappings and 2^21 rows.
const MAPPING_STEPS: u32 = 7;
const ROW_STEPS: u32 = 21;

/// A walk in progress.
#[repr(C)]
struct Walk {
    process: *const ProcessUnwind,
    sample: *mut StackRecord,
    cache: *mut RowCache,
    rip: u64,
    rsp: u64,
    rbp: u64,
    len: u32,
    /// Why the stack was cut short, if it was: `CUT`, `CUT_UNMAPPED`.
    cut: u32,
}

/// The walk could not go on.
const CUT: u32 = 1;
/// The walk met an address in no mapping it was given.
const CUT_UNMAPPED: u32 = 2;

/// Whether `pid` has tables, so that [`walk`] should be used for it.
pub fn has_tables(pid: u32) -> Option<*const ProcessUnwind> {
    UNWIND_PROCS.get_ptr(pid)
}

/// Unwinds the current thread's user stack into `sample.user_stack`; returns
/// the number of frames. `slot` is the calling program's.
pub fn walk(process: *const ProcessUnwind, sample: *mut StackRecord, slot: u32) -> u32 {
    let Some(cache) = ROW_CACHE.get_ptr_mut(slot) else {
        return 0;
    };
    // SAFETY: the current task outlives this program run.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    // Three registers read one by one: the whole `pt_regs` (168 bytes) on
    // the stack would eat a third of the verifier's 512-byte budget.
    // SAFETY: fault-safe reads of fields of the task's saved registers.
    let registers = unsafe {
        (
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rip)),
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rsp)),
            bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rbp)),
        )
    };
    let (Ok(rip), Ok(rsp), Ok(rbp)) = registers else {
        return 0;
    };
    crate::maps::count(stat::UNWOUND_STACKS);
    let mut walk = Walk { process, sample, cache, rip, rsp, rbp, len: 0, cut: 0 };
    // SAFETY: `step` takes a `*mut Walk`, which it is given.
    unsafe { bpf_loop(MAX_USER_FRAMES as u32, step as *mut c_void, (&mut walk as *mut Walk).cast(), 0) };
    if walk.cut != 0 || walk.len as usize >= MAX_USER_FRAMES && walk.rip != 0 {
        crate::maps::count(stat::UNWIND_CUT);
    }
    if walk.cut == CUT_UNMAPPED {
        // SAFETY: the per-CPU scratch sample.
        unsafe { (*sample).user_unwound = unwound::UNMAPPED };
    }
    walk.len
}

unsafe extern "C" fn step(_index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `walk` passes the `Walk` it made.
    let walk = unsafe { &mut *state.cast::<Walk>() };
    match frame(walk) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(why) => {
            walk.cut = why;
            1
        }
    }
}

/// Records the frame at `walk.rip` and moves to its caller: `Ok(false)` at
/// the outermost frame, `Err` where the walk cannot go on.
#[inline(always)]
fn frame(walk: &mut Walk) -> Result<bool, u32> {
    if walk.rip == 0 {
        return Ok(false);
    }
    let len = walk.len as usize;
    if len >= MAX_USER_FRAMES {
        return Err(CUT);
    }
    // SAFETY: `sample` is the per-CPU scratch sample and `len` is in bounds.
    unsafe { *(*walk.sample).user_stack.as_mut_ptr().add(len) = walk.rip };
    walk.len += 1;
    // A return address is after its call, which may be the function's last
    // instruction: look up the call itself.
    let pc = if len == 0 { walk.rip } else { walk.rip - 1 };
    // SAFETY: map values, valid for the program run; the cache is this
    // CPU's and program's.
    let (process, pid, cache) = unsafe { (&*walk.process, (*walk.sample).pid, &mut (*walk.cache).rows) };
    let slot = &mut cache[(pc ^ (pc >> 9)) as usize % CACHED_ROWS];
    let row = if slot.pc == pc && slot.pid == pid && slot.generation == process.generation {
        slot.row
    } else {
        let mapping = find_mapping(process, pc).ok_or(CUT_UNMAPPED)?;
        let file_pc = pc.wrapping_sub(mapping.bias);
        if file_pc > u32::MAX as u64 {
            return Err(CUT);
        }
        let row = find_row(mapping, file_pc as u32).ok_or(CUT)?;
        *slot = CachedRow { pc, pid, generation: process.generation, row };
        row
    };
    let cfa = match row.cfa_rule {
        unwind::CFA_RSP => walk.rsp.wrapping_add(row.cfa_offset as i64 as u64),
        unwind::CFA_RBP => walk.rbp.wrapping_add(row.cfa_offset as i64 as u64),
        unwind::CFA_PLT => walk.rsp + 8 + if (walk.rip & 15) >= 11 { 8 } else { 0 },
        unwind::CFA_END => return Ok(false),
        _ => return Err(CUT),
    };
    // SAFETY: user reads fault safely.
    let return_address = unsafe { bpf_probe_read_user((cfa - 8) as *const u64) }.map_err(|_| CUT)?;
    if row.rbp_rule == unwind::RBP_AT_CFA {
        let saved = cfa.wrapping_add(row.rbp_offset as i64 as u64);
        // SAFETY: as above.
        walk.rbp = unsafe { bpf_probe_read_user(saved as *const u64) }.map_err(|_| CUT)?;
    }
    walk.rsp = cfa;
    walk.rip = return_address;
    Ok(true)
}

/// A binary search for the last element whose key is <= `target`, in
/// `[low, high)`; a `bpf_loop` so that the verifier checks one step, not every
/// path through the search.
#[repr(C)]
struct Search {
    process: *const ProcessUnwind,
    target: u64,
    low: u32,
    high: u32,
}

/// Runs `step` over `search` until the range has one element: `search.low`.
#[inline(always)]
fn search(search: &mut Search, steps: u32, step: unsafe extern "C" fn(u64, *mut c_void) -> i64) {
    // SAFETY: `step` takes a `*mut Search`, which it is given.
    unsafe { bpf_loop(steps, step as *mut c_void, (search as *mut Search).cast(), 0) };
}

/// Halves `search`'s range with `key(middle)`; 1 when done or failed.
#[inline(always)]
fn halve(search: &mut Search, key: impl Fn(u32) -> Option<u64>) -> i64 {
    if search.high <= search.low + 1 {
        return 1;
    }
    let middle = search.low + (search.high - search.low) / 2;
    match key(middle) {
        Some(key) if key <= search.target => search.low = middle,
        Some(_) => search.high = middle,
        None => {
            search.high = search.low;
            return 1;
        }
    }
    0
}

unsafe extern "C" fn mapping_step(_index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `find_mapping` passes its `Search`, whose process map value
    // stays valid for the program run.
    let search = unsafe { &mut *state.cast::<Search>() };
    let process = unsafe { &*search.process };
    halve(search, |index| process.mappings.get(index as usize).map(|mapping| mapping.start))
}

unsafe extern "C" fn row_step(_index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `find_row` passes its `Search`.
    let search = unsafe { &mut *state.cast::<Search>() };
    halve(search, |index| row(index).map(|row| row.pc as u64))
}

/// The mapping of `process` that holds `pc`.
#[inline(always)]
fn find_mapping(process: &ProcessUnwind, pc: u64) -> Option<UnwindMapping> {
    let len = (process.len as usize).min(MAX_UNWIND_MAPPINGS) as u32;
    let mut state = Search { process, target: pc, low: 0, high: len };
    search(&mut state, MAPPING_STEPS + 1, mapping_step);
    if state.low >= state.high {
        return None;
    }
    let mapping = *process.mappings.get(state.low as usize)?;
    (mapping.start <= pc && pc < mapping.end).then_some(mapping)
}

/// Row `index` of the `UNWIND_ROWS` array.
#[inline(always)]
fn row(index: u32) -> Option<UnwindRow> {
    let chunk = UNWIND_ROWS.get(index / UNWIND_CHUNK_ROWS as u32)?;
    chunk.rows.get(index as usize % UNWIND_CHUNK_ROWS).copied()
}

/// The row of `mapping`'s table that covers `pc`: the last with `row.pc <= pc`.
#[inline(always)]
fn find_row(mapping: UnwindMapping, pc: u32) -> Option<UnwindRow> {
    let end = mapping.first_row.checked_add(mapping.rows)?;
    let mut state = Search { process: core::ptr::null(), target: pc as u64, low: mapping.first_row, high: end };
    search(&mut state, ROW_STEPS + 1, row_step);
    if state.low >= state.high {
        return None;
    }
    let found = row(state.low)?;
    (found.pc <= pc && found.cfa_rule != unwind::CFA_NONE).then_some(found)
}
