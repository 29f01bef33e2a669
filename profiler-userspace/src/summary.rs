//! The short report printed on the terminal at the end of every period.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use crate::{
    aggregate::{Dimension, PeriodProfile, ProcessThreads, SampleType},
    kernel::KernelStats,
    native::UnwindStats,
    stack::{Frame, FrameKind, Wait},
};

/// Functions listed per period.
const TOP_FUNCTIONS: usize = 5;
/// Processes whose threads are listed per period.
const THREAD_LINES: usize = 10;

/// Counts of one period, filled while it runs.
#[derive(Debug, Default)]
pub struct PeriodSummary {
    pub samples: u64,
    pub samples_dropped: u64,
    pub events_dropped: u64,
    pub python_processes: u64,
    pub unsupported_processes: u64,
    pub vanished_processes: u64,
    pub unnamed_python_frames: u64,
    pub broken_python_stacks: u64,
    pub profiles_written: u64,
    /// Off-CPU samples (kept waits).
    pub off_cpu_samples: u64,
    /// With `--memory`: allocation and pool samples, sampled allocations
    /// whose free could not be followed (the kernel's table was full),
    /// allocations and pools followed at the period's end, and CPython
    /// processes whose allocator could not be probed.
    pub alloc_samples: u64,
    pub live_overflow: u64,
    pub live_followed: usize,
    /// Native stacks unwound from `.eh_frame` tables, those cut short, and
    /// the tables in the kernel (files, rows).
    pub unwound_stacks: u64,
    pub unwind_cut: u64,
    pub unwind_tables: (u64, u64, u64),
    /// Tables that did not fit in the kernel's space, since the start.
    pub unwind_refused: u64,
    pub memory_unwatched: u64,
    /// Dimensions asked for that this kernel refused, with why.
    pub refusals: Vec<String>,
    /// What each sink did, a line each.
    pub sinks: Vec<String>,
    /// Per profiled process, by pid.
    pub threads: Vec<ProcessThreads>,
}

impl PeriodSummary {
    /// The kernel's counts of the period, from its counters at its start and end.
    pub fn kernel(&mut self, end: &KernelStats, start: &KernelStats) {
        self.samples_dropped = end.samples_dropped - start.samples_dropped;
        self.events_dropped = end.events_dropped - start.events_dropped;
        self.off_cpu_samples = end.off_cpu_samples - start.off_cpu_samples;
        self.alloc_samples = end.alloc_samples - start.alloc_samples;
        self.live_overflow = end.live_overflow - start.live_overflow;
        self.unwound_stacks = end.unwound_stacks - start.unwound_stacks;
        self.unwind_cut = end.unwind_cut - start.unwind_cut;
    }

    /// The unwind tables in the kernel, and those refused since the start.
    pub fn unwinder(&mut self, stats: &UnwindStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.unwind_tables = (stats.tables.load(Relaxed), stats.rows.load(Relaxed), stats.peak_rows.load(Relaxed));
        self.unwind_refused = stats.tables_refused.load(Relaxed);
    }

    pub fn print(&self, profiles: &[PeriodProfile]) {
        eprint!("{}", self.render(profiles));
    }

    fn render(&self, profiles: &[PeriodProfile]) -> String {
        let mut text = self.headline(profiles);
        for dimension in Dimension::ALL {
            if profiles.iter().any(|profile| profile.dimensions.contains(dimension)) {
                text += &self.dimension_lines(dimension, profiles);
            }
        }
        text += &self.native_line();
        for refusal in &self.refusals {
            text += &format!("  {refusal}\n");
        }
        text += &self.thread_lines();
        text += &self.notes();
        text += &format!("  {} profiles: {}\n", self.profiles_written, self.sinks.join("; "));
        text
    }

    /// The period, the processes and applications profiled, the samples.
    fn headline(&self, profiles: &[PeriodProfile]) -> String {
        let (start, end) =
            profiles.first().map_or((SystemTime::now(), SystemTime::now()), |profile| (profile.start, profile.end));
        let processes: std::collections::HashSet<u32> =
            profiles.iter().flat_map(|profile| profile.stacks.keys().map(|key| key.thread.pid)).collect();
        let mut text = format!(
            "ferroscope: {} to {}: {} processes in {} applications, {} samples",
            clock(start),
            clock(end),
            processes.len(),
            profiles.len(),
            self.samples,
        );
        text += &format!(", {} dropped", self.samples_dropped + self.events_dropped);
        if self.python_processes > 0 {
            text += &format!("; {} new CPython processes", self.python_processes);
        }
        if self.unsupported_processes > 0 {
            text += &format!(", {} unsupported (native stacks only)", self.unsupported_processes);
        }
        text.push('\n');
        text
    }

