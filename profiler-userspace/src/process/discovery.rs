//! What a process is: its names and, for CPython, where its interpreter is.
//!
//! The interpreter is the mapped ELF file that defines `_PyRuntime`: the
//! executable of a static build, `libpython3.X.so` of a shared one, or any
//! object that embeds CPython under another name.

use super::{
    containers::{self, Container},
    procmem::ProcessMemory,
};
use crate::cpython::{Interpreter, Version};
use anyhow::{ensure, Context};
use object::{Object, ObjectSegment, ObjectSymbol};
use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io,
    ops::Range,
    os::unix::fs::MetadataExt,
    sync::{Arc, LazyLock, Mutex},
};

/// What a process is.
#[derive(Debug)]
pub struct ProcessInfo {
    /// `/proc/PID/comm`
    pub process_name: Arc<str>,
    /// Default application name: the script or module for CPython, else the
    /// executable's name.
    pub application: Arc<str>,
    pub python: PythonStatus,
    /// Address ranges of executable mappings: a return address elsewhere is
    /// not one (stack garbage from unwinding without frame pointers).
    pub code: Vec<Range<u64>>,
    /// The process's id in its own PID namespace (a container's), when it
    /// differs from the host's.
    pub namespace_pid: Option<u32>,
    /// The container it runs in, from its cgroup.
    pub container: Option<Container>,
    /// The C library it maps (`libc.so.6`), as the process sees its path.
    pub libc: Option<String>,
    /// What it says of itself in its environment.
    pub own: OwnLabels,
}

/// An application's name and labels for itself, from its environment:
/// `FERROSCOPE_APPLICATION_NAME=checkout`, `FERROSCOPE_LABELS=tier=web,zone=b`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OwnLabels {
    pub application: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Reads [`OwnLabels`] from the NUL-separated `environ`; a bad label is
/// reported and left out, never fatal.
fn own_labels(pid: u32, environ: &[u8]) -> OwnLabels {
    let mut own = OwnLabels::default();
    for variable in environ.split(|&byte| byte == 0) {
        let variable = String::from_utf8_lossy(variable);
        if let Some(name) = variable.strip_prefix("FERROSCOPE_APPLICATION_NAME=") {
            own.application = Some(name.trim().to_owned()).filter(|name| !name.is_empty());
        } else if let Some(labels) = variable.strip_prefix("FERROSCOPE_LABELS=") {
            for pair in labels.split(',').filter(|pair| !pair.trim().is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let (key, value) = (key.trim(), value.trim());
                match crate::config::validate_label(key, value) {
                    Ok(()) => {
                        own.labels.insert(key.to_owned(), value.to_owned());
                    }
                    Err(error) => log::warn!("pid {pid}: FERROSCOPE_LABELS: {error}: left out"),
                }
            }
        }
    }
    own
}

#[derive(Debug)]
pub enum PythonStatus {
    NotPython,
    Supported(Interpreter),
    /// CPython that cannot be profiled, and why.
    Unsupported(String),
    /// CPython that has not yet written down its version (before 3.11,
    /// `sys.version` appears in memory during start-up): look again soon; the
    /// reason holds if it never does.
    Starting(String),
}

/// Threads alive in process `pid` (`/proc/PID/task`); None when it is gone.
pub fn live_threads(pid: u32) -> Option<u32> {
    Some(fs::read_dir(format!("/proc/{pid}/task")).ok()?.count() as u32)
}

/// Looks at process `pid`; fails when the process is gone.
pub fn inspect(pid: u32) -> io::Result<ProcessInfo> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
    let comm = comm.trim_end_matches('\n');
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))?;
    let args = split_cmdline(&cmdline);
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mappings = parse_maps(&maps);
    let python = find_python(pid, &mappings)?;
    let libc = mappings.iter().find(|mapping| is_libc(&mapping.path)).map(|mapping| mapping.path.clone());
    let is_python = !matches!(python, PythonStatus::NotPython);
    Ok(ProcessInfo {
        process_name: comm.into(),
        application: application_name(&args, comm, is_python).into(),
        python,
        code: executable_ranges(&maps),
        namespace_pid: namespace_pid(&fs::read_to_string(format!("/proc/{pid}/status"))?),
        container: containers::of_process(pid),
        libc,
        // Unreadable (another user's process without CAP_SYS_PTRACE): no labels of its own.
        own: own_labels(pid, &fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()),
    })
}

