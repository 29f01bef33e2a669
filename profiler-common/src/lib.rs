//! Everything that crosses the kernel/user boundary, defined once.
//!
//! The eBPF programs write these structs into maps and ring buffers and the
//! agent reads them back, so every type is `#[repr(C)]`, `Copy` and free of
//! padding surprises (fields ordered from widest to narrowest).
#![no_std]

/// Python frames recorded per sample; a deeper stack is cut and flagged
/// [`PY_TRUNCATED`], never silently.
pub const MAX_PY_FRAMES: usize = 160;
/// Kernel frames recorded per sample.
pub const MAX_KERNEL_FRAMES: usize = 64;
/// Native user frames recorded per sample: unwound from the `.eh_frame`
/// tables of the process's files when it has them, else the few leaf frames
/// `bpf_get_stack` finds without frame pointers.
pub const MAX_USER_FRAMES: usize = 128;
/// Threads of one interpreter looked at when searching a thread state.
pub const MAX_THREADS_SCANNED: usize = 256;

/// An offset that a CPython version does not have.
pub const NO_OFFSET: u16 = u16::MAX;
/// The most bytes the walker reads from one frame: every CPython's frame
/// fields it uses are within them (3.6's `f_lasti` ends at 128).
pub const MAX_FRAME_SPAN: usize = 128;

/// Where the fields the frame walker needs live, for one CPython build.
/// All offsets are in bytes from the start of the named struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// `_PyRuntimeState.interpreters.head`
    pub runtime_interpreters_head: u16,
    /// `PyInterpreterState.next`
    pub interp_next: u16,
    /// `PyInterpreterState.threads.head`
    pub interp_threads_head: u16,
    /// `PyThreadState.next`
    pub tstate_next: u16,
    /// `PyThreadState.thread_id`: the `pthread_t` of the thread, which on
    /// x86-64 (glibc and musl) is its TLS block, i.e. the task's fs base.
    pub tstate_thread_id: u16,
    /// `PyThreadState.cframe` (3.10 to 3.12) or `PyThreadState.current_frame`
    /// (3.13+).
    pub tstate_frame: u16,
    /// `_PyCFrame.current_frame` when `tstate_frame` points at a `_PyCFrame`,
    /// else [`NO_OFFSET`].
    pub cframe_current_frame: u16,
    /// `_PyInterpreterFrame.f_code` (`f_executable` from 3.13).
    pub frame_code: u16,
    /// `_PyInterpreterFrame.previous`
    pub frame_previous: u16,
    /// `_PyInterpreterFrame.prev_instr` (`instr_ptr` from 3.13).
    pub frame_instr: u16,
    /// `_PyInterpreterFrame.owner`, or [`NO_OFFSET`].
    pub frame_owner: u16,
    /// `PyObject.ob_type`
    pub object_type: u16,
}

impl PyProcess {
    /// The bytes from the start of a frame that hold `previous`, the code
    /// object, the instruction, `owner` and `is_entry`; `None` when they are
    /// not within [`MAX_FRAME_SPAN`] or a pointer field is not 8-aligned
    /// (the walker reads them as aligned words).
    pub fn frame_span_of(offsets: &PyOffsets, frame_is_entry: u16) -> Option<u16> {
        let words = [offsets.frame_code, offsets.frame_previous, offsets.frame_instr];
        if words.iter().any(|offset| offset % 8 != 0) {
            return None;
        }
        let word_end = words.iter().map(|&offset| offset as usize + 8).max().unwrap_or(0);
        let byte_end = [offsets.frame_owner, frame_is_entry]
            .iter()
            .filter(|&&offset| offset != NO_OFFSET)
            .map(|&offset| offset as usize + 1)
            .max()
            .unwrap_or(0);
        let span = word_end.max(byte_end);
        (span <= MAX_FRAME_SPAN).then_some(span as u16)
    }
}