    /// What one dimension measured over the period.
    fn dimension_lines(&self, dimension: Dimension, profiles: &[PeriodProfile]) -> String {
        match dimension {
            Dimension::Cpu => top_function_lines(profiles, self.samples),
            Dimension::Wall => off_cpu_line(profiles, self.off_cpu_samples),
            Dimension::Memory => {
                let total = |sample_type| profiles.iter().map(|profile| profile.total(sample_type)).sum::<u64>();
                format!(
                    "  memory: {} allocated, {} in use at the end, from {} allocation samples ({} followed)\n",
                    mebibytes(total(SampleType::AllocSpace)),
                    mebibytes(total(SampleType::InuseSpace)),
                    self.alloc_samples,
                    self.live_followed,
                )
            }
        }
    }

    /// Native stacks unwound, and the unwind tables in the kernel.
    fn native_line(&self) -> String {
        if self.unwound_stacks == 0 {
            return String::new();
        }
        let (tables, rows, peak) = self.unwind_tables;
        let kib = |rows: u64| rows * std::mem::size_of::<profiler_common::UnwindRow>() as u64 / 1024;
        format!(
            "  native stacks: {} unwound, {} cut short; unwind tables of {tables} files in the kernel, {rows} rows \
             ({} KiB; at most {peak} rows, {} KiB)\n",
            self.unwound_stacks,
            self.unwind_cut,
            kib(rows),
            kib(peak),
        )
    }

    fn thread_lines(&self) -> String {
        let mut text = String::new();
        for ProcessThreads { pid, process_name, counts } in self.threads.iter().take(THREAD_LINES) {
            text += &format!(
                "  threads of pid {pid} ({process_name}): {} live, {} started, {} ended\n",
                counts.live, counts.started, counts.ended
            );
        }
        if self.threads.len() > THREAD_LINES {
            text += &format!("  threads of {} more processes not shown\n", self.threads.len() - THREAD_LINES);
        }
        text
    }

    /// What went wrong, a line each.
    fn notes(&self) -> String {
        let problems = [
            (self.live_overflow, "sampled allocations could not be followed to their free (table full)"),
            (self.memory_unwatched, "CPython processes without memory profiling (allocator not found: see the log)"),
            (self.unwind_refused, "files got no unwind table since the start (the kernel's table space was full)"),
            (self.unnamed_python_frames, "Python frames could not be named"),
            (self.broken_python_stacks, "Python stacks ended early on a bad pointer"),
            (
                self.vanished_processes,
                "processes exited before they could be looked at (named by their comm, native frames unnamed)",
            ),
        ];
        let notes = problems.into_iter().filter(|&(count, _)| count > 0);
        notes.map(|(count, what)| format!("  note: {count} {what}\n")).collect()
    }
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// The functions with the most samples, a line each, with their share of
/// the period's `samples`.
fn top_function_lines(profiles: &[PeriodProfile], samples: u64) -> String {
    let mut text = String::new();
    for (frame, count) in top_functions(profiles, TOP_FUNCTIONS) {
        let share = 100.0 * count as f64 / samples.max(1) as f64;
        let place = match frame.kind {
            FrameKind::Python => format!("  {}:{}", frame.file, frame.start_line),
            FrameKind::Native | FrameKind::Kernel if !frame.file.is_empty() => format!("  {}", frame.file),
            _ => String::new(),
        };
        text += &format!("  {share:5.1}%  {}{place}\n", frame.function);
    }
    text
}

/// The functions with the most samples, named by the innermost Python frame
/// of a stack when it has one (what a Python user wants to see), else by its
/// innermost frame.
fn top_functions(profiles: &[PeriodProfile], count: usize) -> Vec<(Frame, u64)> {
    let mut by_frame: HashMap<Frame, u64> = HashMap::new();
    for profile in profiles {
        for (key, value) in &profile.stacks {
            let frames = key.frames.iter().map(|&id| &profile.frames[id as usize]);
            let mut python = frames.clone().filter(|frame| frame.kind == FrameKind::Python);
            if let Some(frame) = python.next().or_else(|| frames.clone().next()) {
                // Lines apart, one function is one entry.
                let function = Frame { line: 0, ..frame.clone() };
                *by_frame.entry(function).or_default() += value[SampleType::Samples];
            }
        }
    }
    let mut top: Vec<_> = by_frame.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.function.cmp(&b.0.function)));
    top.truncate(count);
    top
}

