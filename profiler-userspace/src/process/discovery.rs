//! What a process is: its names and, for CPython, where its interpreter is.
//!
//! The interpreter is the mapped ELF file that defines `_PyRuntime`: the
//! executable of a static build, `libpython3.X.so` of a shared one, or any
//! object that embeds CPython under another name.

use super::containers::{self, Container};
use crate::cpython::{find_python, PythonStatus};
use std::{collections::BTreeMap, fs, io, ops::Range, sync::Arc};

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
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Mapped with execute permission: only such files run code.
    pub executable: bool,
    pub offset: u64,
    /// Device and inode: which file, even if two paths name it.
    pub file: (String, u64),
    pub path: String,
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
    use std::process::Command;

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

    #[test]
    fn namespace_pids() {
        let status = |nspid: &str| format!("Name:\tpython3\nNSpid:{nspid}\nPPid:\t1\n");
        assert_eq!(namespace_pid(&status("\t4242\t1")), Some(1));
        assert_eq!(namespace_pid(&status("\t4242\t77\t9")), Some(9));
        assert_eq!(namespace_pid(&status("\t4242")), None);
        assert_eq!(namespace_pid("Name:\tpython3\n"), None);
    }

    #[test]
    fn gone_process_is_an_error() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(inspect(pid).is_err());
    }
}