/// The pid of process `pid` in its own PID namespace, when it differs.
pub fn own_namespace_pid(pid: u32) -> Option<u32> {
    namespace_pid(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The C library process `pid` maps, waiting up to `patience` for its
/// loader to map it.
pub fn wait_for_libc(pid: u32, patience: std::time::Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        if let Some(mapping) = parse_maps(&maps).into_iter().find(|mapping| is_libc(&mapping.path)) {
            return Some(mapping.path);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `/lib/x86_64-linux-gnu/libc.so.6`, `/lib/libc-2.31.so`; not `libcrypt`.
fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
}

/// The innermost pid of `NSpid:` in `/proc/PID/status` (the process's own
/// namespace's), if it differs from the first (the host's).
fn namespace_pid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|line| line.strip_prefix("NSpid:"))?;
    let pids: Vec<u32> = line.split_whitespace().filter_map(|pid| pid.parse().ok()).collect();
    Some(*pids.last()?).filter(|inner| Some(inner) != pids.first())
}

/// The executable address ranges of process `pid`, sorted.
pub fn code_ranges(pid: u32) -> io::Result<Vec<Range<u64>>> {
    Ok(executable_ranges(&fs::read_to_string(format!("/proc/{pid}/maps"))?))
}

/// Ranges of the executable lines of `/proc/PID/maps`, sorted.
fn executable_ranges(maps: &str) -> Vec<Range<u64>> {
    maps.lines()
        .filter_map(|line| {
            let (range, rest) = line.split_once(' ')?;
            if rest.as_bytes().get(2) != Some(&b'x') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?)
        })
        .collect()
}

