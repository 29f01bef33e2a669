//! CPython 3.13+ describes its own structs: `_PyRuntime` starts with
//! `_Py_DebugOffsets`, a cookie, the version, whether the build is
//! free-threaded, then the offsets of the fields that debuggers read.
//! Reading them instead of tables of our own keeps every patch release and
//! custom build right.
//!
//! The table's own shape changes between minor versions (CPython promises it
//! only within one), so [`SHAPES`] holds each known minor's, copied from its
//! headers. A newer minor is read with the newest shape and used only if
//! what it says holds together.

use super::layout::{BytesLayout, CodeLayout, GilLayout, InstrEncoding, Layout, LineTable, UnicodeLayout};
use crate::process::procmem::ProcessMemory;
use profiler_common::{PyOffsets, NO_OFFSET};

/// The first bytes of `_PyRuntime` when it starts with the debug offsets.
pub const COOKIE: &[u8; 8] = b"xdebugpy";
/// `cookie`, `version` and `free_threaded`, before the sections.
const HEADER_LEN: usize = 24;
/// `sizeof(struct _gil_runtime_state)` on x86-64 glibc, unchanged since 3.9
/// (the generated 3.9-3.12 layouts measure it).
const GIL_STATE_SIZE: u64 = 208;
/// Largest struct size believed; a larger one means a misread table.
const MAX_STRUCT_SIZE: u64 = 16 << 20;