/// What the kernel needs to walk the Python stacks of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProcess {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Address of `PyCode_Type`: a frame whose code object has another type
    /// ends the walk with [`PY_BAD_CODE`].
    pub code_type: u64,
    pub offsets: PyOffsets,
    /// `owner` value of frames owned by the C stack (shim frames), skipped;
    /// `u8::MAX` when the version has none.
    pub owner_cstack: u8,
    pub _pad0: u8,
    /// `_PyInterpreterFrame.is_entry` (3.11 only; [`NO_OFFSET`] otherwise).
    pub frame_is_entry: u16,
    /// Bytes the walker reads at once from the start of each frame: up to
    /// the end of the last field it uses ([`PyProcess::frame_span_of`]).
    pub frame_span: u16,
    pub _pad: [u8; 2],
    /// Address and size of the GIL's state (`struct _gil_runtime_state`),
    /// whose mutexes and condition variables are the futexes a thread waiting
    /// for the GIL blocks on; size 0 when unknown.
    pub gil: u64,
    pub gil_size: u64,
}

/// One Python frame as the kernel sees it; userspace turns it into a
/// qualified name, file and line by reading the code object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    /// Address of the frame's code object, with [`PY_ENTRY_FRAME`] set on
    /// the outermost frame of an evaluation-loop run.
    pub code: u64,
    /// Address of the instruction being executed.
    pub instr: u64,
}

/// Bit of [`PyFrame::code`] set on the first Python frame an evaluation-loop
/// run executed (3.11+, where one C call of `_PyEval_EvalFrameDefault` runs
/// Python-to-Python calls inline): how userspace matches the Python frames
/// to the native ones. Before 3.11 every frame is one such run.
pub const PY_ENTRY_FRAME: u64 = 1;

/// Outcome of the Python walk of one sample, in [`StackRecord::py_status`].
pub const PY_NOT_PYTHON: u32 = 0;
/// Walked to the first frame.
pub const PY_OK: u32 = 1;
/// The thread has no Python thread state (not yet, or C code only).
pub const PY_NO_THREAD: u32 = 2;
/// A pointer of the chain could not be read.
pub const PY_BAD_POINTER: u32 = 3;
/// A frame's code object is not a `PyCode_Type` object.
pub const PY_BAD_CODE: u32 = 4;
/// Deeper than [`MAX_PY_FRAMES`]: the outermost frames are missing.
pub const PY_TRUNCATED: u32 = 5;
/// The `previous` links loop: the chain is corrupt (or changed under us).
pub const PY_CYCLE: u32 = 6;

/// Record kinds of the `EVENTS` ring buffer; every record starts with its
/// kind and the process id, so samples and process events stay in order.
/// Each kind has its type; the four kinds that carry stacks share one layout,
/// [`StackRecord`].
pub mod kind {
    /// A [`super::CpuSample`]: a thread on the CPU.
    pub const SAMPLE: u32 = 1;
    /// A [`super::ProcessEvent`]: first sample of a process not seen before,
    /// or since its last exec. Userspace looks at it and, for CPython, fills
    /// `PY_PROCS`.
    pub const NEW_PROCESS: u32 = 2;
    /// A [`super::ProcessEvent`]: the process exited.
    pub const EXIT: u32 = 3;
    /// An [`super::OffCpuSample`]: a thread that was off the CPU for
    /// `off_cpu_ns`, taken as it returned to user space (or, when it was
    /// preempted, as it got the CPU back, without stacks).
    pub const OFF_CPU: u32 = 4;
    /// An [`super::AllocSample`]: an allocation sampled by bytes, `bytes`
    /// allocated at `address` (0 when its free cannot be tracked: the table
    /// of live allocations is full).
    pub const ALLOC: u32 = 5;
    /// An [`super::AllocSample`] of a pymalloc arena (`bytes`: its size)
    /// sampled by bytes, at `address` as for [`ALLOC`]. Userspace reads the
    /// headers of its pools to see what stays in use.
    pub const ARENA: u32 = 6;
    /// A [`super::MemoryEvent`]: a sampled allocation was freed.
    pub const FREE: u32 = 7;
}

