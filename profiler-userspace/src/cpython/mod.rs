//! Everything Ferroscope knows of CPython, behind one facade: which versions
//! it profiles and their struct layouts (`layout`, `layouts`, generated, and
//! `debug_offsets` from 3.13), reading code objects and line tables (`code`,
//! `linetable`), the allocator's probe sites and pools (`allocator`,
//! `probe_sites`), and where Python frames go in a native stack (`merge`, at
//! the evaluation loop's frames, found by address).
//! The agent sees [`Interpreter`] (found in a process) and [`Instance`] (one
//! process profiled); a new CPython minor or allocator touches this module only.

mod allocator;
mod code;
mod debug_offsets;
mod detect;
mod instance;
mod layout;
mod linetable;
mod merge;
mod probe_sites;

pub use allocator::{arena_in_use, memory_sites, Pymalloc};
#[cfg(test)]
pub use code::FrameSymbolizer;
pub use detect::{find_python, PythonStatus};
pub use instance::{Instance, MemoryProbes};
#[cfg(test)]
pub use layout::{install_hint, pyenv_build, skip_or_fail};

use crate::process::procmem::ProcessMemory;
use layout::Layout;
use profiler_common::{PyProcess, MAX_FRAME_SPAN, NO_OFFSET};
use std::{fmt, ops::Range, sync::Arc};

/// A CPython release, e.g. 3.11.7.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
}

impl Version {
    /// From `PY_VERSION_HEX` (the `Py_Version` constant, 3.11+): 0xMMmmuuLS.
    pub fn from_hex(hex: u64) -> Version {
        Version { major: (hex >> 24) as u8, minor: (hex >> 16) as u8, micro: (hex >> 8) as u8 }
    }

    /// Finds `sys.version` as `Py_GetVersion` formats it, "3.10.13 (main,
    /// ...", in `bytes`: a NUL-terminated string starting with the version
    /// and its optional release suffix ("rc1", "+"), then " (".
    pub fn find_version_string(bytes: &[u8]) -> Option<Version> {
        (0..bytes.len()).filter(|&i| i == 0 || bytes[i - 1] == 0).find_map(|i| Self::parse_version_string(&bytes[i..]))
    }

    fn parse_version_string(text: &[u8]) -> Option<Version> {
        let (major, rest) = number(text, 1)?;
        let (minor, rest) = number(rest.strip_prefix(b".")?, 2)?;
        let (micro, rest) = number(rest.strip_prefix(b".")?, 2)?;
        let suffix = rest.iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'+').count();
        rest[suffix..].starts_with(b" (").then_some(Version { major, minor, micro })
    }
}

/// A decimal number of 1 to `max_digits` digits at the start of `text`.
fn number(text: &[u8], max_digits: usize) -> Option<(u8, &[u8])> {
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > max_digits {
        return None;
    }
    let value = std::str::from_utf8(&text[..digits]).ok()?.parse().ok()?;
    Some((value, &text[digits..]))
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// A CPython interpreter of a supported version, found in one process.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub version: Version,
    /// What the eBPF frame walker needs for this process.
    pub kernel: PyProcess,
    /// The object file that holds the interpreter (defines `_PyRuntime`),
    /// as the process maps it.
    pub path: Arc<str>,
    /// The run-time addresses of the evaluation loop's code
    /// (`_PyEval_EvalFrameDefault`), by which [`Instance`] finds its native
    /// frames; None when the file has no such symbol with a size, and they
    /// are found by name.
    pub eval_loop: Option<Range<u64>>,
    layout: Layout,
    /// A build without the GIL (`python3.13t`).
    free_threaded: bool,
}

/// Why a CPython interpreter cannot be profiled.
#[derive(Debug, thiserror::Error)]
#[error("CPython {version} ({path}): version not supported yet")]
pub struct UnsupportedVersion {
    pub version: Version,
    pub path: Arc<str>,
}

impl Interpreter {
    /// `runtime` and `code_type` are the run-time addresses of `_PyRuntime`
    /// and `PyCode_Type` in the process.
    pub fn new(
        version: Version,
        path: Arc<str>,
        runtime: u64,
        code_type: u64,
    ) -> Result<Interpreter, UnsupportedVersion> {
        let Some(layout) = layout::layout(version.major, version.minor) else {
            return Err(UnsupportedVersion { version, path });
        };
        Ok(Interpreter::with_layout(version, path, runtime, code_type, layout, false))
    }

    /// The interpreter of a process whose `_PyRuntime` starts with
    /// `_Py_DebugOffsets` (3.13+), which describe its structs; Ok(None) when
    /// it does not, Err why it cannot be profiled. `version` is
    /// `Py_Version`'s, which the table must repeat.
    pub fn from_debug_offsets(
        mem: &ProcessMemory,
        version: Version,
        path: Arc<str>,
        runtime: u64,
        code_type: u64,
    ) -> Result<Option<Interpreter>, String> {
        let described = match debug_offsets::read(mem, runtime, code_type) {
            Ok(described) => described,
            Err(debug_offsets::Error::NoCookie) => return Ok(None),
            Err(e) => return Err(format!("{e} ({path})")),
        };
        if Version::from_hex(described.version_hex) != version {
            return Err(format!(
                "CPython {version} ({path}): its debug offsets are those of {:#x}",
                described.version_hex
            ));
        }
        if PyProcess::frame_span_of(&described.layout.kernel, NO_OFFSET).is_none() {
            return Err(format!(
                "CPython {version} ({path}): its frame's fields are not within the {MAX_FRAME_SPAN} aligned bytes \
                 the kernel's walker reads"
            ));
        }
        Ok(Some(Interpreter::with_layout(version, path, runtime, code_type, described.layout, described.free_threaded)))
    }

