//! Whether a process runs CPython, and which: the ELF file that defines
//! `_PyRuntime`, its load address, and its version, read from the file or
//! from the process's memory.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    ops::Range,
    os::unix::fs::MetadataExt,
    sync::{Arc, LazyLock, Mutex},
};

use anyhow::{ensure, Context};
use object::{Object, ObjectSegment, ObjectSymbol};

use super::{Interpreter, Version};
use crate::process::{discovery::Mapping, procmem::ProcessMemory};

#[derive(Debug)]
pub enum PythonStatus {
    NotPython,
    Supported(Box<Interpreter>),
    /// CPython that cannot be profiled, and why.
    Unsupported(String),
    /// CPython that has not yet written down its version (before 3.11,
    /// `sys.version` appears in memory during start-up): look again soon; the
    /// reason holds if it never does.
    Starting(String),
}

/// What an ELF file that defines `_PyRuntime` tells, at link-time addresses.
#[derive(Debug)]
struct ElfFacts {
    /// `_PyRuntime`; before 3.7, which has none, the static `interp_head`
    /// (the head of the interpreter list, so the tables give 3.6 a
    /// `runtime_interpreters_head` of 0), found only in unstripped builds.
    runtime: u64,
    code_type: Option<u64>,
    /// `Py_Version` (3.11+).
    version_hex: Option<u64>,
    /// `_PyEval_EvalFrameDefault`, the evaluation loop, whose native frames
    /// the Python frames replace; None without the symbol or its size.
    eval_loop: Option<Range<u64>>,
    loads: Vec<LoadSegment>,
}

/// A `PT_LOAD` program header.
#[derive(Debug)]
struct LoadSegment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
}

/// ELF facts per file, None for files that are not a CPython interpreter,
/// so that 100 processes of one Python cost one parse.
type ElfCache = HashMap<FileKey, Option<Arc<ElfFacts>>>;
static ELF_CACHE: LazyLock<Mutex<ElfCache>> = LazyLock::new(Default::default);
/// Emptied when it reaches this size: files come and go with containers.
const MAX_CACHED_FILES: usize = 8192;

/// A file and its version, as `stat` of the path we read tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ns: i64,
}

/// Largest `.bss` searched for the version string of a CPython older than
/// 3.11; CPython's is well under 1 MiB.
const MAX_BSS_SCAN: u64 = 16 << 20;

pub fn find_python(pid: u32, mappings: &[Mapping]) -> io::Result<PythonStatus> {
    let mut seen = Vec::new();
    // A file mapped without execute permission is data, such as the agent's
    // own read-only view of a libpython it symbolizes.
    for mapping in mappings.iter().filter(|mapping| mapping.executable) {
        if seen.contains(&&mapping.file) {
            continue;
        }
        seen.push(&mapping.file);
        let Some(facts) = elf_facts(pid, mapping) else { continue };
        let file_mappings: Vec<&Mapping> = mappings.iter().filter(|m| m.file == mapping.file).collect();
        return interpreter(pid, &mapping.path, &facts, &file_mappings);
    }
    Ok(PythonStatus::NotPython)
}

/// The facts of the file of `mapping` if it is a CPython interpreter.
fn elf_facts(pid: u32, mapping: &Mapping) -> Option<Arc<ElfFacts>> {
    // Through the process's root, so that other mount namespaces work. The
    // mapping itself (which needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)
    // serves a file deleted since (" (deleted)"), and a chrooted process,
    // whose maps show paths from our root, not its own.
    let by_root = format!("/proc/{pid}/root{}", mapping.path);
    let by_mapping = format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end);
    let (path, file) = [by_root, by_mapping]
        .into_iter()
        .filter(|path| !mapping.path.ends_with(" (deleted)") || path.contains("/map_files/"))
        .find_map(|path| match File::open(&path) {
            Ok(file) => Some((path, file)),
            Err(e) => {
                log::debug!("opening {path}: {e}");
                None
            }
        })?;
    let meta = file.metadata().map_err(|e| log::debug!("stat of {path}: {e}")).ok()?;
    let key = FileKey { dev: meta.dev(), inode: meta.ino(), size: meta.size(), mtime_ns: mtime_ns(&meta) };

    let mut cache = ELF_CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(facts) = cache.get(&key) {
        return facts.clone();
    }
    let facts = match parse_elf(&file) {
        Ok(facts) => facts.map(Arc::new),
        Err(e) => {
            log::debug!("reading {path} as ELF: {e:#}");
            None
        }
    };
    if cache.len() >= MAX_CACHED_FILES {
        cache.clear();
    }
    cache.insert(key, facts.clone());
    facts
}