/// A section of the table: its name and its fields, each a `uint64_t`.
type Section = (&'static str, &'static [&'static str]);

/// One minor version's `_Py_DebugOffsets`: its sections in order, up to the
/// last one read (later ones are left out).
struct Shape {
    /// The first minor version with this shape.
    minor: u8,
    sections: &'static [Section],
    /// `_PyInterpreterFrame.owner` of the entry frame that
    /// `_PyEval_EvalFrameDefault` pushes, which holds no code object:
    /// `FRAME_OWNED_BY_CSTACK` (3) in 3.13; 3.14 added
    /// `FRAME_OWNED_BY_INTERPRETER` as 3 and gave it to the entry frame
    /// (`FRAME_OWNED_BY_CSTACK` became 4, assigned nowhere), 3.15 dropped
    /// `FRAME_OWNED_BY_CSTACK`.
    entry_frame_owner: u8,
}

const RUNTIME_STATE: Section = ("runtime_state", &["size", "finalizing", "interpreters_head"]);
const INTERPRETER_STATE_314: Section = (
    "interpreter_state",
    &[
        "size",
        "id",
        "next",
        "threads_head",
        "threads_main",
        "gc",
        "imports_modules",
        "sysdict",
        "builtins",
        "ceval_gil",
        "gil_runtime_state",
        "gil_runtime_state_enabled",
        "gil_runtime_state_locked",
        "gil_runtime_state_holder",
        "code_object_generation",
        "tlbc_generation",
    ],
);
const THREAD_STATE_313: Section = (
    "thread_state",
    &["size", "prev", "next", "interp", "current_frame", "thread_id", "native_thread_id", "datastack_chunk", "status"],
);
const INTERPRETER_FRAME_314: Section = (
    "interpreter_frame",
    &["size", "previous", "executable", "instr_ptr", "localsplus", "owner", "stackpointer", "tlbc_index"],
);
const CODE_OBJECT_313: [&str; 10] = [
    "size",
    "filename",
    "name",
    "qualname",
    "linetable",
    "firstlineno",
    "argcount",
    "localsplusnames",
    "localspluskinds",
    "co_code_adaptive",
];
const CODE_OBJECT_314: Section = (
    "code_object",
    &[
        "size",
        "filename",
        "name",
        "qualname",
        "linetable",
        "firstlineno",
        "argcount",
        "localsplusnames",
        "localspluskinds",
        "co_code_adaptive",
        "co_tlbc",
    ],
);
const PYOBJECT: Section = ("pyobject", &["size", "ob_type"]);
const TYPE_OBJECT_313: Section = ("type_object", &["size", "tp_name", "tp_repr", "tp_flags"]);
const TUPLE_OBJECT: Section = ("tuple_object", &["size", "ob_item", "ob_size"]);
const LIST_OBJECT: Section = ("list_object", &["size", "ob_item", "ob_size"]);
const SET_OBJECT: Section = ("set_object", &["size", "used", "table", "mask"]);
const DICT_OBJECT: Section = ("dict_object", &["size", "ma_keys", "ma_values"]);
const FLOAT_OBJECT: Section = ("float_object", &["size", "ob_fval"]);
const LONG_OBJECT: Section = ("long_object", &["size", "lv_tag", "ob_digit"]);
const BYTES_OBJECT: Section = ("bytes_object", &["size", "ob_size", "ob_sval"]);
const UNICODE_OBJECT_313: Section = ("unicode_object", &["size", "state", "length", "asciiobject_size"]);

/// Known shapes, oldest first.
const SHAPES: [Shape; 3] = [
    // `Include/internal/pycore_runtime.h` of 3.13.0 (pyenv) and 3.13.18
    // (Debian's libpython3.13-dev): the same.
    Shape {
        minor: 13,
        sections: &[
            RUNTIME_STATE,
            (
                "interpreter_state",
                &[
                    "size",
                    "id",
                    "next",
                    "threads_head",
                    "gc",
                    "imports_modules",
                    "sysdict",
                    "builtins",
                    "ceval_gil",
                    "gil_runtime_state",
                    "gil_runtime_state_enabled",
                    "gil_runtime_state_locked",
                    "gil_runtime_state_holder",
                ],
            ),
            THREAD_STATE_313,
            ("interpreter_frame", &["size", "previous", "executable", "instr_ptr", "localsplus", "owner"]),
            ("code_object", &CODE_OBJECT_313),
            PYOBJECT,
            TYPE_OBJECT_313,
            TUPLE_OBJECT,
            LIST_OBJECT,
            DICT_OBJECT,
            FLOAT_OBJECT,
            LONG_OBJECT,
            BYTES_OBJECT,
            UNICODE_OBJECT_313,
        ],
        entry_frame_owner: 3,
    },
    // `Include/internal/pycore_debug_offsets.h` of 3.14.10 (Debian's
    // libpython3.14-dev).
    Shape {
        minor: 14,
        sections: &[
            RUNTIME_STATE,
            INTERPRETER_STATE_314,
            THREAD_STATE_313,
            INTERPRETER_FRAME_314,
            CODE_OBJECT_314,
            PYOBJECT,
            TYPE_OBJECT_313,
            TUPLE_OBJECT,
            LIST_OBJECT,
            SET_OBJECT,
            DICT_OBJECT,
            FLOAT_OBJECT,
            LONG_OBJECT,
            BYTES_OBJECT,
            UNICODE_OBJECT_313,
        ],
        entry_frame_owner: 3,
    },
    // `Include/internal/pycore_debug_offsets.h` of 3.15.2 (Debian's
    // libpython3.15-dev).
    Shape {
        minor: 15,
        sections: &[
            RUNTIME_STATE,
            INTERPRETER_STATE_314,
            (
                "thread_state",
                &[
                    "size",
                    "prev",
                    "next",
                    "interp",
                    "current_frame",
                    "base_frame",
                    "last_profiled_frame",
                    "last_profiled_frame_seq",
                    "thread_id",
                    "native_thread_id",
                    "datastack_chunk",
                    "status",
                    "holds_gil",
                    "gil_requested",
                    "current_exception",
                    "exc_state",
                ],
            ),
            ("err_stackitem", &["exc_value"]),
            INTERPRETER_FRAME_314,
            CODE_OBJECT_314,
            PYOBJECT,
            ("type_object", &["size", "tp_name", "tp_repr", "tp_flags", "tp_basicsize", "tp_dictoffset"]),
            ("heap_type_object", &["size", "ht_cached_keys"]),
            TUPLE_OBJECT,
            LIST_OBJECT,
            SET_OBJECT,
            DICT_OBJECT,
            FLOAT_OBJECT,
            LONG_OBJECT,
            BYTES_OBJECT,
            ("unicode_object", &["size", "state", "length", "asciiobject_size", "compactunicodeobject_size"]),
        ],
        entry_frame_owner: 3,
    },
];

impl Shape {
    /// Byte offset of `section.field` in the table.
    fn offset(&self, section: &str, field: &str) -> Option<usize> {
        let mut index = 0;
        for (name, fields) in self.sections {
            if *name == section {
                return Some(HEADER_LEN + 8 * (index + fields.iter().position(|f| *f == field)?));
            }
            index += fields.len();
        }
        None
    }

    /// Bytes of the table read.
    fn len(&self) -> usize {
        HEADER_LEN + 8 * self.sections.iter().map(|(_, fields)| fields.len()).sum::<usize>()
    }
}

/// What the debug offsets of one interpreter say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Described {
    /// `PY_VERSION_HEX`
    pub version_hex: u64,
    pub free_threaded: bool,
    pub layout: Layout,
}

/// Why debug offsets cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no debug offsets (no {:?} cookie)", std::str::from_utf8(COOKIE).unwrap())]
    NoCookie,
    /// A minor version newer than every known shape, whose table read with
    /// the newest shape does not hold together.
    #[error("CPython {} without known debug-offsets layout", release(*.0))]
    UnknownLayout(u64),
    #[error("CPython {} free-threaded: {}", release(*.0), FREE_THREADED_TLBC)]
    FreeThreaded(u64),
    #[error("CPython {}: inconsistent debug offsets: {}", release(*.0), .1)]
    Inconsistent(u64, String),
    #[error("reading the debug offsets: {0}")]
    Read(String),
}

