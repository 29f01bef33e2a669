//! Flame graphs of a profile, as SVG drawn by inferno, for a person to open in
//! a browser.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use inferno::flamegraph::{
    self,
    color::{MultiPalette, Palette},
    Options,
};

use crate::aggregate::{sample_type::FlameWidth, PeriodProfile, SampleType, StackValue};

use crate::stack::{Frame, FrameKind};

/// What the boxes' widths count: the first sample type of the table that
/// flame graphs can draw and the profile has any of. CPU samples come first;
/// a profile without any (an application whose threads only waited, or only
/// allocated) is drawn by its wall time, or the bytes it allocated.
#[derive(Clone, Copy)]
struct Width {
    sample_type: SampleType,
    width: FlameWidth,
}

impl Width {
    /// Every width, in the order they are tried.
    fn all() -> impl Iterator<Item = Width> {
        SampleType::ALL
            .into_iter()
            .filter_map(|sample_type| Some(Width { sample_type, width: sample_type.row().flame? }))
    }

    fn of(self, value: &StackValue) -> u64 {
        value[self.sample_type] / self.width.divisor
    }

    fn name(self) -> &'static str {
        self.width.count_name
    }
}

/// The flame graph of `profile`, widths in samples or else (see [`Width`]);
/// none if it has nothing to draw.
pub fn svg(profile: &PeriodProfile) -> anyhow::Result<Option<Vec<u8>>> {
    let total = |width: Width| profile.stacks.values().map(|value| width.of(value)).sum::<u64>();
    let Some(width) = Width::all().find(|&width| total(width) > 0) else {
        return Ok(None);
    };
    let cpu_ns = profile.total(SampleType::Cpu);
    let mut options = Options::default();
    options.title = format!("{}: {} to {}", profile.application, utc(profile.start), utc(profile.end));
    // inferno shows one count per frame: samples there, CPU time here.
    options.subtitle = Some(format!(
        "{} samples, {} of CPU time",
        profile.total_samples(),
        humantime::format_duration(Duration::from_nanos(cpu_ns))
    ));
    options.count_name = width.name().to_owned();
    // With the annotations of `frame_name`: Python aqua, kernel orange,
    // native red (C++ yellow).
    options.colors = Palette::Multi(MultiPalette::Js);
    // Colors from the names rather than at random, so that a function keeps
    // its color from one period to the next.
    options.hash = true;
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, folded(profile, width).iter().map(String::as_str), &mut svg)
        .with_context(|| format!("cannot draw the flame graph of {}", profile.application))?;
    Ok(Some(svg))
}

fn utc(time: SystemTime) -> humantime::Rfc3339Timestamp {
    // humantime panics on times before 1970, which only a broken clock gives.
    humantime::format_rfc3339_seconds(time.max(UNIX_EPOCH))
}

/// Folded stacks, `root;…;leaf count`, sorted as inferno wants them.
/// Stacks that differ only by thread or line become one; those of no width
/// are left out.
fn folded(profile: &PeriodProfile, width: Width) -> Vec<String> {
    let names: Vec<String> = profile.frames.iter().map(frame_name).collect();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (key, value) in &profile.stacks {
        let stack: Vec<&str> = key.frames.iter().rev().map(|&frame| names[frame as usize].as_str()).collect();
        *counts.entry(stack.join(";")).or_default() += width.of(value);
    }
    counts.into_iter().filter(|(_, count)| *count > 0).map(|(stack, count)| format!("{stack} {count}")).collect()
}

