//! The agent as the systemd unit runs it: as an unprivileged user (nobody here; a dynamic
//! user there) holding only the unit's capabilities (`AmbientCapabilities=`, the same as
//! `CapabilityBoundingSet=`), with no new privileges. It profiles a root process running
//! pyenv's CPython from /root (a directory only root may search), with its Python frames,
//! its native frames (libpython) and its kernel frames named.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::{ferroscope_bin, wait_for_cpu, Agent, Sample, Workload, PYENV_PYTHON_3_11};

/// The user the agent runs as: nobody.
const UID: u32 = 65534;
/// The workload's CPU time sampled, and what a busy host may take to give it that.
const CPU_SECONDS: f64 = 4.0;
const CPU_TIMEOUT: Duration = Duration::from_secs(120);

/// A loop that alternates Python work (`burn`) and system calls (`read_dev_zero`, whose time
/// is spent in the kernel), for the seconds given.
const WORKLOAD: &str = r#"
import os, sys, time

def burn(n):
    acc = 1
    for i in range(n):
        acc = (acc * 31 + i) % 1000003
    return acc

def read_dev_zero(fd, n):
    for _ in range(n):
        os.read(fd, 1 << 16)

fd = os.open("/dev/zero", os.O_RDONLY)
deadline = time.time() + float(sys.argv[1])
while time.time() < deadline:
    burn(20000)
    read_dev_zero(fd, 300)
"#;

/// Capabilities by the names systemd gives them, with their bits.
const KNOWN: [(&str, u32); 9] = [
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYSLOG", 34),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
    ("CAP_SYS_NICE", 23),
];

/// The capabilities of `key=` in the unit.
fn unit_capabilities(key: &str) -> Result<Vec<String>> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/ferroscope.service");
    let text = fs::read_to_string(&unit)?;
    let prefix = format!("{key}=");
    let values: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix(&prefix)).collect();
    ensure!(values.len() == 1, "{} lines {key}= in {}", values.len(), unit.display());
    Ok(values[0].split_whitespace().map(str::to_owned).collect())
}

/// The `Cap*:` mask of `/proc/PID/status`.
fn capability_mask(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status.lines().find_map(|line| line.strip_prefix(field)).with_context(|| format!("no {field}"))?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// A share (0 to 1) of `samples`, weighted by their counts, that satisfy `test`.
fn share<'a>(samples: &[&'a Sample], test: impl Fn(&'a Sample) -> bool) -> f64 {
    let total: i64 = samples.iter().map(|sample| sample.count()).sum();
    let matching: i64 = samples.iter().filter(|sample| test(sample)).map(|sample| sample.count()).sum();
    matching as f64 / total.max(1) as f64
}