/// Why free-threaded builds from 3.14 are not supported.
const FREE_THREADED_TLBC: &str = "its threads run private copies of the bytecode (co_tlbc), so \
     instruction pointers are not in the code object, and its strings keep their flags at other \
     bits: not supported yet";

/// `3.16.0a1`, `3.14.2`: the release `PY_VERSION_HEX` names.
fn release(hex: u64) -> String {
    let level = match (hex >> 4) & 0xf {
        0xa => "a",
        0xb => "b",
        0xc => "rc",
        _ => "",
    };
    let serial = if level.is_empty() { String::new() } else { (hex & 0xf).to_string() };
    format!("{}.{}.{}{level}{serial}", (hex >> 24) & 0xff, (hex >> 16) & 0xff, (hex >> 8) & 0xff)
}

/// Reads and checks the debug offsets of the `_PyRuntime` at `runtime`,
/// whose `PyCode_Type` is at `code_type`.
pub fn read(mem: &ProcessMemory, runtime: u64, code_type: u64) -> Result<Described, Error> {
    let io = |e: std::io::Error| Error::Read(e.to_string());
    let (version_hex, _) = header_fields(&mem.read_vec(runtime, HEADER_LEN).map_err(io)?)?;
    let (shape, known) = shape_of(version_hex)?;
    let bytes = mem.read_vec(runtime, shape.len()).map_err(io)?;
    let described = parse(&bytes)?;
    check_process(mem, &Table { shape, bytes: &bytes }, &described.layout, known, runtime, code_type)
        .map_err(rejection(version_hex, known))?;
    Ok(described)
}

/// The layout a table (the first bytes of `_PyRuntime`) describes.
pub fn parse(table: &[u8]) -> Result<Described, Error> {
    let (version_hex, free_threaded) = header_fields(table)?;
    let (shape, known) = shape_of(version_hex)?;
    let fail = rejection(version_hex, known);
    let free_threaded = match free_threaded {
        0 => false,
        1 => true,
        other => return Err(fail(format!("free_threaded is {other}"))),
    };
    let mut layout = Table { shape, bytes: table }.layout().map_err(fail)?;
    if free_threaded {
        // Runs without a GIL unless an extension asks for one.
        layout.gil = GilLayout::default();
    }
    if free_threaded && shape.offset("code_object", "co_tlbc").is_some() {
        return Err(Error::FreeThreaded(version_hex));
    }
    Ok(Described { version_hex, free_threaded, layout })
}