/// How [`StackRecord::user_stack`] was taken.
pub mod unwound {
    /// By `bpf_get_stack`: garbage after the first frames without frame
    /// pointers.
    pub const NO_TABLES: u32 = 0;
    /// With the process's tables: every frame real.
    pub const TABLES: u32 = 1;
    /// With the process's tables, cut at an address in none of the mappings
    /// it was given (a library loaded since, most often): userspace reads
    /// the process's mappings again. It learns of new libraries this way,
    /// not by polling every process.
    pub const UNMAPPED: u32 = 2;
}

/// Why a thread was off the CPU, in [`StackRecord::wait`] of an
/// [`OffCpuSample`]: from the system call it
/// returns from, else preempted.
pub mod wait {
    /// Still runnable: another task had the CPU.
    pub const PREEMPTED: u32 = 0;
    /// Sleeping for a time (`nanosleep`, `select` without descriptors, ...).
    pub const SLEEP: u32 = 1;
    /// Waiting for a file, socket or pipe.
    pub const IO: u32 = 2;
    /// A futex wait: a lock, condition or event other than the GIL.
    pub const LOCK: u32 = 3;
    /// Any other system call.
    pub const OTHER: u32 = 4;
    /// Waiting for CPython's GIL.
    pub const GIL: u32 = 5;
}

/// The layout of the records that carry a thread's stacks: [`CpuSample`],
/// [`OffCpuSample`] and [`AllocSample`], told apart by `kind`. One layout,
/// as the kernel assembles all of them with one function in one per-CPU
/// scratch slot (too big for its stack) and copies it to the ring buffer
/// whole; the fields of another kind are 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackRecord {
    /// One of [`kind::SAMPLE`], [`kind::OFF_CPU`], [`kind::ALLOC`],
    /// [`kind::ARENA`].
    pub kind: u32,
    /// Process id (tgid) as the host sees it.
    pub pid: u32,
    /// `bpf_ktime_get_ns` at the sample.
    pub time_ns: u64,
    /// [`kind::OFF_CPU`]: the off-CPU time this sample stands for.
    pub off_cpu_ns: u64,
    /// [`kind::ALLOC`], [`kind::ARENA`]: the bytes allocated.
    pub bytes: u64,
    /// [`kind::ALLOC`], [`kind::ARENA`]: where; 0 when the free is not
    /// tracked.
    pub address: u64,
    /// The thread's context label set (the Python API's
    /// `profiler.labels(...)`), read from where the thread keeps it; 0 for
    /// none.
    pub label_set: u64,
    /// Thread id as the host sees it.
    pub tid: u32,
    pub cpu: u32,
    /// One of the `PY_*` constants.
    pub py_status: u32,
    /// Valid entries of `py_frames`, innermost first.
    pub py_len: u32,
    /// Valid entries of `kernel_stack`, innermost first; 0 but in
    /// [`kind::SAMPLE`] (another kind's would be the same probe path every
    /// time).
    pub kernel_len: u32,
    /// Valid entries of `user_stack`, innermost first.
    pub user_len: u32,
    /// [`kind::OFF_CPU`]: one of the [`wait`] constants.
    pub wait: u32,
    /// One of the [`unwound`] constants.
    pub user_unwound: u32,
    /// The thread's name (`comm`).
    pub comm: [u8; 16],
    pub kernel_stack: [u64; MAX_KERNEL_FRAMES],
    pub user_stack: [u64; MAX_USER_FRAMES],
    pub py_frames: [PyFrame; MAX_PY_FRAMES],
}

// The bytes the kernel writes per stack record; a change here is a change
// of the eBPF programs' scratch and ring-buffer use, and of their verifier
// figures.
const _: () = assert!(core::mem::size_of::<StackRecord>() == 4192);

/// The record types that are a [`StackRecord`] of one kind: each reads as
/// the record it wraps (`Deref`), and its doc says which fields its kind
/// uses.
macro_rules! stack_record_kind {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy)]
        pub struct $name(pub StackRecord);

        impl core::ops::Deref for $name {
            type Target = StackRecord;

            fn deref(&self) -> &StackRecord {
                &self.0
            }
        }
    };
}

