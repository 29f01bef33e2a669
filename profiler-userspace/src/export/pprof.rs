//! Profiles in the pprof format (google/pprof `proto/profile.proto`), which
//! `go tool pprof`, Pyroscope, Grafana and most profile viewers read.

pub mod proto;

use std::{
    collections::HashMap,
    time::{SystemTime, UNIX_EPOCH},
};

use prost::Message;

use super::frame_kind;
use crate::aggregate::{FrameId, PeriodProfile, ProcessThreads, SampleType, StackKey};
use crate::stack::{Frame, Wait};

/// The serialized `Profile` message, not compressed: files and most receivers
/// want it gzipped, some compress it their own way.
pub fn encode(profile: &PeriodProfile) -> Vec<u8> {
    build(profile).encode_to_vec()
}

/// The profile as a gzipped pprof, as files and backends want it.
pub fn encode_gzipped(profile: &PeriodProfile) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&encode(profile))?;
    gzip.finish()
}

fn build(profile: &PeriodProfile) -> proto::Profile {
    let mut tables = Tables::new();
    // The values of each sample, in the order of the table.
    let types: Vec<SampleType> = profile.sample_types().collect();
    let sample_type: Vec<_> = types.iter().map(|kind| tables.value_type(kind.row().name, kind.row().unit)).collect();
    // Samples are taken every period of CPU time, which viewers show first.
    let cpu = sample_type[types.iter().position(|&kind| kind == SampleType::Cpu).expect("CPU time is always measured")];
    let default_sample_type = cpu.r#type;

    // Frames are interned already: one location each, shared by every stack.
    let locations: Vec<u64> = profile.frames.iter().map(|frame| tables.location(frame)).collect();
    let common_labels: Vec<_> = profile.labels.iter().map(|(key, value)| tables.label(key, value)).collect();

    // Sorted so that the same profile always encodes to the same bytes.
    let mut stacks: Vec<_> = profile.stacks.iter().collect();
    stacks.sort_unstable_by(|(a, _), (b, _)| order(a).cmp(&order(b)));
    let sample = stacks
        .into_iter()
        .map(|(key, value)| {
            let thread = &key.thread;
            let mut label = vec![
                tables.label("pid", &thread.pid.to_string()),
                tables.label("tid", &thread.tid.to_string()),
                tables.label("thread_name", &thread.thread_name),
                tables.label("process_name", &thread.process_name),
            ];
            if let Some(container_pid) = thread.container_pid {
                label.push(tables.label("container_pid", &container_pid.to_string()));
            }
            if let Some(container_id) = &thread.container_id {
                label.push(tables.label("container_id", container_id));
            }
            if let Some(wait) = key.wait {
                label.push(tables.label("wait", wait.label()));
            }
            for (key, value) in thread.context.iter().flat_map(|context| context.iter()) {
                label.push(tables.label(key, value));
            }
            label.extend_from_slice(&common_labels);
            proto::Sample {
                location_id: key.frames.iter().map(|&frame| locations[frame as usize]).collect(),
                value: types.iter().map(|&kind| int(value[kind])).collect(),
                label,
            }
        })
        .collect();
    // Thread counts are per process, not per stack: pprof's comments carry
    // them (`go tool pprof -comments`), in a form a script can split.
    let comment = profile
        .threads
        .iter()
        .map(|ProcessThreads { pid, process_name, counts }| {
            tables.string(&format!(
                "threads pid={pid} process_name={process_name} live={} started={} ended={}",
                counts.live, counts.started, counts.ended
            ))
        })
        .collect();

    proto::Profile {
        sample_type,
        sample,
        location: tables.locations,
        function: tables.functions,
        string_table: tables.strings,
        time_nanos: nanos_since_epoch(profile.start),
        duration_nanos: profile.end.duration_since(profile.start).map_or(0, |duration| int(duration.as_nanos())),
        period_type: Some(cpu),
        period: int(profile.sample_period_ns),
        default_sample_type,
        comment,
        ..Default::default()
    }
}

/// How samples are sorted.
fn order(key: &StackKey) -> (u32, u32, &str, &str, Option<Wait>, &[FrameId]) {
    let thread = &key.thread;
    (thread.pid, thread.tid, &thread.thread_name, &thread.process_name, key.wait, &key.frames)
}

/// pprof integers are signed; values that large do not happen, but saturate
/// rather than wrap if they do.
fn int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn nanos_since_epoch(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| int(since.as_nanos()))
}

/// The string, function and location tables of the profile being built,
/// each entry stored once.
#[derive(Default)]
struct Tables {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<proto::Function>,
    /// By name, file and start line.
    function_ids: HashMap<(i64, i64, i64), u64>,
    locations: Vec<proto::Location>,
    /// By function and line.
    location_ids: HashMap<(u64, i64), u64>,
}