/// A frame as the flame graph shows it: the function and the base name of its
/// file, without the line, so that a function is one box however many of its
/// lines ran. The `_[j]` and `_[k]` suffixes pick the colors of Python and
/// kernel frames; inferno does not show them.
fn frame_name(frame: &Frame) -> String {
    let file = frame.file.rsplit('/').next().unwrap_or_default();
    let annotation = match frame.kind {
        FrameKind::Python => "_[j]",
        FrameKind::Kernel => "_[k]",
        FrameKind::Native | FrameKind::Marker => "",
    };
    let name = if file.is_empty() || frame.kind == FrameKind::Marker {
        format!("{}{annotation}", frame.function)
    } else {
        format!("{} ({file}){annotation}", frame.function)
    };
    // `;` separates the frames of a folded stack.
    name.replace(';', ":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Measurement;
    use crate::stack::Thread;

    fn python(function: &str, start_line: u32, line: u32) -> Frame {
        Frame { kind: FrameKind::Python, function: function.into(), file: "/srv/app.py".into(), start_line, line }
    }

    fn main_thread() -> Thread {
        Thread {
            pid: 1,
            container_pid: None,
            container_id: None,
            tid: 1,
            thread_name: "main".into(),
            process_name: "python3".into(),
            context: None,
        }
    }

    fn profile() -> PeriodProfile {
        let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut profile = PeriodProfile::new("web".to_owned(), BTreeMap::new(), start, 10_000_000);
        profile.end = start + Duration::from_secs(10);
        let main = python("<module>", 1, 30);
        let native = Frame {
            kind: FrameKind::Native,
            function: "__write".into(),
            file: "/usr/lib/libc.so.6".into(),
            start_line: 0,
            line: 0,
        };
        let kernel =
            Frame { kind: FrameKind::Kernel, function: "ksys_write".into(), file: "".into(), start_line: 0, line: 0 };
        let one = main_thread();
        let two = Thread { tid: 2, thread_name: "worker;1".into(), ..one.clone() };
        profile.add(&[python("crunch", 10, 12), main.clone()], &one, Measurement::Cpu);
        profile.add(&[python("crunch", 10, 14), main.clone()], &one, Measurement::Cpu);
        profile.add(&[python("crunch", 10, 14), main.clone()], &two, Measurement::Cpu);
        profile.add(&[kernel, native, python("a;b", 20, 21), main], &two, Measurement::Cpu);
        profile.add(&[Frame::marker("[truncated]")], &two, Measurement::Cpu);
        profile
    }

    #[test]
    fn folds_lines_and_threads_of_a_function_together() {
        assert_eq!(
            folded(&profile(), Width::all().find(|width| width.sample_type == SampleType::Samples).unwrap()),
            [
                "<module> (app.py)_[j];a:b (app.py)_[j];__write (libc.so.6);ksys_write_[k] 1",
                "<module> (app.py)_[j];crunch (app.py)_[j] 3",
                "[truncated] 1",
            ]
        );
    }

    #[test]
    fn threads_that_only_waited_are_drawn_by_wall_time_and_nothing_is_not_drawn() {
        let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut profile = PeriodProfile::new("sleeper".to_owned(), BTreeMap::new(), start, 10_000_000);
        assert!(svg(&profile).unwrap().is_none(), "an empty profile has no flame graph");
        let thread = main_thread();
        let nap = Measurement::OffCpu { wait: crate::stack::Wait::Sleep, ns: 2_500_000_000 };
        profile.add(&[python("nap", 3, 4)], &thread, nap);
        let svg = String::from_utf8(svg(&profile).unwrap().unwrap()).unwrap();
        assert!(svg.contains("nap (app.py) (2,500 ms of wall time, 100.00%)"), "{svg}");
    }

    #[test]
    fn draws_every_function() {
        let svg = String::from_utf8(svg(&profile()).unwrap().unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        for expected in [
            "web: 2026-11-18T11:06:40Z to 2026-11-18T11:06:50Z",
            "5 samples, 50ms of CPU time",
            "&lt;module&gt; (app.py) (4 samples, 80.00%)",
            "crunch (app.py) (3 samples, 60.00%)",
            "a:b (app.py) (1 samples, 20.00%)",
            "__write (libc.so.6) (1 samples, 20.00%)",
            "ksys_write (1 samples, 20.00%)",
            "[truncated] (1 samples, 20.00%)",
        ] {
            assert!(svg.contains(expected), "no {expected:?} in\n{svg}");
        }
    }
}
