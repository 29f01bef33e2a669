//! What differs between CPython versions: struct layouts and encodings.
//!
//! A [`Layout`] comes from a table generated from CPython's headers (before
//! 3.13) or from the interpreter's own `_Py_DebugOffsets` (3.13+). Offsets
//! are for 64-bit release builds.

use profiler_common::{PyOffsets, NO_OFFSET};

/// `PyCodeObject` fields the symbolizer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub firstlineno: u64,
    pub filename: u64,
    /// The function's name: `co_qualname` from 3.11 (`Worker.crunch`), else
    /// `co_name` (`crunch`), the best the code object gives.
    pub name: u64,
    /// `co_linetable` (3.10+) or `co_lnotab` (before), in [`Layout::line_table`]'s format.
    pub linetable: u64,
    /// Start of the bytecode inline in the code object (`co_code_adaptive`),
    /// when [`Layout::instr`] is [`InstrEncoding::Pointer`]; else 0.
    pub code_adaptive: u64,
}

/// How a frame's position in its bytecode is recorded (`PyFrame::instr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstrEncoding {
    /// `PyFrameObject.f_lasti`, an `int` byte offset (3.6 to 3.9); the
    /// kernel reads 8 bytes, of which the low 4 count.
    LastiBytes,
    /// `PyFrameObject.f_lasti`, an `int` index in 2-byte code units (3.10).
    LastiUnits,
    /// A pointer to the instruction (`prev_instr` 3.11-3.12, `instr_ptr` 3.13+).
    Pointer,
}

/// How a code object maps bytecode offsets to lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTable {
    /// `co_lnotab`: (bytecode delta, signed line delta) byte pairs (3.6 to 3.9).
    Lnotab,
    /// `co_linetable` of PEP 626: (bytecode delta, signed line delta, -128
    /// for none) byte pairs (3.10).
    Pep626,
    /// `co_linetable` location table of PEP 657 (3.11+).
    Locations,
}

/// `PyBytesObject` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BytesLayout {
    pub size: u64,
    pub data: u64,
}

/// `PyASCIIObject` / `PyCompactUnicodeObject` fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnicodeLayout {
    pub length: u64,
    /// The `state` bit field: kind in bits 2-4, compact bit 5, ascii bit 6.
    pub state: u64,
    /// Characters of a compact ASCII string.
    pub ascii_data: u64,
    /// Characters of a compact non-ASCII string.
    pub compact_data: u64,
}

/// Everything version-specific about one CPython minor version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// What the eBPF frame walker needs.
    pub kernel: PyOffsets,
    /// `_PyInterpreterFrame.owner` of C-stack shim frames, `u8::MAX` if none.
    pub owner_cstack: u8,
    pub instr: InstrEncoding,
    pub line_table: LineTable,
    pub code: CodeLayout,
    pub bytes: BytesLayout,
    pub unicode: UnicodeLayout,
}

/// The layout of CPython `major.minor`, None when not supported.
pub fn layout(major: u8, minor: u8) -> Option<Layout> {
    match (major, minor) {
        (3, 11) => Some(PY311),
        _ => None,
    }
}

/// Verified against 3.11.7's `libpython3.11.so.1.0`.
const PY311: Layout = Layout {
    kernel: PyOffsets {
        runtime_interpreters_head: 40,
        interp_next: 0,
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_thread_id: 152,
        tstate_frame: 56,
        cframe_current_frame: 8,
        frame_code: 32,
        frame_previous: 48,
        frame_instr: 56,
        // `owner` is at 69, but 3.11 has no C-stack-owned frames to skip.
        frame_owner: NO_OFFSET,
        object_type: 8,
    },
    owner_cstack: u8::MAX,
    instr: InstrEncoding::Pointer,
    line_table: LineTable::Locations,
    code: CodeLayout { firstlineno: 72, filename: 112, name: 128, linetable: 136, code_adaptive: 184 },
    bytes: BytesLayout { size: 16, data: 32 },
    unicode: UnicodeLayout { length: 16, state: 32, ascii_data: 48, compact_data: 72 },
};
