//! The CPython frame walker: from the sampled thread to its thread state, then
//! along `_PyInterpreterFrame.previous`, recording (code object, instruction)
//! per frame. Offsets come from userspace per process, so this code knows no
//! CPython version.
//!
//! Both walks are `bpf_loop` callbacks: the verifier checks one step instead
//! of every unrolled iteration, which keeps deep stacks within its limits.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{self, bpf_loop},
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use profiler_common::{
    stat, PyFrame, PyProcess, StackRecord, MAX_FRAME_SPAN, MAX_PY_FRAMES, MAX_THREADS_SCANNED, NO_OFFSET, PY_BAD_CODE,
    PY_BAD_POINTER, PY_CYCLE, PY_ENTRY_FRAME, PY_NO_THREAD, PY_OK, PY_TRUNCATED,
};

/// Offset of `thread.fsbase` in `task_struct`, from the kernel's BTF.
#[no_mangle]
static TASK_FSBASE_OFFSET: u64 = 0;

/// Interpreters of one process looked at (subinterpreters are rare).
const MAX_INTERPRETERS: u32 = 4;
/// Shim frames (owned by the C stack) skipped on top of the recorded ones.
const MAX_SKIPPED_FRAMES: u32 = 16;
/// How long a thread found without a thread state is not searched again.
const NO_THREAD_RETRY_NS: u64 = 100_000_000;
/// A `PY_*` status meaning "not finished yet".
const WALKING: u32 = u32::MAX;
/// Low bits of a code object pointer that may be tags (3.14's `_PyStackRef`);
/// objects are at least 8-byte aligned, so they are never address bits.
const POINTER_TAG_BITS: u64 = 7;

#[repr(C)]
#[derive(Clone, Copy)]
struct ThreadEntry {
    /// The thread's `PyThreadState`, or 0 when none was found.
    tstate: u64,
    /// When `tstate` was found (or found missing).
    checked_ns: u64,
}

/// Thread id → thread state, so the thread list is walked once per thread.
#[map]
static THREADS: LruHashMap<u32, ThreadEntry> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, u32> {
    // SAFETY: the helper faults safely on any address.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| PY_BAD_POINTER)
}

#[inline(always)]
fn field(base: u64, offset: u16) -> u64 {
    base + offset as u64
}

/// Runs `step(state)` up to `count` times, until it returns 1.
#[inline(always)]
fn repeat<T>(count: u32, step: unsafe extern "C" fn(u64, *mut c_void) -> i64, state: &mut T) {
    // SAFETY: `step` takes a `*mut T`, which `state` is.
    unsafe { bpf_loop(count, step as *mut c_void, (state as *mut T).cast(), 0) };
}

/// The `pthread_t` of the current thread: on x86-64 its TLS block, which the
/// kernel keeps as the task's fs base. CPython stores the same value in
/// `PyThreadState.thread_id` for every version, in any PID namespace.
fn current_pthread() -> Option<u64> {
    // SAFETY: global written by the loader only.
    let offset = unsafe { core::ptr::read_volatile(&TASK_FSBASE_OFFSET) };
    if offset == 0 {
        return None;
    }
    // SAFETY: reading the current task, which outlives this program run.
    unsafe { bpf_probe_read_kernel((bpf_get_current_task() + offset) as *const u64) }.ok()
}

fn thread_state(process: &PyProcess, tid: u32) -> Result<u64, u32> {
    let pthread = current_pthread().ok_or(PY_NO_THREAD)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: LRU values are plain data; a concurrent update at worst makes
    // us search again.
    if let Some(entry) = unsafe { THREADS.get(tid) } {
        if entry.tstate == 0 {
            if now.wrapping_sub(entry.checked_ns) < NO_THREAD_RETRY_NS {
                return Err(PY_NO_THREAD);
            }
        } else if read::<u64>(field(entry.tstate, process.offsets.tstate_thread_id)) == Ok(pthread) {
            return Ok(entry.tstate);
        }
    }
    crate::maps::count(stat::THREAD_SCANS);
    let mut scan = ThreadScan { process, pthread, interp: 0, tstate: 0, found: 0 };
    scan.interp = read(field(process.runtime, process.offsets.runtime_interpreters_head)).unwrap_or(0);
    scan.tstate = read(field(scan.interp, process.offsets.interp_threads_head)).unwrap_or(0);
    repeat(MAX_THREADS_SCANNED as u32 + MAX_INTERPRETERS, scan_step, &mut scan);
    let _ = THREADS.insert(tid, ThreadEntry { tstate: scan.found, checked_ns: now }, 0);
    if scan.found == 0 {
        Err(PY_NO_THREAD)
    } else {
        Ok(scan.found)
    }
}

/// A search of every interpreter's thread list for the thread state whose
/// `thread_id` is `pthread`; this finds threads that don't hold the GIL.
/// Walk states hold the process's map value by pointer, not a copy: every
/// byte of a `bpf_loop` caller's stack counts in the verifier's 512-byte
/// budget for the whole call chain.
#[repr(C)]
struct ThreadScan {
    process: *const PyProcess,
    pthread: u64,
    interp: u64,
    tstate: u64,
    found: u64,
}