/// `version` and `free_threaded` of a table that starts with the cookie.
fn header_fields(table: &[u8]) -> Result<(u64, u64), Error> {
    let u64_at = |at: usize| table.get(at..at + 8).map(|b| u64::from_ne_bytes(b.try_into().unwrap()));
    match (table.get(..8), u64_at(8), u64_at(16)) {
        (Some(cookie), Some(version), Some(free_threaded)) if cookie == COOKIE => Ok((version, free_threaded)),
        _ => Err(Error::NoCookie),
    }
}

/// The shape to read the table of `version_hex` with, and whether it is that
/// minor's own.
fn shape_of(version_hex: u64) -> Result<(&'static Shape, bool), Error> {
    let (major, minor) = (version_hex >> 24, (version_hex >> 16) as u8);
    let newest = &SHAPES[SHAPES.len() - 1];
    match SHAPES.iter().rev().find(|shape| shape.minor <= minor) {
        Some(shape) if major == 3 && minor <= newest.minor => Ok((shape, shape.minor == minor)),
        _ if major == 3 && minor > newest.minor => Ok((newest, false)),
        _ => Err(Error::Inconsistent(version_hex, format!("version {version_hex:#x} has no debug offsets"))),
    }
}

/// The error for a table that fails a check: a newer minor's table may just
/// have another shape.
fn rejection(version_hex: u64, known: bool) -> impl Fn(String) -> Error {
    move |reason| if known { Error::Inconsistent(version_hex, reason) } else { Error::UnknownLayout(version_hex) }
}

/// A table read with a shape.
struct Table<'a> {
    shape: &'static Shape,
    bytes: &'a [u8],
}

impl Table<'_> {
    fn value(&self, section: &str, field: &str) -> Result<u64, String> {
        let at = self.shape.offset(section, field).ok_or_else(|| format!("no field {section}.{field}"))?;
        let bytes = self.bytes.get(at..at + 8).ok_or_else(|| format!("{section}.{field} is past the table"))?;
        Ok(u64::from_ne_bytes(bytes.try_into().unwrap()))
    }

    /// The offset `section.field`, checked to lie within the struct (whose
    /// size is `section.size`) with room for `width` bytes.
    fn offset(&self, section: &str, field: &str, width: u64) -> Result<u64, String> {
        let size = self.value(section, "size")?;
        let offset = self.value(section, field)?;
        if size == 0 || size > MAX_STRUCT_SIZE || offset.checked_add(width).is_none_or(|end| end > size) {
            return Err(format!("{section}.{field} is {offset} in a struct of {size} bytes"));
        }
        Ok(offset)
    }

    /// A pointer-sized field's offset, as the kernel takes it.
    fn kernel(&self, section: &str, field: &str) -> Result<u16, String> {
        let offset = self.offset(section, field, 8)?;
        u16::try_from(offset).map_err(|_| format!("{section}.{field} is {offset}, beyond what the kernel reads"))
    }

    fn layout(&self) -> Result<Layout, String> {
        let ascii_size = self.offset("unicode_object", "asciiobject_size", 0)?;
        // `PyCompactUnicodeObject` is `PyASCIIObject` then `utf8_length`
        // and `utf8`; 3.15 gives its size outright.
        let compact_size = match self.shape.offset("unicode_object", "compactunicodeobject_size") {
            Some(_) => self.offset("unicode_object", "compactunicodeobject_size", 0)?,
            None => ascii_size + 16,
        };
        Ok(Layout {
            kernel: PyOffsets {
                runtime_interpreters_head: self.kernel("runtime_state", "interpreters_head")?,
                interp_next: self.kernel("interpreter_state", "next")?,
                interp_threads_head: self.kernel("interpreter_state", "threads_head")?,
                tstate_next: self.kernel("thread_state", "next")?,
                tstate_thread_id: self.kernel("thread_state", "thread_id")?,
                tstate_frame: self.kernel("thread_state", "current_frame")?,
                cframe_current_frame: NO_OFFSET,
                frame_code: self.kernel("interpreter_frame", "executable")?,
                frame_previous: self.kernel("interpreter_frame", "previous")?,
                frame_instr: self.kernel("interpreter_frame", "instr_ptr")?,
                frame_owner: u16::try_from(self.offset("interpreter_frame", "owner", 1)?).unwrap_or(NO_OFFSET),
                object_type: self.kernel("pyobject", "ob_type")?,
            },
            owner_cstack: self.shape.entry_frame_owner,
            instr: InstrEncoding::Pointer,
            line_table: LineTable::Locations,
            code: CodeLayout {
                firstlineno: self.offset("code_object", "firstlineno", 4)?,
                filename: self.offset("code_object", "filename", 8)?,
                name: self.offset("code_object", "qualname", 8)?,
                linetable: self.offset("code_object", "linetable", 8)?,
                code_adaptive: self.offset("code_object", "co_code_adaptive", 0)?,
            },
            bytes: BytesLayout {
                size: self.offset("bytes_object", "ob_size", 8)?,
                data: self.offset("bytes_object", "ob_sval", 0)?,
            },
            unicode: UnicodeLayout {
                length: self.offset("unicode_object", "length", 8)?,
                state: self.offset("unicode_object", "state", 4)?,
                ascii_data: ascii_size,
                compact_data: compact_size,
            },
            gil: self.gil()?,
        })
    }

    /// The main interpreter's GIL state: `_PyRuntime` ends with the main
    /// interpreter (CPython keeps `_main_interpreter` its last field on
    /// purpose), whose `_gil` the table locates.
    fn gil(&self) -> Result<GilLayout, String> {
        let runtime_size = self.value("runtime_state", "size")?;
        let interp_size = self.value("interpreter_state", "size")?;
        let main_interpreter = runtime_size.checked_sub(interp_size).ok_or_else(|| {
            format!("the interpreter ({interp_size} bytes) is larger than the runtime ({runtime_size})")
        })?;
        let gil = self.offset("interpreter_state", "gil_runtime_state", GIL_STATE_SIZE)?;
        Ok(GilLayout { offset: main_interpreter + gil, size: GIL_STATE_SIZE })
    }
}