stack_record_kind!(
    /// [`kind::SAMPLE`]: a thread on the CPU, with its kernel, native and
    /// Python stacks. `off_cpu_ns`, `bytes`, `address` and `wait` are 0.
    CpuSample
);
stack_record_kind!(
    /// [`kind::OFF_CPU`]: a thread back from `off_cpu_ns` off the CPU,
    /// waiting for `wait` (a [`wait`] constant), with the native and Python
    /// stacks it blocked with and no kernel stack. A preempted thread's
    /// (`wait` [`wait::PREEMPTED`]) has no stacks at all: `kernel_len`,
    /// `user_len` and `py_len` are 0, `py_status` [`PY_NOT_PYTHON`], and
    /// so are `label_set` (its thread's memory cannot be read from another
    /// task's context), `user_unwound`, `bytes` and `address`.
    OffCpuSample
);
stack_record_kind!(
    /// [`kind::ALLOC`] or [`kind::ARENA`]: `bytes` allocated at `address`
    /// (0 when its free is not tracked), sampled by bytes, with the native
    /// and Python stacks of the allocating thread and no kernel stack.
    AllocSample
);

/// A change in the life of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    /// [`kind::NEW_PROCESS`] or [`kind::EXIT`]
    pub kind: u32,
    pub pid: u32,
    /// The process's name (its main thread's `comm`), which names it even if
    /// it exits before userspace looks at it.
    pub comm: [u8; 16],
}

/// The free of a sampled allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEvent {
    /// [`kind::FREE`]
    pub kind: u32,
    pub pid: u32,
    pub address: u64,
}

/// Key of the `LIVE` map: a sampled allocation not yet freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub pid: u32,
    pub _pad: u32,
    pub address: u64,
}

/// Entries of the `ALLOC_BUDGETS` array: byte budgets between two sampled
/// allocations, exponentially distributed quantiles that the kernel picks
/// at random.
pub const ALLOC_BUDGETS: u32 = 1024;

/// Threads a process started and ended (its leader aside), counted per CPU
/// by the kernel in `THREAD_TALLY` from its exec or from when the agent
/// started, whichever is later: userspace sums the CPUs and takes the
/// difference per period.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTally {
    pub started: u32,
    pub ended: u32,
}

/// One row of a compact unwind table, made from an ELF file's `.eh_frame` or
/// `.debug_frame`: from `pc` up to the next row's `pc`, how to find the
/// caller's frame on x86-64. `pc` is an address of the file as its symbols
/// and program headers give it (a process adds the load bias); rows of a file
/// are sorted by `pc`, and a gap between functions is a row of
/// [`unwind::CFA_NONE`]. The return address is always at CFA - 8 (x86-64's
/// ABI); a function whose CFI says otherwise gets [`unwind::CFA_UNSUPPORTED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    /// Added to the register of `cfa_rule` to give the CFA.
    pub cfa_offset: i16,
    /// With [`unwind::RBP_AT_CFA`]: the caller's rbp is saved at CFA + this.
    pub rbp_offset: i16,
    /// One of the `unwind::CFA_*` rules.
    pub cfa_rule: u8,
    /// One of the `unwind::RBP_*` rules.
    pub rbp_rule: u8,
    pub _pad: u16,
}

/// Rows per entry of the `UNWIND_ROWS` array: tables are written a chunk
/// per system call, and a table takes whole, consecutive chunks.
pub const UNWIND_CHUNK_ROWS: usize = 512;
/// Entries of `UNWIND_ROWS`: 4096 chunks of 512 rows of 12 bytes, 24 MiB for
/// every table of every process on the host (libc is 28,000 rows,
/// libpython 3.11 about 60,000).
pub const UNWIND_CHUNKS: u32 = 4096;
/// Executable file mappings per process that get a table; more are unwound
/// no further than their first frame.
pub const MAX_UNWIND_MAPPINGS: usize = 96;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwindChunk {
    pub rows: [UnwindRow; UNWIND_CHUNK_ROWS],
}

/// An executable mapping of a file whose table is loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Address in the process minus address in the file.
    pub bias: u64,
    /// The table: rows `first_row..first_row + rows` of `UNWIND_ROWS`,
    /// counted across chunks.
    pub first_row: u32,
    pub rows: u32,
}