impl Tables {
    fn new() -> Self {
        let mut tables = Tables::default();
        // The format requires string_table[0] = "".
        tables.string("");
        tables
    }

    fn string(&mut self, text: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(text) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(text.to_owned());
        self.string_ids.insert(text.to_owned(), id);
        id
    }

    fn value_type(&mut self, r#type: &str, unit: &str) -> proto::ValueType {
        proto::ValueType { r#type: self.string(r#type), unit: self.string(unit) }
    }

    fn label(&mut self, key: &str, value: &str) -> proto::Label {
        proto::Label { key: self.string(key), str: self.string(value), ..Default::default() }
    }

    /// The id of the location of `frame`, added if new. Ids start at 1: 0
    /// means none in pprof.
    fn location(&mut self, frame: &Frame) -> u64 {
        // The frame's kind goes in its file and system name, as readers
        // (the viewer) take it back.
        let function = frame_kind::encode(frame);
        let name = self.string(function.name);
        let filename = self.string(function.filename);
        let system_name = self.string(function.system_name);
        let start_line = i64::from(frame.start_line);
        let function_id = *self.function_ids.entry((name, filename, start_line)).or_insert_with(|| {
            let id = self.functions.len() as u64 + 1;
            self.functions.push(proto::Function { id, name, system_name, filename, start_line });
            id
        });
        let line = i64::from(frame.line);
        *self.location_ids.entry((function_id, line)).or_insert_with(|| {
            let id = self.locations.len() as u64 + 1;
            self.locations.push(proto::Location {
                id,
                line: vec![proto::Line { function_id, line, column: 0 }],
                ..Default::default()
            });
            id
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Write, path::Path, process::Command, time::Duration};

    use super::*;
    use crate::aggregate::{Dimension, Measurement, ThreadCounts};
    use crate::stack::{FrameKind, Thread};

    fn frame(kind: FrameKind, function: &str, file: &str, start_line: u32, line: u32) -> Frame {
        Frame { kind, function: function.into(), file: file.into(), start_line, line }
    }

    fn thread(tid: u32, name: &str) -> Thread {
        Thread {
            pid: 42,
            container_pid: None,
            container_id: None,
            tid,
            thread_name: name.into(),
            process_name: "python3.12".into(),
            context: None,
        }
    }

    const START: Duration = Duration::from_secs(1_795_000_000);

    /// Python calling native code that enters the kernel, on two threads,
    /// with one function sampled on two lines and a truncated stack.
    fn profile() -> PeriodProfile {
        let labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
        let start = UNIX_EPOCH + START;
        let mut profile = PeriodProfile::new("web".to_owned(), labels, start, 10_000_000);
        profile.end = start + Duration::from_secs(10);
        let main = frame(FrameKind::Python, "<module>", "/srv/app.py", 1, 30);
        let crunch = |line| frame(FrameKind::Python, "Worker.crunch", "/srv/app.py", 10, line);
        let write = frame(FrameKind::Native, "__write", "/usr/lib/libc.so.6", 0, 0);
        let syscall = frame(FrameKind::Kernel, "ksys_write", "", 0, 0);
        let truncated = Frame::marker("[truncated]");
        let main_thread = thread(42, "python3.12");
        let worker = thread(43, "worker-1");
        profile.add(&[crunch(12), main.clone()], &main_thread, Measurement::Cpu);
        profile.add(&[crunch(12), main.clone()], &main_thread, Measurement::Cpu);
        profile.add(&[crunch(14), main.clone()], &main_thread, Measurement::Cpu);
        profile.add(&[syscall, write, crunch(14), main], &worker, Measurement::Cpu);
        profile.add(&[crunch(12), truncated], &worker, Measurement::Cpu);
        let counts = ThreadCounts { live: 2, started: 1, ended: 0 };
        profile.threads = vec![ProcessThreads { pid: 42, process_name: "python3.12".into(), counts }];
        profile
    }

    /// A decoded sample, its strings resolved: frames innermost first as
    /// `function file:start_line:line`, values and labels.
    type Resolved = (Vec<String>, Vec<i64>, BTreeMap<String, String>);

    fn resolve(profile: &proto::Profile) -> Vec<Resolved> {
        let string = |id: i64| profile.string_table[id as usize].clone();
        let function = |id: u64| profile.function.iter().find(|function| function.id == id).unwrap();
        let location = |id: u64| profile.location.iter().find(|location| location.id == id).unwrap();
        let mut samples: Vec<Resolved> = profile
            .sample
            .iter()
            .map(|sample| {
                let frames = sample
                    .location_id
                    .iter()
                    .map(|&id| {
                        let location = location(id);
                        assert_eq!((location.mapping_id, location.address, location.is_folded), (0, 0, false));
                        let [line] = &location.line[..] else { panic!("one line per location: {location:?}") };
                        let function = function(line.function_id);
                        format!(
                            "{} {}:{}:{}",
                            string(function.name),
                            string(function.filename),
                            function.start_line,
                            line.line
                        )
                    })
                    .collect();
                let labels = sample.label.iter().map(|label| (string(label.key), string(label.str))).collect();
                (frames, sample.value.clone(), labels)
            })
            .collect();
        samples.sort();
        samples
    }

    fn labels(tid: u32, thread_name: &str) -> BTreeMap<String, String> {
        [
            ("pid", "42"),
            ("tid", &tid.to_string()),
            ("thread_name", thread_name),
            ("process_name", "python3.12"),
            ("env", "prod"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
    }

    #[test]
    fn decodes_to_what_was_sampled() {
        let encoded = encode(&profile());
        let decoded = proto::Profile::decode(&encoded[..]).unwrap();
        let string = |id: i64| decoded.string_table[id as usize].as_str();

        assert_eq!(decoded.string_table[0], "");
        let value_type = |value_type: &proto::ValueType| (string(value_type.r#type), string(value_type.unit));
        let sample_types: Vec<_> = decoded.sample_type.iter().map(value_type).collect();
        assert_eq!(sample_types, [("samples", "count"), ("cpu", "nanoseconds")]);
        assert_eq!(decoded.period_type.as_ref().map(value_type), Some(("cpu", "nanoseconds")));
        assert_eq!(decoded.period, 10_000_000);
        assert_eq!(string(decoded.default_sample_type), "cpu");
        assert_eq!(decoded.time_nanos, START.as_nanos() as i64);
        assert_eq!(decoded.duration_nanos, 10_000_000_000);
        assert!(decoded.mapping.is_empty());
        assert_eq!((decoded.drop_frames, decoded.keep_frames), (0, 0));
        let comments: Vec<_> = decoded.comment.iter().map(|&id| string(id)).collect();
        assert_eq!(comments, ["threads pid=42 process_name=python3.12 live=2 started=1 ended=0"]);

        assert_eq!(decoded.function.len(), 5, "one function per name, file and start line");
        assert_eq!(decoded.location.len(), 6, "one location per function and line");
        let ids = |ids: Vec<u64>| ids.iter().copied().eq(1..=ids.len() as u64);
        assert!(ids(decoded.function.iter().map(|function| function.id).collect()));
        assert!(ids(decoded.location.iter().map(|location| location.id).collect()));

        let mut system_names: Vec<_> = decoded.function.iter().filter(|function| function.system_name != 0).collect();
        system_names.sort_by_key(|function| string(function.name));
        assert!(system_names.iter().all(|function| function.system_name == function.name));
        let system_names: Vec<_> = system_names.iter().map(|function| string(function.name)).collect();
        assert_eq!(system_names, ["__write", "ksys_write"], "only native and kernel symbols have system names");

        let crunch = |line| format!("Worker.crunch /srv/app.py:10:{line}");
        let main = "<module> /srv/app.py:1:30".to_owned();
        let mut expected: Vec<Resolved> = vec![
            (
                vec![
                    "ksys_write [kernel.kallsyms]:0:0".to_owned(),
                    "__write /usr/lib/libc.so.6:0:0".to_owned(),
                    crunch(14),
                    main.clone(),
                ],
                vec![1, 10_000_000],
                labels(43, "worker-1"),
            ),
            (vec![crunch(12), main.clone()], vec![2, 20_000_000], labels(42, "python3.12")),
            (vec![crunch(12), "[truncated] :0:0".to_owned()], vec![1, 10_000_000], labels(43, "worker-1")),
            (vec![crunch(14), main], vec![1, 10_000_000], labels(42, "python3.12")),
        ];
        expected.sort();
        assert_eq!(resolve(&decoded), expected);
        assert_eq!(encode(&profile()), encoded, "the same profile encodes to the same bytes");
    }

    fn go_pprof(args: &[&str], file: &Path) -> String {
        let output = Command::new("go").args(["tool", "pprof"]).args(args).arg(file).output().unwrap_or_else(|error| {
            panic!("cannot run `go tool pprof` ({error}): this test needs Go, e.g. `apt-get install golang-go`")
        });
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "go tool pprof {args:?} failed: {stderr}{stdout}");
        stdout
    }

    /// The reference reader accepts the profile and sees what was sampled.
    #[test]
    fn go_pprof_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("profile.pb.gz");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&encode(&profile())).unwrap();
        std::fs::write(&file, gzip.finish().unwrap()).unwrap();

        let raw = go_pprof(&["-raw"], &file);
        for expected in [
            "PeriodType: cpu nanoseconds",
            "Period: 10000000",
            "Duration: 10s",
            "samples/count cpu/nanoseconds[dflt]",
            "env:[prod] pid:[42] process_name:[python3.12] thread_name:[worker-1] tid:[43]",
            " Worker.crunch /srv/app.py:12 s=10",
            " Worker.crunch /srv/app.py:14 s=10",
            " <module> /srv/app.py:30 s=1",
            " __write /usr/lib/libc.so.6:0 s=0",
            " ksys_write [kernel.kallsyms]:0 s=0",
            " [truncated] :0 s=0",
        ] {
            assert!(raw.contains(expected), "`go tool pprof -raw` lacks {expected:?}:\n{raw}");
        }

        // Flat and cumulative, in CPU time (the default) and in samples.
        let top = go_pprof(&["-top"], &file);
        let samples = go_pprof(&["-top", "-sample_index=samples"], &file);
        for (function, flat, cum, flat_samples, cum_samples) in [
            ("Worker.crunch", "40ms", "50ms", "4", "5"),
            ("<module>", "0", "40ms", "0", "4"),
            ("__write", "0", "10ms", "0", "1"),
            ("ksys_write", "10ms", "10ms", "1", "1"),
            ("[truncated]", "0", "10ms", "0", "1"),
        ] {
            assert_eq!(top_row(&top, function), (flat, cum), "{function} in:\n{top}");
            assert_eq!(top_row(&samples, function), (flat_samples, cum_samples), "{function} in:\n{samples}");
        }

        let tags = go_pprof(&["-tags"], &file);
        for expected in ["50.0ms (  100%): prod", "30.0ms (60.00%): python3.12", "20.0ms (40.00%): worker-1", ": 43\n"]
        {
            assert!(tags.contains(expected), "`go tool pprof -tags` lacks {expected:?}:\n{tags}");
        }
    }

    /// With wall time, every sample has four values and off-CPU time a `wait`
    /// label, which `go tool pprof` can filter on.
    #[test]
    fn wall_and_off_cpu_time_with_wait_labels() {
        let mut profile = profile();
        profile.dimensions.insert(Dimension::Wall);
        let sleep = frame(FrameKind::Python, "Worker.nap", "/srv/app.py", 20, 21);
        let off_cpu = |wait, ns| Measurement::OffCpu { wait, ns };
        profile.add(std::slice::from_ref(&sleep), &thread(43, "worker-1"), off_cpu(Wait::Sleep, 2_000_000_000));
        profile.add(&[sleep], &thread(43, "worker-1"), off_cpu(Wait::Io, 500_000_000));
        let decoded = proto::Profile::decode(&encode(&profile)[..]).unwrap();
        let string = |id: i64| decoded.string_table[id as usize].as_str();
        let types: Vec<_> = decoded.sample_type.iter().map(|t| (string(t.r#type), string(t.unit))).collect();
        assert_eq!(
            types,
            [("samples", "count"), ("cpu", "nanoseconds"), ("wall", "nanoseconds"), ("off_cpu", "nanoseconds")]
        );
        assert_eq!(string(decoded.default_sample_type), "cpu");
        let resolved = resolve(&decoded);
        let nap = |wait: &str| {
            resolved
                .iter()
                .find(|(frames, _, labels)| frames[0].starts_with("Worker.nap") && labels["wait"] == wait)
                .map(|(_, values, _)| values.clone())
        };
        assert_eq!(nap("sleep"), Some(vec![0, 0, 2_000_000_000, 2_000_000_000]));
        assert_eq!(nap("io"), Some(vec![0, 0, 500_000_000, 500_000_000]));
        let cpu_only = resolved.iter().find(|(_, _, labels)| labels["tid"] == "42").unwrap();
        assert_eq!(cpu_only.1, [2, 20_000_000, 20_000_000, 0], "CPU time is wall time too");
        assert!(!cpu_only.2.contains_key("wait"), "CPU samples have no wait label");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("profile.pb.gz");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&encode(&profile)).unwrap();
        std::fs::write(&file, gzip.finish().unwrap()).unwrap();
        let top = go_pprof(&["-top", "-sample_index=off_cpu", "-tagfocus=wait=sleep"], &file);
        assert_eq!(top_row(&top, "Worker.nap"), ("2s", "2s"), "{top}");
    }

    /// The flat and cumulative columns of `function` in `go tool pprof -top`.
    fn top_row<'a>(top: &'a str, function: &str) -> (&'a str, &'a str) {
        let row = top
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|row| row.len() == 6 && row[5] == function);
        let row = row.unwrap_or_else(|| panic!("no row for {function}"));
        (row[0], row[3])
    }
}
