//! Struct layouts of the supported CPython versions: one table entry each.
//!
//! Offsets are for 64-bit builds, read with gdb's `ptype /o` from the DWARF
//! of release builds (`--with-pydebug` builds differ and are not supported).

use profiler_common::{PyOffsets, NO_OFFSET};

/// `PyCodeObject` fields the symbolizer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub firstlineno: u64,
    pub filename: u64,
    pub qualname: u64,
    pub linetable: u64,
    /// Start of the bytecode, inline in the code object.
    pub code_adaptive: u64,
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
    code: CodeLayout { firstlineno: 72, filename: 112, qualname: 128, linetable: 136, code_adaptive: 184 },
    bytes: BytesLayout { size: 16, data: 32 },
    unicode: UnicodeLayout { length: 16, state: 32, ascii_data: 48, compact_data: 72 },
};
