//! What a run cost, read from the kernel: a process's CPU time and peak RSS from `/proc`,
//! this process's children's CPU time, and the run time of the agent's BPF programs from the
//! kernel's BPF statistics.

use std::fs;

use anyhow::{bail, ensure, Context, Result};

/// Adds what each program ran between two readings of [`program_stats`] to `totals`.
pub(super) fn add_program_stats(
    totals: &mut Vec<(String, u64, u64)>,
    before: Vec<(String, u64, u64)>,
    after: Vec<(String, u64, u64)>,
) {
    for ((name, time, count), (_, time_before, count_before)) in after.into_iter().zip(before) {
        let (time, count) = (time.saturating_sub(time_before), count.saturating_sub(count_before));
        match totals.iter_mut().find(|(known, _, _)| *known == name) {
            Some((_, total_time, total_count)) => {
                *total_time += time;
                *total_count += count;
            }
            None => totals.push((name, time, count)),
        }
    }
}

/// Name, run time (ns) and run count of each BPF program the process `pid` holds, sorted by
/// name, from `/proc/PID/fdinfo` (with `kernel.bpf_stats_enabled`) and the program's info.
pub(super) fn program_stats(pid: u32) -> Result<Vec<(String, u64, u64)>> {
    let mut programs = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let entry = entry?;
        let Ok(info) = fs::read_to_string(entry.path()) else { continue };
        let field = |key: &str| info.lines().find_map(|line| line.strip_prefix(key)?.trim().parse::<u64>().ok());
        let (Some(time), Some(count)) = (field("run_time_ns:"), field("run_cnt:")) else { continue };
        let fd: i32 = entry.file_name().to_string_lossy().parse()?;
        programs.push((program_name(pid, fd)?, time, count));
    }
    programs.sort();
    // A perf event program is attached once per CPU: one fd each, one program.
    programs.dedup();
    Ok(programs)
}

/// The name of the BPF program behind file descriptor `fd` of process `pid`.
fn program_name(pid: u32, fd: i32) -> Result<String> {
    // SAFETY: plain system calls on buffers owned here; the fds are closed below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        ensure!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        let ours = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        ensure!(ours >= 0, "pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        // `struct bpf_prog_info`: the name is 16 bytes at offset 64.
        let mut info = [0u8; 256];
        #[repr(C)]
        struct GetInfo {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = GetInfo { bpf_fd: ours as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
        const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
        let result = libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr, size_of::<GetInfo>());
        libc::close(ours);
        ensure!(result == 0, "BPF_OBJ_GET_INFO_BY_FD: {}", std::io::Error::last_os_error());
        let name = &info[64..80];
        Ok(String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)]).into_owned())
    }
}

/// Turns the kernel's BPF run-time statistics on, and back off when dropped.
pub(super) struct BpfStats;

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> Result<BpfStats> {
        fs::write(BPF_STATS_SYSCTL, "1").with_context(|| format!("writing {BPF_STATS_SYSCTL}"))?;
        Ok(BpfStats)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS_SYSCTL, "0");
    }
}

/// `run_time_ns` and `run_cnt` of the agent's CPU sampler.
pub(super) fn sampler_run_time(agent: u32) -> Result<(u64, u64)> {
    Ok(program_stats(agent)?
        .into_iter()
        .find(|(name, _, _)| name == "sample_cpu")
        .map_or((0, 0), |(_, time, count)| (time, count)))
}

/// utime + stime of a process, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(") ").context("malformed stat")?.1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / ticks_per_second as f64)
}

/// utime + stime of this process's waited-for descendants, in seconds.
pub(super) fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// VmHWM of a process, in bytes.
pub(super) fn peak_rss(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(kib) = line.strip_prefix("VmHWM:") {
            return Ok(kib.trim().trim_end_matches("kB").trim().parse::<u64>()? * 1024);
        }
    }
    bail!("no VmHWM in /proc/{pid}/status")
}