    fn with_layout(
        version: Version,
        path: Arc<str>,
        runtime: u64,
        code_type: u64,
        layout: Layout,
        free_threaded: bool,
    ) -> Interpreter {
        // `bool is_entry` after `int stacktop`, which follows `prev_instr`;
        // only 3.11 has it (3.12 has shim frames instead).
        let frame_is_entry = if version.minor == 11 { layout.kernel.frame_instr + 12 } else { NO_OFFSET };
        let kernel = PyProcess {
            runtime,
            code_type,
            offsets: layout.kernel,
            owner_cstack: layout.owner_cstack,
            _pad0: 0,
            frame_is_entry,
            // Within bounds for every table (a test checks them all) and
            // checked on reading debug offsets; 0 makes the kernel refuse.
            frame_span: PyProcess::frame_span_of(&layout.kernel, frame_is_entry).unwrap_or(0),
            _pad: [0; 2],
            gil: runtime + layout.gil.offset,
            gil_size: layout.gil.size,
        };
        Interpreter { version, kernel, path, eval_loop: None, layout, free_threaded }
    }

    /// The geometry of pymalloc's pools, which `--memory` reads to tell the
    /// small objects in use in an arena; None for free-threaded builds,
    /// which allocate with mimalloc.
    pub fn pymalloc(&self) -> Option<Pymalloc> {
        match (self.version.minor, self.free_threaded) {
            (_, true) => None,
            // 16 KiB pools from 3.10 on 64-bit (`USE_LARGE_POOLS`, with the
            // radix tree); 16-byte alignment from 3.8.
            (10.., _) => Some(Pymalloc { pool_bytes: 16384, alignment: 16 }),
            (8 | 9, _) => Some(Pymalloc { pool_bytes: 4096, alignment: 16 }),
            _ => Some(Pymalloc { pool_bytes: 4096, alignment: 8 }),
        }
    }

    /// E.g. `CPython 3.11.7 (/usr/lib/libpython3.11.so.1.0)`, `CPython
    /// 3.13.1 free-threaded (/usr/bin/python3.13t)`.
    pub fn describe(&self) -> String {
        let build = if self.free_threaded { " free-threaded" } else { "" };
        format!("CPython {}{build} ({})", self.version, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_hex() {
        // 3.11.7 final.
        assert_eq!(Version::from_hex(0x030b07f0), Version { major: 3, minor: 11, micro: 7 });
    }

    #[test]
    fn version_string() {
        let v = |major, minor, micro| Some(Version { major, minor, micro });
        let find = |bytes: &[u8]| Version::find_version_string(bytes);
        assert_eq!(find(b"3.10.13 (main, Jan  1 2024, 00:00:00) [GCC 12.2.0]"), v(3, 10, 13));
        assert_eq!(find(b"xx\0\0garbage 3.8.1 (\x003.9.0rc1+ (default"), v(3, 9, 0));
        assert_eq!(find(b"\x003.9.18\0"), None);
        assert_eq!(find(b"\x0033.9.18 (x"), None);
        assert_eq!(find(b"\x003.9 (x"), None);
    }

    #[test]
    fn only_supported_versions_get_an_interpreter() {
        let path: Arc<str> = "/usr/bin/python3.5".into();
        let old = Version { major: 3, minor: 5, micro: 10 };
        let err = Interpreter::new(old, path.clone(), 0x1000, 0x2000).unwrap_err();
        assert_eq!(err.to_string(), "CPython 3.5.10 (/usr/bin/python3.5): version not supported yet");

        let v311 = Version { major: 3, minor: 11, micro: 2 };
        let interp = Interpreter::new(v311, "/usr/bin/python3.11".into(), 0x1000, 0x2000).unwrap();
        assert_eq!(interp.describe(), "CPython 3.11.2 (/usr/bin/python3.11)");
        assert_eq!(interp.kernel.runtime, 0x1000);
        assert_eq!(interp.kernel.code_type, 0x2000);
        assert_eq!(interp.kernel.owner_cstack, u8::MAX);
        assert_eq!(interp.kernel.offsets.runtime_interpreters_head, 40);
    }

    #[test]
    fn every_table_s_frame_fields_are_within_what_the_walker_reads() {
        for minor in 6..=12 {
            let version = Version { major: 3, minor, micro: 0 };
            let interp = Interpreter::new(version, "/usr/bin/python3".into(), 0x1000, 0x2000).unwrap();
            let span = usize::from(interp.kernel.frame_span);
            assert!(span > 0 && span <= MAX_FRAME_SPAN, "3.{minor}: {span}");
        }
        // 3.6's f_lasti is the farthest: a word at 120.
        let v36 = Interpreter::new(Version { major: 3, minor: 6, micro: 0 }, "/x".into(), 0, 0).unwrap();
        assert_eq!(v36.kernel.frame_span, 128);
    }
}
