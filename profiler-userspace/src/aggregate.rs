//! Samples grouped per application and period: what a profile file holds.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

/// Where a frame comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    Python,
    Native,
    Kernel,
    /// Not code: tells the reader something about the stack, such as
    /// `[truncated]` or `[unknown python frame]`.
    Marker,
}

/// A named frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub kind: FrameKind,
    /// `Worker.crunch` for Python (`__qualname__`), the symbol for native and
    /// kernel code.
    pub function: Arc<str>,
    /// The Python source file, or the object file of native code; empty when
    /// unknown.
    pub file: Arc<str>,
    /// First line of the function (`co_firstlineno`), 0 when unknown.
    pub start_line: u32,
    /// Line being executed, 0 when unknown.
    pub line: u32,
}

impl Frame {
    pub fn marker(text: &str) -> Self {
        Frame { kind: FrameKind::Marker, function: text.into(), file: "".into(), start_line: 0, line: 0 }
    }
}

/// The thread a sample was taken on; becomes the sample's labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Thread {
    pub pid: u32,
    /// The process's pid in its own PID namespace (a container), when it
    /// differs from `pid`.
    pub container_pid: Option<u32>,
    pub tid: u32,
    pub thread_name: Arc<str>,
    pub process_name: Arc<str>,
}

/// Index of a frame in [`PeriodProfile::frames`].
pub type FrameId = u32;

/// A stack, innermost frame first, with the thread it ran on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub frames: Box<[FrameId]>,
    pub thread: Thread,
}

/// Counts of one stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackValue {
    /// Samples taken.
    pub samples: u64,
    /// CPU time they stand for, in nanoseconds.
    pub cpu_ns: u64,
}

/// Everything sampled for one application over one period.
#[derive(Debug)]
pub struct PeriodProfile {
    pub application: String,
    /// Labels of every sample of the profile (`--label`).
    pub labels: BTreeMap<String, String>,
    pub start: SystemTime,
    pub end: SystemTime,
    /// CPU time between two samples of one CPU, in nanoseconds.
    pub sample_period_ns: u64,
    /// Interned frames; [`StackKey::frames`] index into it.
    pub frames: Vec<Frame>,
    frame_ids: HashMap<Frame, FrameId>,
    pub stacks: HashMap<StackKey, StackValue>,
}

impl PeriodProfile {
    pub fn new(
        application: String,
        labels: BTreeMap<String, String>,
        start: SystemTime,
        sample_period_ns: u64,
    ) -> Self {
        PeriodProfile {
            application,
            labels,
            start,
            end: start,
            sample_period_ns,
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            stacks: HashMap::new(),
        }
    }

    fn intern(&mut self, frame: &Frame) -> FrameId {
        if let Some(&id) = self.frame_ids.get(frame) {
            return id;
        }
        let id = self.frames.len() as FrameId;
        self.frames.push(frame.clone());
        self.frame_ids.insert(frame.clone(), id);
        id
    }

    /// Adds one sample of `stack` (innermost first) taken on `thread`.
    pub fn add(&mut self, stack: &[Frame], thread: &Thread) {
        let frames = stack.iter().map(|frame| self.intern(frame)).collect();
        let value = self.stacks.entry(StackKey { frames, thread: thread.clone() }).or_default();
        value.samples += 1;
        value.cpu_ns += self.sample_period_ns;
    }

    pub fn total_samples(&self) -> u64 {
        self.stacks.values().map(|value| value.samples).sum()
    }
}

/// The profiles of the current period, one per application.
pub struct Aggregator {
    labels: BTreeMap<String, String>,
    sample_period_ns: u64,
    start: SystemTime,
    profiles: HashMap<String, PeriodProfile>,
}

impl Aggregator {
    pub fn new(labels: BTreeMap<String, String>, sample_period_ns: u64, start: SystemTime) -> Self {
        Aggregator { labels, sample_period_ns, start, profiles: HashMap::new() }
    }

    pub fn add(&mut self, application: &str, stack: &[Frame], thread: &Thread) {
        if !self.profiles.contains_key(application) {
            let profile =
                PeriodProfile::new(application.to_owned(), self.labels.clone(), self.start, self.sample_period_ns);
            self.profiles.insert(application.to_owned(), profile);
        }
        self.profiles.get_mut(application).expect("inserted above").add(stack, thread);
    }

    /// Ends the period at `end`: returns its profiles, sorted by application,
    /// and starts the next period there.
    pub fn finish_period(&mut self, end: SystemTime) -> Vec<PeriodProfile> {
        let mut profiles: Vec<_> = self.profiles.drain().map(|(_, profile)| profile).collect();
        for profile in &mut profiles {
            profile.end = end;
        }
        profiles.sort_by(|a, b| a.application.cmp(&b.application));
        self.start = end;
        profiles
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python(name: &str, line: u32) -> Frame {
        Frame { kind: FrameKind::Python, function: name.into(), file: "app.py".into(), start_line: 1, line }
    }

    fn thread(tid: u32) -> Thread {
        Thread { pid: 10, container_pid: None, tid, thread_name: "python".into(), process_name: "python3.11".into() }
    }

    #[test]
    fn same_stack_on_same_thread_is_counted_once_with_its_weight() {
        let start = SystemTime::UNIX_EPOCH;
        let mut aggregator = Aggregator::new(BTreeMap::new(), 10_000_000, start);
        let stack = [python("crunch", 5), python("<module>", 9)];
        aggregator.add("app.py", &stack, &thread(10));
        aggregator.add("app.py", &stack, &thread(10));
        aggregator.add("app.py", &stack, &thread(11));
        aggregator.add("other", &stack[1..], &thread(11));
        let end = start + std::time::Duration::from_secs(45);
        let profiles = aggregator.finish_period(end);
        assert_eq!(profiles.len(), 2);
        let app = &profiles[0];
        assert_eq!(app.application, "app.py");
        assert_eq!(app.end, end);
        assert_eq!(app.frames.len(), 2, "frames are interned");
        assert_eq!(app.stacks.len(), 2, "one stack per thread");
        assert_eq!(app.total_samples(), 3);
        let on_10 = app.stacks.iter().find(|(key, _)| key.thread.tid == 10).unwrap().1;
        assert_eq!(*on_10, StackValue { samples: 2, cpu_ns: 20_000_000 });
        assert!(aggregator.finish_period(end).is_empty(), "a period starts empty");
    }
}