/// The mappings of one process that the kernel can unwind through, sorted
/// by `start`: the value of `UNWIND_PROCS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessUnwind {
    pub len: u32,
    /// Changes whenever userspace writes the process's mappings: rows the
    /// kernel remembers for an address are valid for one generation.
    pub generation: u32,
    pub mappings: [UnwindMapping; MAX_UNWIND_MAPPINGS],
}

/// Rules of [`UnwindRow`].
pub mod unwind {
    /// No unwind information covers this address: the walk stops here.
    pub const CFA_NONE: u8 = 0;
    /// CFA = rsp + offset.
    pub const CFA_RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const CFA_RBP: u8 = 2;
    /// A PLT stub's expression: CFA = rsp + 8, + 8 more when
    /// `(pc & 15) >= 11` (after the stub's push).
    pub const CFA_PLT: u8 = 3;
    /// The outermost frame (its return address is undefined: `_start`,
    /// `clone`): the walk ends, and the stack is whole.
    pub const CFA_END: u8 = 4;
    /// A rule the kernel does not evaluate (another DWARF expression or
    /// register): the walk stops, and the stack is counted as cut.
    pub const CFA_UNSUPPORTED: u8 = 5;

    /// The caller's rbp is this frame's rbp.
    pub const RBP_SAME: u8 = 0;
    /// The caller's rbp is saved at CFA + `rbp_offset`.
    pub const RBP_AT_CFA: u8 = 1;
}

/// Counters in the per-CPU `STATS` array, summed by userspace.
pub mod stat {
    /// Samples taken (idle CPUs excluded).
    pub const SAMPLES: u32 = 0;
    /// Samples lost because the `EVENTS` ring buffer was full.
    pub const SAMPLES_DROPPED: u32 = 1;
    /// Process events lost because the `EVENTS` ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 2;
    /// Thread states found by walking the interpreter's thread list.
    pub const THREAD_SCANS: u32 = 3;
    /// Off-CPU samples taken (kept waits, see `kind::OFF_CPU`).
    pub const OFF_CPU_SAMPLES: u32 = 4;
    /// Allocation and arena samples taken.
    pub const ALLOC_SAMPLES: u32 = 5;
    /// Sampled allocations whose free is not tracked: `LIVE` was full.
    pub const LIVE_OVERFLOW: u32 = 6;
    /// Native stacks unwound from tables (processes that have them).
    pub const UNWOUND_STACKS: u32 = 7;
    /// Of those, stacks cut short: an address without a table or row, a
    /// rule the kernel does not evaluate, unreadable stack memory, or more
    /// than `MAX_USER_FRAMES` frames.
    pub const UNWIND_CUT: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Global settings of the eBPF programs, set before load.
pub mod config {
    /// Name of the global that, when 1, limits sampling to the `TARGETS` map.
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    /// Name of the global holding the offset of `thread.fsbase` in
    /// `task_struct`, read from the kernel's BTF.
    pub const TASK_FSBASE_OFFSET: &str = "TASK_FSBASE_OFFSET";
    /// Likewise for `task_struct.group_leader`.
    pub const TASK_GROUP_LEADER_OFFSET: &str = "TASK_GROUP_LEADER_OFFSET";
    /// Likewise for `task_struct.comm`.
    pub const TASK_COMM_OFFSET: &str = "TASK_COMM_OFFSET";
    /// Likewise for `task_struct.pid` (the thread id).
    pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
    /// Likewise for `task_struct.tgid` (the process id).
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
    /// `task_struct.__state` (`state` before 5.14).
    pub const TASK_STATE_OFFSET: &str = "TASK_STATE_OFFSET";
    /// Name of the global holding the CPU sampling period in nanoseconds:
    /// shorter waits are kept with probability (wait / period).
    pub const SAMPLE_PERIOD_NS: &str = "SAMPLE_PERIOD_NS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data with explicit padding, valid for any bytes.
    unsafe impl aya::Pod for super::PyProcess {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadTally {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LiveKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnwindRow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnwindChunk {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessUnwind {}
}