fn mtime_ns(meta: &fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

/// The facts of an ELF file defining `_PyRuntime`, Ok(None) for other files.
fn parse_elf(file: &File) -> anyhow::Result<Option<ElfFacts>> {
    // Mapped, not read: only the pages of the headers and symbol tables are
    // touched, and reading thousands of symbol names costs no system call.
    // SAFETY: the mapping is private and read-only; a file truncated under us
    // could fault, which the files processes run from are not.
    let data = unsafe { memmap2::Mmap::map(file) }.context("mapping the file")?;
    if !data.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let elf = object::File::parse(&*data).context("parsing ELF headers")?;
    let (mut runtime, mut code_type, mut version_hex, mut interp_head) = (None, None, None, None);
    let mut eval_loop = None;
    // Dynamic symbols survive stripping; `.symtab` has them otherwise.
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if !symbol.is_definition() {
            continue;
        }
        let slot = match symbol.name_bytes() {
            Ok(b"_PyEval_EvalFrameDefault") if symbol.size() > 0 => {
                let start = symbol.address();
                eval_loop.get_or_insert(start..start.saturating_add(symbol.size()));
                continue;
            }
            Ok(b"_PyRuntime") => &mut runtime,
            Ok(b"PyCode_Type") => &mut code_type,
            Ok(b"Py_Version") => &mut version_hex,
            Ok(b"interp_head") => &mut interp_head,
            _ => continue,
        };
        slot.get_or_insert(symbol.address());
    }
    // A local `interp_head` alone could be anybody's: with `PyCode_Type` it is CPython's.
    let Some(runtime) = runtime.or(interp_head.filter(|_| code_type.is_some())) else { return Ok(None) };
    let loads = elf
        .segments()
        .map(|segment| {
            let (offset, filesz) = segment.file_range();
            LoadSegment { vaddr: segment.address(), memsz: segment.size(), offset, filesz }
        })
        .collect::<Vec<_>>();
    ensure!(!loads.is_empty(), "no PT_LOAD segment");
    Ok(Some(ElfFacts { runtime, code_type, version_hex, eval_loop, loads }))
}

/// The interpreter of `path`, whose facts are `facts` and mappings
/// `mappings`; Err only when the process is gone.
fn interpreter(pid: u32, path: &str, facts: &ElfFacts, mappings: &[&Mapping]) -> io::Result<PythonStatus> {
    let Some(bias) = load_bias(facts, mappings) else {
        return Ok(PythonStatus::Unsupported(format!("CPython in {path}: cannot find its load address")));
    };
    let mem = ProcessMemory::new(pid);
    let version = match find_version(&mem, facts, bias) {
        Ok(Some(version)) => version,
        Ok(None) => {
            return Ok(PythonStatus::Starting(format!(
                "CPython in {path}: version not found (no Py_Version symbol, no sys.version in memory)"
            )))
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(e),
        Err(e) => return Ok(PythonStatus::Unsupported(format!("CPython in {path}: reading its version: {e}"))),
    };
    let Some(code_type) = facts.code_type else {
        return Ok(PythonStatus::Unsupported(format!("CPython {version} ({path}): no PyCode_Type symbol")));
    };
    let (runtime, code_type) = (bias.wrapping_add(facts.runtime), bias.wrapping_add(code_type));
    // 3.13+ describes itself; older versions have tables of ours.
    let interpreter = match Interpreter::from_debug_offsets(&mem, version, path.into(), runtime, code_type) {
        Ok(Some(interpreter)) => Ok(interpreter),
        Ok(None) => Interpreter::new(version, path.into(), runtime, code_type).map_err(|e| e.to_string()),
        Err(reason) => Err(reason),
    };
    Ok(match interpreter {
        Ok(mut interpreter) => {
            interpreter.eval_loop =
                facts.eval_loop.as_ref().map(|range| bias.wrapping_add(range.start)..bias.wrapping_add(range.end));
            PythonStatus::Supported(Box::new(interpreter))
        }
        Err(reason) => PythonStatus::Unsupported(reason),
    })
}

/// What to add to a link-time address of the file to get its run-time one.
///
/// A mapping at `start` of file offset `offset` holds the `PT_LOAD` segment
/// whose page-aligned offset is `offset`, and the segment's page-aligned
/// address is then at `start`. This is 0 for fixed-address executables
/// (`ET_EXEC`) and the load address for PIE executables and libraries.
fn load_bias(facts: &ElfFacts, mappings: &[&Mapping]) -> Option<u64> {
    let page_mask = !(page_size() - 1);
    mappings.iter().find_map(|mapping| {
        let segment = facts.loads.iter().find(|segment| segment.offset & page_mask == mapping.offset)?;
        Some(mapping.start.wrapping_sub(segment.vaddr & page_mask))
    })
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|size| size.is_power_of_two()).unwrap_or(4096)
}