unsafe extern "C" fn scan_step(_index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `repeat` passes the `ThreadScan` it was given.
    let scan = unsafe { &mut *state.cast::<ThreadScan>() };
    // SAFETY: a map value, valid for the program run.
    let off = unsafe { &(*scan.process).offsets };
    if scan.tstate == 0 {
        // End of this interpreter's threads: on to the next interpreter.
        if scan.interp == 0 {
            return 1;
        }
        scan.interp = read(field(scan.interp, off.interp_next)).unwrap_or(0);
        if scan.interp == 0 {
            return 1;
        }
        scan.tstate = read(field(scan.interp, off.interp_threads_head)).unwrap_or(0);
        return 0;
    }
    if read::<u64>(field(scan.tstate, off.tstate_thread_id)) == Ok(scan.pthread) {
        scan.found = scan.tstate;
        return 1;
    }
    scan.tstate = read(field(scan.tstate, off.tstate_next)).unwrap_or(0);
    0
}

fn current_frame(process: &PyProcess, tstate: u64) -> Result<u64, u32> {
    let off = &process.offsets;
    let frame_holder = read::<u64>(field(tstate, off.tstate_frame))?;
    if off.cframe_current_frame == NO_OFFSET || frame_holder == 0 {
        return Ok(frame_holder);
    }
    read(field(frame_holder, off.cframe_current_frame))
}

/// What a walk keeps per CPU and program (see `record::CPU_SLOT`): the
/// header of the frame being read, the frame read last, and the code
/// objects whose type was checked. Not on the stack, whose 512 bytes the
/// verifier counts over the whole call chain.
#[repr(C)]
struct WalkScratch {
    header: [u64; HEADER_WORDS],
    /// The last frame read, recorded when the next one is: whether it is an
    /// entry frame is known only then on 3.12+ (its caller is a shim).
    pending: PyFrame,
    has_pending: u64,
    checked: [CheckedCode; CHECKED_CODES],
}

/// A code object found to be one, in process `pid`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CheckedCode {
    code: u64,
    pid: u32,
    _pad: u32,
}

/// Code objects remembered per CPU, by address: most stacks repeat a few
/// functions, so most frames need no read of their code object's type. A
/// freed code object's address may come back as another object; userspace
/// checks every code object's type again when it reads it.
const CHECKED_CODES: usize = 64;

#[map]
static WALK_SCRATCH: PerCpuArray<WalkScratch> = PerCpuArray::with_max_entries(3, 0);

/// The frame walk in progress; frames go to `sample.py_frames`.
#[repr(C)]
struct FrameWalk {
    process: *const PyProcess,
    sample: *mut StackRecord,
    scratch: *mut WalkScratch,
    frame: u64,
    /// A frame seen earlier, moved at every power-of-two step (Brent's cycle
    /// detection): meeting it again means the chain loops.
    checkpoint: u64,
    steps: u32,
    len: u32,
    status: u32,
}

unsafe extern "C" fn frame_step(_index: u64, state: *mut c_void) -> i64 {
    // SAFETY: `repeat` passes the `FrameWalk` it was given.
    let walk = unsafe { &mut *state.cast::<FrameWalk>() };
    match step(walk) {
        Ok(()) => 0,
        Err(status) => {
            walk.status = status;
            1
        }
    }
}

/// Words of a frame's header.
const HEADER_WORDS: usize = MAX_FRAME_SPAN / 8;

/// The word at byte `offset` of a frame's header. Userspace only sends
/// aligned offsets within the span (`PyProcess::frame_span_of`); the mask
/// (not a check, which the compiler may apply to a copy of the register)
/// shows the verifier the bound.
#[inline(always)]
fn word(header: &[u64; HEADER_WORDS], offset: u16) -> u64 {
    header[(offset as usize / 8) % HEADER_WORDS]
}

/// The byte at `offset` of a frame's header, bounded like [`word`].
#[inline(always)]
fn byte(header: &[u64; HEADER_WORDS], offset: u16) -> u8 {
    (word(header, offset) >> ((offset % 8) * 8)) as u8
}

/// Reads the first `span` bytes of the frame at `frame`: one read for every
/// field the walk uses.
#[inline(always)]
fn read_header(frame: u64, span: u16, header: &mut [u64; HEADER_WORDS]) -> Result<(), u32> {
    let span = span as u32;
    if span == 0 || span > MAX_FRAME_SPAN as u32 {
        return Err(PY_BAD_POINTER);
    }
    // SAFETY: `header` has room for `MAX_FRAME_SPAN` bytes; the helper faults
    // safely on any source address.
    let result = unsafe { generated::bpf_probe_read_user(header.as_mut_ptr().cast(), span, frame as *const c_void) };
    if result == 0 {
        Ok(())
    } else {
        Err(PY_BAD_POINTER)
    }
}