/// The arguments in `/proc/PID/cmdline`, NUL-separated.
fn split_cmdline(cmdline: &[u8]) -> Vec<String> {
    let cmdline = cmdline.strip_suffix(b"\0").unwrap_or(cmdline);
    if cmdline.is_empty() {
        return Vec::new();
    }
    cmdline.split(|&b| b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect()
}

/// The default application name of a process started with `args`: the
/// script or module a `python` command runs, else the executable's name (a
/// program embedding CPython, such as uwsgi, names itself).
fn application_name<'a>(args: &'a [String], comm: &'a str, is_python: bool) -> &'a str {
    let executable = args.first().map(|arg| basename(arg)).filter(|name| !name.is_empty()).unwrap_or(comm);
    match args.get(1..) {
        Some(options) if is_python && executable.starts_with("python") => {
            python_entry(options).map(basename).unwrap_or(executable)
        }
        _ => executable,
    }
}

/// The script or module that the CPython options `args` run; None for `-c`,
/// standard input and the interactive prompt.
fn python_entry(args: &[String]) -> Option<&str> {
    let mut args = args.iter().map(String::as_str);
    while let Some(arg) = args.next() {
        match arg {
            "--" => return args.next().filter(|script| *script != "-"),
            "-" => return None,
            // The one long option with a separate value.
            "--check-hash-based-pycs" => {
                args.next();
            }
            _ if arg.starts_with("--") => {}
            _ => {
                let Some(flags) = arg.strip_prefix('-') else { return Some(arg) };
                // Single-letter options can be grouped: `-uc CODE`, `-Xdev`.
                for (i, flag) in flags.char_indices() {
                    let value = &flags[i + 1..];
                    match flag {
                        'c' => return None,
                        'm' if value.is_empty() => return args.next(),
                        'm' => return Some(value),
                        'X' | 'W' => {
                            if value.is_empty() {
                                args.next();
                            }
                            break;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    None
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A file-backed line of `/proc/PID/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    /// Mapped with execute permission: only such files run code.
    executable: bool,
    offset: u64,
    /// Device and inode: which file, even if two paths name it.
    file: (String, u64),
    path: String,
}

fn parse_maps(maps: &str) -> Vec<Mapping> {
    maps.lines().filter_map(parse_maps_line).collect()
}

/// `start-end perms offset dev inode path`; None for anonymous and special
/// mappings.
fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let executable = fields.next()?.as_bytes().get(2) == Some(&b'x');
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next()?.trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable,
        offset,
        file: (dev.to_owned(), inode),
        path: path.to_owned(),
    })
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

fn find_python(pid: u32, mappings: &[Mapping]) -> io::Result<PythonStatus> {
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
    // Dynamic symbols survive stripping; `.symtab` has them otherwise.
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if !symbol.is_definition() {
            continue;
        }
        let slot = match symbol.name_bytes() {
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
    Ok(Some(ElfFacts { runtime, code_type, version_hex, loads }))
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
        Ok(interpreter) => PythonStatus::Supported(interpreter),
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

    #[test]
    fn processes_name_and_label_themselves_through_their_environment() {
        let environ =
            b"PATH=/bin\0FERROSCOPE_APPLICATION_NAME=checkout\0FERROSCOPE_LABELS=tier=web, zone=b,pid=3,bad\0";
        let own = own_labels(1, environ);
        assert_eq!(own.application.as_deref(), Some("checkout"));
        // `pid` is the agent's own label, `bad` has no value: both left out.
        let expected = BTreeMap::from([("tier".to_owned(), "web".to_owned()), ("zone".to_owned(), "b".to_owned())]);
        assert_eq!(own.labels, expected);
        assert_eq!(own_labels(1, b"HOME=/root\0"), OwnLabels::default());
    }

    #[test]
    fn the_c_library_is_known_by_its_file_name() {
        assert!(is_libc("/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_libc("/usr/lib/libc-2.31.so"));
        assert!(!is_libc("/lib/x86_64-linux-gnu/libcrypt.so.1"));
        assert!(!is_libc("/usr/lib/libc++.so.1"));
    }
    use crate::cpython::{install_hint, pyenv_build, skip_or_fail, FrameSymbolizer};
    use profiler_common::{PyFrame, NO_OFFSET};
    use std::{
        io::{BufRead, BufReader},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
    };

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(String::from).collect()
    }

    #[test]
    fn python_application_names() {
        let cases = [
            ("python3 app.py", "app.py"),
            ("python -m mypkg.server --port 80", "mypkg.server"),
            ("/usr/bin/python3 /usr/local/bin/gunicorn app:app", "gunicorn"),
            ("python3 -u -X dev -W ignore -O -OO -B srv/main.py -v", "main.py"),
            ("python3 -Xdev -Wignore -I -- job.py", "job.py"),
            ("python3 --check-hash-based-pycs never tool.py", "tool.py"),
            ("python3 -mhttp.server", "http.server"),
            ("python3 -um pkg", "pkg"),
            ("/usr/bin/python3.11 -c import time; time.sleep(1)", "python3.11"),
            ("python3 -uc pass", "python3"),
            ("python3 -", "python3"),
            ("/opt/py/bin/python3", "python3"),
            ("python3 -X", "python3"),
        ];
        for (cmdline, expected) in cases {
            assert_eq!(application_name(&args(cmdline), "comm", true), expected, "{cmdline}");
        }
        assert_eq!(application_name(&[], "python3", true), "python3");
    }

    #[test]
    fn other_application_names() {
        // A program that embeds CPython is not a `python` command.
        assert_eq!(application_name(&args("/usr/bin/uwsgi --ini app.ini"), "uwsgi", true), "uwsgi");
        assert_eq!(application_name(&args("./dlopener /lib/libpython3.10.so 2"), "dlopener", true), "dlopener");
        assert_eq!(application_name(&args("/usr/sbin/nginx -g daemon off;"), "nginx", false), "nginx");
        assert_eq!(application_name(&args("./run.sh app.py"), "run.sh", false), "run.sh");
        // Kernel threads have no command line.
        assert_eq!(application_name(&[], "kworker/0:1", false), "kworker/0:1");
    }

    #[test]
    fn cmdline_split() {
        assert_eq!(split_cmdline(b"python3\0-m\0a.b\0"), ["python3", "-m", "a.b"]);
        assert_eq!(split_cmdline(b"x\0\0y\0"), ["x", "", "y"]);
        assert!(split_cmdline(b"").is_empty());
    }

    #[test]
    fn maps_lines() {
        let maps = "\
55d0c1a00000-55d0c1a01000 r--p 00000000 fd:01 1234 /usr/bin/python3.11
7f1c2e000000-7f1c2e021000 rw-p 00000000 00:00 0 
7ffd5c5f0000-7ffd5c611000 rw-p 00000000 00:00 0                          [stack]
7f1c2f000000-7f1c2f100000 r-xp 0001f000 fd:01 99 /lib/my lib.so (deleted)";
        assert_eq!(
            parse_maps(maps),
            [
                Mapping {
                    start: 0x55d0c1a00000,
                    end: 0x55d0c1a01000,
                    executable: false,
                    offset: 0,
                    file: ("fd:01".into(), 1234),
                    path: "/usr/bin/python3.11".into()
                },
                Mapping {
                    start: 0x7f1c2f000000,
                    end: 0x7f1c2f100000,
                    executable: true,
                    offset: 0x1f000,
                    file: ("fd:01".into(), 99),
                    path: "/lib/my lib.so (deleted)".into()
                },
            ]
        );
        assert_eq!(executable_ranges(maps), vec![0x7f1c2f000000..0x7f1c2f100000]);
    }

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
    fn namespace_pids() {
        let status = |nspid: &str| format!("Name:\tpython3\nNSpid:{nspid}\nPPid:\t1\n");
        assert_eq!(namespace_pid(&status("\t4242\t1")), Some(1));
        assert_eq!(namespace_pid(&status("\t4242\t77\t9")), Some(9));
        assert_eq!(namespace_pid(&status("\t4242")), None);
        assert_eq!(namespace_pid("Name:\tpython3\n"), None);
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

    #[test]
    fn gone_process_is_an_error() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(inspect(pid).is_err());
    }
}
