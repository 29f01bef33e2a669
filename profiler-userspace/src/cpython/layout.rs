//! What differs between CPython versions: struct layouts and encodings.
//!
//! A [`Layout`] comes from a table generated from CPython's headers (before
//! 3.13) or from the interpreter's own `_Py_DebugOffsets` (3.13+). Offsets
//! are for 64-bit release builds.

use profiler_common::PyOffsets;

#[path = "layouts.rs"]
mod layouts;

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

impl InstrEncoding {
    /// The byte offset in the bytecode of the instruction `instr` of a frame
    /// whose bytecode starts at `bytecode`; None before the first instruction
    /// (f_lasti -1, or `prev_instr` one unit before the start).
    pub fn offset(self, instr: u64, bytecode: u64) -> Option<u64> {
        let lasti = || i64::from(instr as u32 as i32);
        let offset = match self {
            InstrEncoding::LastiBytes => lasti(),
            InstrEncoding::LastiUnits => lasti() * 2,
            InstrEncoding::Pointer => instr.wrapping_sub(bytecode) as i64,
        };
        u64::try_from(offset).ok()
    }
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
    /// Offset from `_PyRuntime` and size of the main interpreter's GIL state
    /// (`_PyRuntime.ceval.gil` up to 3.11, `_PyRuntime._main_interpreter._gil`
    /// from 3.12); size 0 when unknown (3.6, free-threaded builds).
    pub gil: GilLayout,
}

/// Where the GIL's state lies, from `_PyRuntime`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GilLayout {
    pub offset: u64,
    pub size: u64,
}

/// The layout of CPython `major.minor`, None when not supported. One layout
/// serves every patch release of a minor version: the generated table comes from
/// one patch per minor, and Debian's 3.11.2 is tested against 3.11.7's.
pub fn layout(major: u8, minor: u8) -> Option<Layout> {
    layouts::LAYOUTS.iter().find(|(version, _)| *version == (major, minor)).map(|(_, layout)| *layout)
}

/// What a unit test does when something it needs is not here (`missing`: an interpreter;
/// `install` says how to install it). A plain `cargo test` skips the test, saying so (on
/// stderr, past the test harness's capture, and in `$FERROSCOPE_SKIP_LOG`); under `cargo
/// xtask test`, which sets `FERROSCOPE_REQUIRE_ROOT_TESTS=1` (the machine it runs on has
/// everything), it is a failure, as in the end-to-end tests, unless `FERROSCOPE_ALLOW_SKIP=1`.
#[cfg(test)]
#[track_caller]
pub fn skip_or_fail(missing: &str, install: &str) {
    use std::io::Write;
    let set = |name: &str| std::env::var_os(name).is_some_and(|value| value == "1");
    let test = format!("ferroscope::{}", std::thread::current().name().unwrap_or("(unnamed test)"));
    if set("FERROSCOPE_REQUIRE_ROOT_TESTS") && !set("FERROSCOPE_ALLOW_SKIP") {
        panic!(
            "{test} cannot run: {missing}; {install}. (To skip the tests that need it instead of failing, set \
             FERROSCOPE_ALLOW_SKIP=1.)"
        );
    }
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {missing}; {install}");
    if let Some(log) = std::env::var_os("FERROSCOPE_SKIP_LOG") {
        let line = format!("ferroscope-skip: {test}: {missing}; {install}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .unwrap_or_else(|error| panic!("recording the skip in {}: {error}", log.to_string_lossy()));
    }
}

/// How to install the interpreter `python` (of `root`) the tests use.
#[cfg(test)]
pub fn install_hint(root: &str, python: &str) -> String {
    if root != "/" {
        return format!("run `cargo xtask setup --test`, which makes {root} with the Debian unstable CPythons it has");
    }
    match python.strip_prefix("/root/.pyenv/versions/").and_then(|rest| rest.split('/').next()) {
        Some(version) => {
            format!("install it with pyenv, as root: `PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {version}`")
        }
        None => format!("install it: `apt-get install {}`", python.rsplit('/').next().unwrap_or(python)),
    }
}

/// A pyenv build of CPython, for tests against real interpreters.
#[cfg(test)]
pub struct PyenvBuild {
    /// E.g. `3.7.16`
    pub version: String,
    pub python: std::path::PathBuf,
    /// Its shared `libpython3.X[m].so.1.0`, which holds the interpreter.
    pub libpython: std::path::PathBuf,
}

/// pyenv's build of CPython 3.`minor`, the newest patch release installed.
#[cfg(test)]
pub fn pyenv_build(minor: u8) -> Option<PyenvBuild> {
    let root = std::path::Path::new("/root/.pyenv/versions");
    let prefix = format!("3.{minor}.");
    let version = std::fs::read_dir(root)
        .ok()?
        .filter_map(|dir| dir.ok()?.file_name().into_string().ok())
        .filter_map(|name| Some((name.strip_prefix(&prefix)?.parse::<u32>().ok()?, name)))
        .max()?
        .1;
    let dir = root.join(&version);
    // Before 3.8 the library's name has the ABI flag: `libpython3.7m.so.1.0`.
    let libpython =
        ["", "m"].iter().map(|abi| dir.join(format!("lib/libpython3.{minor}{abi}.so.1.0"))).find(|lib| lib.exists())?;
    Some(PyenvBuild { python: dir.join(format!("bin/python3.{minor}")), libpython, version })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_offsets() {
        // The kernel reads 8 bytes at `f_lasti`: the `int` is the low 4.
        let lasti = |value: i32| u64::from(value as u32) | 0xdead_beef << 32;
        assert_eq!(InstrEncoding::LastiBytes.offset(lasti(10), 0), Some(10));
        assert_eq!(InstrEncoding::LastiBytes.offset(lasti(-1), 0), None);
        assert_eq!(InstrEncoding::LastiUnits.offset(lasti(5), 0), Some(10));
        assert_eq!(InstrEncoding::LastiUnits.offset(lasti(-1), 0), None);
        assert_eq!(InstrEncoding::Pointer.offset(0x1010, 0x1000), Some(16));
        assert_eq!(InstrEncoding::Pointer.offset(0xffe, 0x1000), None);
    }

    #[test]
    fn generated_minor_versions() {
        let minors: Vec<u8> = (0..=20).filter(|&minor| layout(3, minor).is_some()).collect();
        assert_eq!(minors, [6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(layout(2, 7), None);
    }
}