/// Whether `code` is a code object, from the remembered ones or its type.
#[inline(always)]
fn check_code(walk: &FrameWalk, process: &PyProcess, code: u64) -> Result<(), u32> {
    // SAFETY: a map value, valid for the program run, of this CPU and program.
    let checked = unsafe { &mut (*walk.scratch).checked };
    let slot = &mut checked[((code >> 4) ^ (code >> 10)) as usize % CHECKED_CODES];
    // SAFETY: the per-CPU scratch sample.
    let pid = unsafe { (*walk.sample).pid };
    if slot.code == code && slot.pid == pid {
        return Ok(());
    }
    if read::<u64>(field(code, process.offsets.object_type)) != Ok(process.code_type) {
        return Err(PY_BAD_CODE);
    }
    *slot = CheckedCode { code, pid, _pad: 0 };
    Ok(())
}

/// Appends the pending frame, if any, to `sample.py_frames`.
#[inline(always)]
fn record_pending(walk: &mut FrameWalk) -> Result<(), u32> {
    // SAFETY: this CPU's and program's scratch.
    let scratch = unsafe { &mut *walk.scratch };
    if scratch.has_pending == 0 {
        return Ok(());
    }
    let len = walk.len as usize;
    if len >= MAX_PY_FRAMES {
        return Err(PY_TRUNCATED);
    }
    // SAFETY: `sample` points at the per-CPU scratch sample, and `len` is
    // within `py_frames`.
    unsafe { *(*walk.sample).py_frames.as_mut_ptr().add(len) = scratch.pending };
    scratch.has_pending = 0;
    walk.len += 1;
    Ok(())
}

/// Reads the current frame and moves to the previous one; `Err` ends the
/// walk with that status.
#[inline(always)]
fn step(walk: &mut FrameWalk) -> Result<(), u32> {
    if walk.frame == 0 {
        return Err(PY_OK);
    }
    // SAFETY: a map value, valid for the program run.
    let process = unsafe { &*walk.process };
    let off = &process.offsets;
    // SAFETY: as above, this CPU's and program's.
    let scratch = unsafe { &mut *walk.scratch };
    read_header(walk.frame, process.frame_span, &mut scratch.header)?;
    let header = &scratch.header;
    let previous = word(header, off.frame_previous);
    if off.frame_owner != NO_OFFSET && byte(header, off.frame_owner) == process.owner_cstack {
        // 3.12+: a shim frame, owned by the C stack: C code called the
        // frame read before it, which is an entry frame.
        scratch.pending.code |= PY_ENTRY_FRAME;
    } else {
        let mut code = word(header, off.frame_code) & !POINTER_TAG_BITS;
        let instr = word(header, off.frame_instr);
        // 3.11 flags a frame that C code called.
        if process.frame_is_entry != NO_OFFSET && byte(header, process.frame_is_entry) != 0 {
            code |= PY_ENTRY_FRAME;
        }
        record_pending(walk)?;
        check_code(walk, process, code & !PY_ENTRY_FRAME)?;
        // SAFETY: as above.
        let scratch = unsafe { &mut *walk.scratch };
        scratch.pending = PyFrame { code, instr };
        scratch.has_pending = 1;
    }
    walk.steps += 1;
    if walk.steps & (walk.steps - 1) == 0 {
        walk.checkpoint = walk.frame;
    }
    if previous != 0 && previous == walk.checkpoint {
        return Err(PY_CYCLE);
    }
    walk.frame = previous;
    Ok(())
}

/// Walks the Python stack of thread `tid` into `sample.py_frames`, innermost
/// first, setting `sample.py_len` and `sample.py_status`; `slot` is the
/// calling program's (see `record::CPU_SLOT`).
pub fn walk(process: &PyProcess, tid: u32, sample: *mut StackRecord, slot: u32) {
    let Some(scratch) = WALK_SCRATCH.get_ptr_mut(slot) else {
        // SAFETY: `sample` points at the per-CPU scratch sample.
        unsafe {
            (*sample).py_len = 0;
            (*sample).py_status = PY_TRUNCATED;
        }
        return;
    };
    let mut walk = FrameWalk { process, sample, scratch, frame: 0, checkpoint: 0, steps: 0, len: 0, status: WALKING };
    // SAFETY: this CPU's and program's scratch.
    unsafe { (*scratch).has_pending = 0 };
    match thread_state(process, tid).and_then(|tstate| current_frame(process, tstate)) {
        Ok(frame) => {
            walk.frame = frame;
            repeat(MAX_PY_FRAMES as u32 + MAX_SKIPPED_FRAMES + 1, frame_step, &mut walk);
        }
        Err(status) => walk.status = status,
    }
    let mut status = if walk.status == WALKING { PY_TRUNCATED } else { walk.status };
    if let Err(truncated) = record_pending(&mut walk) {
        if status == PY_OK {
            status = truncated;
        }
    }
    // SAFETY: `sample` points at the per-CPU scratch sample.
    unsafe {
        (*sample).py_len = walk.len;
        (*sample).py_status = status;
    }
}