/// The interpreter's version, from the binary rather than its file name.
///
/// 3.11+ has `Py_Version`, `PY_VERSION_HEX` as a constant. Older versions
/// have no such symbol, and `PY_VERSION` ("3.10.13") is not reliably found in
/// `.rodata`: the linker merges it into the tail of longer strings (pyenv's
/// ends "/root/.pyenv/versions/3.10.13"). But `Py_GetVersion` formats
/// `sys.version` ("3.10.13 (main, ...") at start-up into a static buffer in
/// `.bss`, so that is searched in the process's memory.
fn find_version(mem: &ProcessMemory, facts: &ElfFacts, bias: u64) -> io::Result<Option<Version>> {
    if let Some(version_hex) = facts.version_hex {
        return Ok(Some(Version::from_hex(mem.read_u64(bias.wrapping_add(version_hex))?)));
    }
    for segment in facts.loads.iter().filter(|segment| segment.memsz > segment.filesz) {
        let bss = bias.wrapping_add(segment.vaddr).wrapping_add(segment.filesz);
        let len = (segment.memsz - segment.filesz).min(MAX_BSS_SCAN);
        if let Some(version) = Version::find_version_string(&mem.read_vec(bss, len as usize)?) {
            return Ok(Some(version));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cpython::{install_hint, pyenv_build, skip_or_fail, FrameSymbolizer},
        process::discovery::inspect,
    };
    use profiler_common::{PyFrame, NO_OFFSET};
    use std::{
        io::{BufRead, BufReader},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
    };

    const SCRIPT: &str = "\
import sys, time

class Sleeper:
    def nap(self):
        print('ready', flush=True)
        time.sleep(60)

def main():
    Sleeper().nap()

main()
";

    /// A Python process running [`SCRIPT`], killed on drop.
    struct Sleeper {
        child: Child,
        /// The Python process: `child` or, in a container, its child.
        pid: u32,
        /// The script's directory, as the host sees it.
        dir: PathBuf,
        /// The script, as the Python process sees it.
        script: PathBuf,
    }

    impl Sleeper {
        /// Runs `python` of `root`; unless `root` is `/`, in a container: in
        /// new PID and mount namespaces, chrooted in `root`.
        fn start_in(root: &str, python: &str, name: &str) -> Sleeper {
            let inside = std::env::temp_dir().join(format!("ferroscope-test-{}-{name}", std::process::id()));
            let dir = Path::new(root).join(inside.strip_prefix("/").unwrap());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("sleeper.py"), SCRIPT).unwrap();
            let script = inside.join("sleeper.py");
            let mut command = Command::new(python);
            if root != "/" {
                command = Command::new("unshare");
                command.args(["--pid", "--mount", "--fork", "--kill-child", "chroot", root, python]);
            }
            let mut child = command.arg("-u").arg(&script).stdout(Stdio::piped()).spawn().unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line, "ready\n");
            let pid = match root {
                "/" => child.id(),
                _ => fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap(),
            };
            Sleeper { child, pid, dir, script }
        }

        fn pid(&self) -> u32 {
            self.pid
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// The frames of the first thread of the first interpreter, innermost
    /// first, walked as the eBPF program does.
    fn python_stack(pid: u32, interpreter: &Interpreter) -> Vec<PyFrame> {
        let mem = ProcessMemory::new(pid);
        let offsets = interpreter.kernel.offsets;
        let at = |addr: u64, offset: u16| mem.read_u64(addr + u64::from(offset)).unwrap();
        let interp = at(interpreter.kernel.runtime, offsets.runtime_interpreters_head);
        let thread = at(interp, offsets.interp_threads_head);
        let mut frame = at(thread, offsets.tstate_frame);
        if offsets.cframe_current_frame != NO_OFFSET {
            frame = at(frame, offsets.cframe_current_frame);
        }
        let mut frames = Vec::new();
        while frame != 0 && frames.len() < 100 {
            let shim = offsets.frame_owner != NO_OFFSET
                && at(frame, offsets.frame_owner) as u8 == interpreter.kernel.owner_cstack;
            if !shim {
                // 3.14's `_PyStackRef` keeps flags in the low bits.
                let code = at(frame, offsets.frame_code) & !7;
                assert_eq!(at(code, offsets.object_type), interpreter.kernel.code_type);
                frames.push(PyFrame { code, instr: at(frame, offsets.frame_instr) });
            }
            frame = at(frame, offsets.frame_previous);
        }
        frames
    }

    /// Checks that `python`, whose interpreter is in `binary`, is found to
    /// be CPython `version` (a prefix, e.g. "3.11.") and that its frames,
    /// walked with the offsets found, are named right.
    fn check_supported(python: &str, binary: &str, version: &str) {
        check_supported_in("/", python, binary, version)
    }

    /// [`check_supported`] for `python` of `root`, run as [`Sleeper::start_in`] does.
    fn check_supported_in(root: &str, python: &str, binary: &str, version: &str) {
        let host_path = Path::new(root).join(python.trim_start_matches('/'));
        if !host_path.exists() {
            skip_or_fail(&format!("{} is not installed", host_path.display()), &install_hint(root, python));
            return;
        }
        let sleeper = Sleeper::start_in(root, python, version);
        let info = inspect(sleeper.pid()).unwrap();
        assert_eq!(&*info.application, "sleeper.py");
        // Alone in its PID namespace, it is its pid 1.
        assert_eq!(info.namespace_pid, (root != "/").then_some(1));
        let PythonStatus::Supported(interpreter) = info.python else {
            panic!("{python}: {:?}", info.python);
        };
        assert!(interpreter.version.to_string().starts_with(version), "{python}: {}", interpreter.version);
        assert_eq!(interpreter.describe(), format!("CPython {} ({binary})", interpreter.version));
        check_eval_loop(sleeper.pid(), &interpreter, python);

        let mut symbolizer = FrameSymbolizer::new(sleeper.pid(), &interpreter);
        let mut named = |frames: Vec<PyFrame>| -> Vec<_> {
            frames
                .iter()
                .map(|frame| symbolizer.symbolize(frame).unwrap())
                .map(|frame| (frame.function.to_string(), frame.start_line, frame.line, frame.file.to_string()))
                .collect()
        };
        // "ready" is printed just before the sleep: give it time to get there.
        let mut frames = named(python_stack(sleeper.pid(), &interpreter));
        for _ in 0..100 {
            if frames.first().is_some_and(|top| top.2 == 6) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            frames = named(python_stack(sleeper.pid(), &interpreter));
        }
        // Qualified names from 3.11 (`co_qualname`), plain ones before.
        let nap = if interpreter.version.minor >= 11 { "Sleeper.nap" } else { "nap" };
        let file = sleeper.script.to_str().unwrap().to_owned();
        assert_eq!(
            frames,
            [(nap.into(), 4, 6, file.clone()), ("main".into(), 8, 9, file.clone()), ("<module>".into(), 1, 11, file)],
            "{python}"
        );
        // A bogus code object address gives no frame, and no panic.
        assert_eq!(symbolizer.symbolize(&PyFrame { code: 8, instr: 8 }), None);
    }

    /// That the evaluation loop's run-time range was found, and is where
    /// native symbolization finds `_PyEval_EvalFrameDefault` in `pid`.
    fn check_eval_loop(pid: u32, interpreter: &Interpreter, python: &str) {
        use crate::{native::symbolize::NativeSymbolizer, stack::NativeNames};
        let Some(range) = interpreter.eval_loop.clone() else {
            panic!("{python}: no _PyEval_EvalFrameDefault range");
        };
        assert!(range.start < range.end, "{python}: {range:x?}");
        let code = crate::process::discovery::code_ranges(pid).unwrap();
        assert!(
            code.iter().any(|mapped| mapped.start <= range.start && range.end <= mapped.end),
            "{python}: {range:x?} is not in its code {code:x?}"
        );
        let mut frames = Vec::new();
        NativeSymbolizer::new().user(pid, &[range.start, range.end - 1], &mut frames);
        let names: Vec<&str> = frames.iter().map(|frame| &*frame.function).collect();
        assert_eq!(names, ["_PyEval_EvalFrameDefault"; 2], "{python}: {range:x?}");
    }

    /// pyenv's build of 3.`minor`: a shared libpython, whose version before
    /// 3.11 comes from `sys.version` in its `.bss`.
    fn check_pyenv(minor: u8) {
        let Some(build) = pyenv_build(minor) else {
            let install = install_hint("/", &format!("/root/.pyenv/versions/3.{minor}/bin/python3.{minor}"));
            skip_or_fail(&format!("pyenv's CPython 3.{minor} is not installed"), &install);
            return;
        };
        check_supported(build.python.to_str().unwrap(), build.libpython.to_str().unwrap(), &build.version);
    }

    #[test]
    fn pyenv_python_3_7() {
        check_pyenv(7);
    }

    #[test]
    fn pyenv_python_3_8() {
        check_pyenv(8);
    }

    #[test]
    fn pyenv_python_3_9() {
        check_pyenv(9);
    }

    #[test]
    fn pyenv_python_3_10() {
        check_pyenv(10);
    }

    #[test]
    fn pyenv_python_3_11() {
        check_pyenv(11);
    }

    #[test]
    fn pyenv_python_3_12() {
        check_pyenv(12);
    }

    #[test]
    fn pyenv_python_3_13() {
        let libpython = "/root/.pyenv/versions/3.13.0/lib/libpython3.13.so.1.0";
        check_supported("/root/.pyenv/versions/3.13.0/bin/python3.13", libpython, "3.13.");
    }

    /// Debian unstable's static builds (3.14's has frame pointers), with
    /// another glibc, in a container; `cargo xtask setup --test` makes the root.
    #[test]
    fn debian_pythons_3_13_to_3_15_in_a_container() {
        const ROOT: &str = "/var/cache/ferroscope/debian-sid";
        for minor in 13..=15 {
            let python = format!("/usr/bin/python3.{minor}");
            // A chroot's maps show paths from the host's root.
            check_supported_in(ROOT, &python, &format!("{ROOT}{python}"), &format!("3.{minor}."));
        }
    }

    #[test]
    fn debian_python_311() {
        // Static, fixed-address and stripped: only dynamic symbols.
        check_supported("/usr/bin/python3.11", "/usr/bin/python3.11", "3.11.");
    }

    /// 3.6 has no `_PyRuntime` (its interpreters hang off a static
    /// `interp_head`): not found as CPython, so its native stacks are kept.
    #[test]
    fn pyenv_python_3_6() {
        check_pyenv(6);
    }

    #[test]
    fn not_python() {
        let mut child = Command::new("sleep").arg("10").spawn().unwrap();
        // Wait for the exec, after which the process is named `sleep`.
        for _ in 0..100 {
            match fs::read_to_string(format!("/proc/{}/comm", child.id())) {
                Ok(comm) if comm == "sleep\n" => break,
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        let info = inspect(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let info = info.unwrap();
        assert!(matches!(info.python, PythonStatus::NotPython), "{:?}", info.python);
        assert_eq!(&*info.application, "sleep");
        assert_eq!(&*info.process_name, "sleep");
    }

    /// The agent maps the libpython files it symbolizes read-only: that does
    /// not make it a CPython process.
    #[test]
    fn a_libpython_mapped_as_data_is_not_python() {
        let path = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0";
        let Ok(file) = File::open(path) else {
            skip_or_fail(&format!("{path} is not installed"), &install_hint("/", "/root/.pyenv/versions/3.11.7/"));
            return;
        };
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a fresh read-only private mapping, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let info = inspect(std::process::id());
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, len) };
        assert!(matches!(info.unwrap().python, PythonStatus::NotPython));
    }
}