/// Off-CPU time of the period by what threads waited for.
fn off_cpu_line(profiles: &[PeriodProfile], samples: u64) -> String {
    let mut by_wait: BTreeMap<Wait, u64> = BTreeMap::new();
    for (key, value) in profiles.iter().flat_map(|profile| &profile.stacks) {
        if let Some(wait) = key.wait {
            *by_wait.entry(wait).or_default() += value[SampleType::OffCpu];
        }
    }
    let seconds = |ns: u64| format!("{:.1}s", Duration::from_nanos(ns).as_secs_f64());
    let off_cpu: u64 = by_wait.values().sum();
    let waits: Vec<String> = by_wait.iter().map(|(wait, &ns)| format!("{} {}", wait.label(), seconds(ns))).collect();
    format!(
        "  off-CPU {} ({}) from {samples} off-CPU samples\n",
        seconds(off_cpu),
        if waits.is_empty() { "none".to_owned() } else { waits.join(", ") }
    )
}

/// `HH:MM:SS` in UTC.
fn clock(time: SystemTime) -> String {
    let rfc3339 = humantime::format_rfc3339_seconds(time).to_string();
    rfc3339.get(11..19).unwrap_or(&rfc3339).to_owned()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::aggregate::{Measurement, ThreadCounts};
    use crate::stack::Thread;

    #[test]
    fn names_python_functions_before_native_leaves() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(3600);
        let mut profile = PeriodProfile::new("app.py".into(), BTreeMap::new(), start, 10_000_000);
        profile.end = start + Duration::from_secs(45);
        let native = Frame {
            kind: FrameKind::Native,
            function: "_PyEval_EvalFrameDefault".into(),
            file: "libpython3.11.so".into(),
            start_line: 0,
            line: 0,
        };
        let crunch = Frame {
            kind: FrameKind::Python,
            function: "Cruncher.crunch_a".into(),
            file: "split.py".into(),
            start_line: 7,
            line: 9,
        };
        let thread = Thread {
            pid: 1,
            container_pid: None,
            container_id: None,
            tid: 1,
            thread_name: "python".into(),
            process_name: "python".into(),
            context: None,
        };
        for _ in 0..3 {
            profile.add(&[native.clone(), crunch.clone()], &thread, Measurement::Cpu);
        }
        profile.add(std::slice::from_ref(&native), &thread, Measurement::Cpu);
        profile.dimensions.insert(Dimension::Wall);
        let off_cpu = |wait, ns| Measurement::OffCpu { wait, ns };
        profile.add(std::slice::from_ref(&crunch), &thread, off_cpu(Wait::Sleep, 2_000_000_000));
        profile.add(std::slice::from_ref(&crunch), &thread, off_cpu(Wait::Io, 500_000_000));
        let counts = ThreadCounts { live: 3, started: 2, ended: 1 };
        let summary = PeriodSummary {
            samples: 4,
            profiles_written: 1,
            sinks: vec!["wrote to ./profiles".into(), "pyroscope: 1 delivered, 0 waiting".into()],
            off_cpu_samples: 3,
            threads: vec![ProcessThreads { pid: 1, process_name: "python".into(), counts }],
            ..Default::default()
        };
        let text = summary.render(&[profile]);
        assert!(
            text.starts_with("ferroscope: 01:00:00 to 01:00:45: 1 processes in 1 applications, 4 samples, 0 dropped\n"),
            "{text}"
        );
        assert!(text.contains(" 75.0%  Cruncher.crunch_a  split.py:7\n"), "{text}");
        assert!(text.contains(" 25.0%  _PyEval_EvalFrameDefault  libpython3.11.so\n"), "{text}");
        assert!(text.contains("  off-CPU 2.5s (sleep 2.0s, io 0.5s) from 3 off-CPU samples\n"), "{text}");
        assert!(text.contains("  threads of pid 1 (python): 3 live, 2 started, 1 ended\n"), "{text}");
        assert!(text.ends_with("  1 profiles: wrote to ./profiles; pyroscope: 1 delivered, 0 waiting\n"), "{text}");
    }
}