/// Checks a table against the process: `PyCode_Type` must say that code
/// objects are as large as the table says and, for a minor without a known
/// shape, the interpreter list must be readable.
fn check_process(
    mem: &ProcessMemory,
    table: &Table,
    layout: &Layout,
    known: bool,
    runtime: u64,
    code_type: u64,
) -> Result<(), String> {
    let read = |addr: u64| mem.read_u64(addr).map_err(|e| e.to_string());
    // `tp_basicsize` follows `tp_name` in every `PyTypeObject`; a code
    // object's fixed part ends where its bytecode starts.
    let basicsize = read(code_type + table.value("type_object", "tp_name")? + 8)?;
    if basicsize != layout.code.code_adaptive {
        return Err(format!("PyCode_Type's size is {basicsize}, co_code_adaptive {}", layout.code.code_adaptive));
    }
    if !known {
        let offsets = &layout.kernel;
        let interp = read(runtime + u64::from(offsets.runtime_interpreters_head))?;
        if interp == 0 {
            return Err("no interpreter yet".into());
        }
        read(interp + u64::from(offsets.interp_threads_head))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of `_PyRuntime` of real interpreters (see
    /// `tests/fixtures/README.md`).
    fn fixture(release: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/debug_offsets_{release}.bin", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// `fixture` with the 8 bytes at `at` replaced.
    fn patched(mut table: Vec<u8>, at: usize, value: u64) -> Vec<u8> {
        table[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        table
    }

    #[test]
    fn real_tables() {
        // (release, PY_VERSION_HEX, interpreters.head, thread_id, owner, co_code_adaptive,
        // the GIL's offset in `_PyRuntime`)
        let cases = [
            ("3.13.0", 0x030d00f0, 632, 152, 70, 200, 96104),
            ("3.13.18", 0x030d12f0, 632, 152, 70, 200, 96176),
            ("3.14.10", 0x030e0af0, 808, 152, 74, 208, 98536),
            ("3.15.2", 0x030f02f0, 936, 176, 74, 208, 128064),
        ];
        for (release, version_hex, interpreters_head, thread_id, owner, code_adaptive, gil) in cases {
            let described = parse(&fixture(release)).unwrap();
            assert_eq!((described.version_hex, described.free_threaded), (version_hex, false), "{release}");
            let layout = described.layout;
            assert_eq!(layout.gil, GilLayout { offset: gil, size: GIL_STATE_SIZE }, "{release}");
            let kernel = layout.kernel;
            assert_eq!(
                (kernel.runtime_interpreters_head, kernel.tstate_thread_id, kernel.frame_owner),
                (interpreters_head, thread_id, owner),
                "{release}"
            );
            // From 3.13 to 3.15 the frame and the objects keep their places.
            assert_eq!((kernel.tstate_frame, kernel.cframe_current_frame), (72, NO_OFFSET), "{release}");
            assert_eq!((kernel.frame_code, kernel.frame_previous, kernel.frame_instr), (0, 8, 56), "{release}");
            assert_eq!((kernel.tstate_next, kernel.object_type, layout.owner_cstack), (8, 8, 3), "{release}");
            let code = CodeLayout { firstlineno: 68, filename: 112, name: 128, linetable: 136, code_adaptive };
            assert_eq!(layout.code, code, "{release}");
            assert_eq!(layout.bytes, BytesLayout { size: 16, data: 32 }, "{release}");
            // 3.15 gives the compact size outright: the same as 3.13's and
            // 3.14's `asciiobject_size` + `utf8_length` + `utf8`.
            let unicode = UnicodeLayout { length: 16, state: 32, ascii_data: 40, compact_data: 56 };
            assert_eq!(layout.unicode, unicode, "{release}");
        }
    }

    #[test]
    fn a_newer_minor_is_read_with_the_newest_shape_if_it_holds() {
        let newest = fixture("3.15.2");
        let as_316 = parse(&patched(newest.clone(), 8, 0x031000a1)).unwrap();
        assert_eq!(as_316.layout, parse(&newest).unwrap().layout);

        // A field added to a section moves every later one.
        let shape = &SHAPES[SHAPES.len() - 1];
        let mut moved = patched(newest, 8, 0x031000a1);
        let at = shape.offset("thread_state", "next").unwrap();
        moved.splice(at..at, 8u64.to_ne_bytes());
        let error = parse(&moved).unwrap_err();
        assert_eq!(error, Error::UnknownLayout(0x031000a1));
        assert_eq!(error.to_string(), "CPython 3.16.0a1 without known debug-offsets layout");
    }

    #[test]
    fn free_threaded_builds() {
        let free_threaded_313 = parse(&patched(fixture("3.13.0"), 16, 1)).unwrap();
        assert!(free_threaded_313.free_threaded);
        assert_eq!(free_threaded_313.layout.gil, GilLayout::default());
        let error = parse(&patched(fixture("3.14.10"), 16, 1)).unwrap_err();
        assert_eq!(error, Error::FreeThreaded(0x030e0af0));
        assert!(error.to_string().starts_with("CPython 3.14.10 free-threaded: "), "{error}");
        assert!(matches!(parse(&patched(fixture("3.14.10"), 16, 7)), Err(Error::Inconsistent(..))));
    }

    #[test]
    fn not_debug_offsets() {
        assert_eq!(parse(&[0; 64]), Err(Error::NoCookie));
        assert_eq!(parse(&fixture("3.13.0")[..20]), Err(Error::NoCookie));
        // Cut short: the fields past the end are missing.
        assert!(matches!(parse(&fixture("3.13.0")[..300]), Err(Error::Inconsistent(..))));
        assert!(matches!(parse(&patched(fixture("3.13.0"), 8, 0x030c01f0)), Err(Error::Inconsistent(..))));
    }

    #[test]
    fn release_names() {
        assert_eq!(release(0x031000a1), "3.16.0a1");
        assert_eq!(release(0x030e0af0), "3.14.10");
        assert_eq!(release(0x030f00c2), "3.15.0rc2");
    }
}