#[test]
fn agent_profiles_as_nobody_with_the_units_capabilities() -> Result<()> {
    let ambient = unit_capabilities("AmbientCapabilities")?;
    let mut bounding = unit_capabilities("CapabilityBoundingSet")?;
    let mut sorted = ambient.clone();
    sorted.sort();
    bounding.sort();
    ensure!(sorted == bounding, "the unit's AmbientCapabilities {ambient:?} differ from its CapabilityBoundingSet");
    let mut mask = 0u64;
    for name in &ambient {
        let (_, bit) = KNOWN.iter().find(|(known, _)| known == name).with_context(|| format!("unknown {name}"))?;
        mask |= 1 << bit;
    }
    let ours = capability_mask(std::process::id(), "CapBnd:")?;
    ensure!(
        ours & mask == mask,
        "this test's bounding set ({ours:#x}) lacks some of the unit's capabilities ({mask:#x}): it cannot grant them"
    );
    // setpriv's names: cap_bpf is +bpf.
    let caps: Vec<String> =
        ambient.iter().map(|name| format!("+{}", name.trim_start_matches("CAP_").to_lowercase())).collect();
    let caps = caps.join(",");

    // The agent through a wrapper that gives it its output directory (made by root) and
    // becomes nobody with the unit's capabilities as ambient ones, as systemd does.
    let dir = tempfile::tempdir()?;
    let wrapper = dir.path().join("as-nobody");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprevious=\nfor arg in \"$@\"; do\n    if [ \"$previous\" = --output-dir ]; then chown {UID}:{UID} \"$arg\" || exit 1; fi\n    \
             previous=$arg\ndone\nexec setpriv --reuid={UID} --regid={UID} --clear-groups --no-new-privs \
             --bounding-set=-all,{caps} --inh-caps=-all,{caps} --ambient-caps={caps} {} \"$@\"\n",
            ferroscope_bin().display()
        ),
    )?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    let socket_dir = dir.path().join("run");
    fs::create_dir(&socket_dir)?;
    std::os::unix::fs::chown(&socket_dir, Some(UID), Some(UID))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;

    // It runs until killed (dropped), however long a busy host makes this test.
    let workload = Workload::start_program(Path::new(PYENV_PYTHON_3_11), &["-c", WORKLOAD, "600"], &[])?;
    let pid = workload.pid();
    // Let the interpreter start (a few tens of milliseconds of CPU), so that the agent finds
    // Python in it at once.
    wait_for_cpu(pid, 0.2, CPU_TIMEOUT)?;
    let pid_arg = pid.to_string();
    let socket = socket_dir.join("control.sock");
    let agent = Agent::start_binary(&wrapper, &["--pid", &pid_arg, "--control-socket", socket.to_str().unwrap()])?;

    // Really nobody, with those capabilities and no others.
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let uid_line = status.lines().find(|line| line.starts_with("Uid:")).unwrap_or("");
    ensure!(uid_line.split_whitespace().skip(1).all(|uid| uid == UID.to_string()), "the agent runs as {uid_line:?}");
    for field in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        let found = capability_mask(agent.pid(), field)?;
        ensure!(found == mask, "the agent's {field} {found:#x}, not the unit's {mask:#x}");
    }
    ensure!(status.contains("NoNewPrivs:\t1"), "no NoNewPrivs: {status}");

    // CPU time, not a sleep: on a busy host a few seconds may give the workload little of it.
    wait_for_cpu(pid, CPU_SECONDS, CPU_TIMEOUT)?;
    // It could make its control socket, in a directory of its own as RuntimeDirectory= is
    // (just after it says it samples).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(socket.exists(), "no control socket at {}; agent output:\n{}", socket.display(), agent.log());
    let run = agent.stop()?;
    drop(workload);

    let profile = run.all_profiles()?;
    let samples: Vec<&Sample> = profile.samples_of_pid(pid).collect();
    let total: i64 = samples.iter().map(|sample| sample.count()).sum();
    let expected = CPU_SECONDS * 100.0;
    ensure!(
        total as f64 >= 0.5 * expected,
        "only {total} samples of pid {pid} (~{expected} at 100 Hz over {CPU_SECONDS} s of its CPU); agent output:\n{}",
        run.log
    );

    let python = share(&samples, |s| s.has_function("burn") || s.has_function("read_dev_zero"));
    ensure!(
        python >= 0.8,
        "{:.0}% of the samples are in burn or read_dev_zero; agent output:\n{}",
        python * 100.0,
        run.log
    );
    for function in ["burn", "read_dev_zero"] {
        ensure!(samples.iter().any(|sample| sample.has_function(function)), "no sample in {function}");
    }

    // Native frames are named from /proc/PID/map_files (CAP_CHECKPOINT_RESTORE): an unnamed
    // one is `[unknown]` with no file.
    let in_libpython =
        share(&samples, |s| s.frames.iter().any(|f| f.file.contains("libpython") && f.function != "[unknown]"));
    // Whole native stacks hold static functions of stripped libraries, never named; a
    // sample without any named native frame is what the missing capability gives.
    let named_native = |f: &e2e::Frame| {
        f.function != "[unknown]" && !f.file.is_empty() && f.file != "[kernel]" && !f.file.ends_with(".py")
    };
    let unnamed_native = share(&samples, |s| !s.frames.iter().any(named_native));
    ensure!(
        in_libpython >= 0.5 && unnamed_native <= 0.1,
        "native frames: {:.0}% of the samples have named libpython frames, {:.0}% no named native frame",
        in_libpython * 100.0,
        unnamed_native * 100.0
    );

    // Kernel frames are named from /proc/kallsyms (CAP_SYSLOG): an unnamed one is
    // `[unknown]`. The workload spends about a third of its time reading /dev/zero.
    let in_kernel = share(&samples, |s| s.frames.iter().any(|f| f.file == "[kernel]"));
    let unnamed_kernel =
        share(&samples, |s| s.frames.iter().any(|f| f.file == "[kernel]" && f.function == "[unknown]"));
    eprintln!(
        "{total} samples: {:.0}% with named libpython frames, {:.0}% with unnamed native frames, {:.0}% with \
         kernel frames, {:.1}% with unnamed ones",
        in_libpython * 100.0,
        unnamed_native * 100.0,
        in_kernel * 100.0,
        unnamed_kernel * 100.0
    );
    ensure!(
        in_kernel >= 0.1 && unnamed_kernel <= 0.02,
        "kernel frames: {:.0}% of the samples have some, {:.0}% unnamed ones",
        in_kernel * 100.0,
        unnamed_kernel * 100.0
    );
    Ok(())
}
