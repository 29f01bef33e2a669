//! Samples grouped per application and period: what a profile file holds.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use profiler_common::ThreadTally;

pub mod heap;
pub mod sample_type;

pub use sample_type::{Dimension, Dimensions, Measurement, SampleType, StackValue};

use crate::stack::{Frame, Thread, Wait};

/// Index of a frame in [`PeriodProfile::frames`].
pub type FrameId = u32;

/// A stack, innermost frame first, with the thread it ran on and, off the
/// CPU, what it waited for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub frames: Box<[FrameId]>,
    pub thread: Thread,
    pub wait: Option<Wait>,
}

/// The threads of one process over a period: a thread leak shows as a
/// `live` count that grows period after period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounts {
    pub live: u32,
    pub started: u32,
    pub ended: u32,
}

impl ThreadCounts {
    /// The counts of a period from the kernel's tallies at its start and end
    /// and the threads live at its end. A tally smaller than the one before
    /// belongs to a new program (an exec), counted from zero.
    pub fn between(start: ThreadTally, end: ThreadTally, live: u32) -> Self {
        let since = |end: u32, start: u32| end.checked_sub(start).unwrap_or(end);
        ThreadCounts { live, started: since(end.started, start.started), ended: since(end.ended, start.ended) }
    }
}

/// What a profile is of: an application, and the labels its processes give
/// themselves (`FERROSCOPE_LABELS`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Series {
    pub application: Arc<str>,
    pub labels: Arc<BTreeMap<String, String>>,
}

impl Series {
    pub fn new(application: &str) -> Self {
        Series { application: application.into(), labels: Arc::default() }
    }
}

/// The threads of one process of an application, over a period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessThreads {
    pub pid: u32,
    pub process_name: Arc<str>,
    pub counts: ThreadCounts,
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
    /// What was measured: CPU time, and off-CPU time (so that wall time is
    /// meaningful) or allocations if asked for.
    pub dimensions: Dimensions,
    /// The upload timeout its process asked for, if it did.
    pub upload_timeout: Option<Duration>,
    /// Interned frames; [`StackKey::frames`] index into it.
    pub frames: Vec<Frame>,
    frame_ids: HashMap<Frame, FrameId>,
    pub stacks: HashMap<StackKey, StackValue>,
    /// Threads of the application's processes, by pid.
    pub threads: Vec<ProcessThreads>,
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
            dimensions: Dimensions::CPU,
            upload_timeout: None,
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            stacks: HashMap::new(),
            threads: Vec::new(),
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

    /// Adds `measurement` of `stack` (innermost first), taken on `thread`.
    pub fn add(&mut self, stack: &[Frame], thread: &Thread, measurement: Measurement) {
        let frames = stack.iter().map(|frame| self.intern(frame)).collect();
        let key = StackKey { frames, thread: thread.clone(), wait: measurement.wait() };
        measurement.add_to(self.stacks.entry(key).or_default(), self.sample_period_ns);
    }

    /// The sample types of the profile, in pprof's order.
    pub fn sample_types(&self) -> impl Iterator<Item = SampleType> {
        self.dimensions.sample_types()
    }

    /// The sum of `sample_type` over every stack.
    pub fn total(&self, sample_type: SampleType) -> u64 {
        self.stacks.values().map(|value| value[sample_type]).sum()
    }

    pub fn total_samples(&self) -> u64 {
        self.total(SampleType::Samples)
    }
}

/// The profiles of the current period, one per series.
pub struct Aggregator {
    labels: BTreeMap<String, String>,
    sample_period_ns: u64,
    dimensions: Dimensions,
    start: SystemTime,
    profiles: HashMap<Series, PeriodProfile>,
    /// Series whose process asked for its own period and upload timeout
    /// (the Python API), with the start of their current period.
    own_periods: HashMap<Series, OwnPeriod>,
}

#[derive(Clone, Copy, Debug)]
struct OwnPeriod {
    period: Duration,
    upload_timeout: Option<Duration>,
    start: SystemTime,
}

impl Aggregator {
    /// Profiles of the `dimensions` measured, with the agent's `labels`.
    pub fn new(
        labels: BTreeMap<String, String>,
        sample_period_ns: u64,
        dimensions: Dimensions,
        start: SystemTime,
    ) -> Self {
        Aggregator {
            labels,
            sample_period_ns,
            dimensions,
            start,
            profiles: HashMap::new(),
            own_periods: HashMap::new(),
        }
    }

    fn profile(&mut self, series: &Series) -> &mut PeriodProfile {
        if !self.profiles.contains_key(series) {
            // A process's own labels are more specific than the agent's.
            let mut labels = self.labels.clone();
            labels.extend(series.labels.iter().map(|(key, value)| (key.clone(), value.clone())));
            let own = self.own_periods.get(series);
            let start = own.map_or(self.start, |own| own.start);
            let mut profile = PeriodProfile::new(series.application.to_string(), labels, start, self.sample_period_ns);
            profile.upload_timeout = own.and_then(|own| own.upload_timeout);
            profile.dimensions = self.dimensions;
            self.profiles.insert(series.clone(), profile);
        }
        self.profiles.get_mut(series).expect("inserted above")
    }

    /// Adds `measurement` of `stack` (innermost first), taken on `thread`,
    /// to the profile of `series`.
    pub fn add(&mut self, series: &Series, stack: &[Frame], thread: &Thread, measurement: Measurement) {
        self.profile(series).add(stack, thread, measurement);
    }

    /// Gives `series` its own period and upload timeout, from `now`.
    pub fn set_own_period(
        &mut self,
        series: &Series,
        period: Duration,
        upload_timeout: Option<Duration>,
        now: SystemTime,
    ) {
        self.own_periods.insert(series.clone(), OwnPeriod { period, upload_timeout, start: now });
    }

    /// Ends the periods of their own that are over at `now`: their profiles.
    pub fn finish_own_periods(&mut self, now: SystemTime) -> Vec<PeriodProfile> {
        let mut finished = Vec::new();
        for (series, own) in &mut self.own_periods {
            if own.start + own.period <= now {
                own.start = now;
                if let Some(mut profile) = self.profiles.remove(series) {
                    profile.end = now;
                    finished.push(profile);
                }
            }
        }
        finished
    }

    /// Ends the period of one series early, at `end` (its process stopped
    /// being profiled): its profile so far, if it has one.
    pub fn take(&mut self, series: &Series, end: SystemTime) -> Option<PeriodProfile> {
        self.own_periods.remove(series);
        let mut profile = self.profiles.remove(series)?;
        profile.end = end;
        Some(profile)
    }

    /// Ends the period at `end`: returns its profiles, sorted by application
    /// and labels,
    /// and starts the next period there.
    pub fn finish_period(&mut self, end: SystemTime) -> Vec<PeriodProfile> {
        self.finish(end, false)
    }

    /// Ends every period, those of their own included, at `end`: the agent
    /// stops.
    pub fn finish_all(&mut self, end: SystemTime) -> Vec<PeriodProfile> {
        self.finish(end, true)
    }

    fn finish(&mut self, end: SystemTime, all: bool) -> Vec<PeriodProfile> {
        let own: Vec<Series> = if all { Vec::new() } else { self.own_periods.keys().cloned().collect() };
        let kept: Vec<(Series, PeriodProfile)> =
            own.iter().filter_map(|series| Some((series.clone(), self.profiles.remove(series)?))).collect();
        let mut profiles: Vec<_> = self.profiles.drain().map(|(_, profile)| profile).collect();
        self.profiles.extend(kept);
        for profile in &mut profiles {
            profile.end = end;
        }
        profiles.sort_by(|a, b| (&a.application, &a.labels).cmp(&(&b.application, &b.labels)));
        self.start = end;
        profiles
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::FrameKind;

    #[test]
    fn a_series_with_its_own_period_leaves_the_agents_schedule() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut aggregator = Aggregator::new(BTreeMap::new(), 10_000_000, Dimensions::CPU, start);
        let own = Series::new("own");
        let thread = Thread {
            pid: 1,
            container_pid: None,
            container_id: None,
            tid: 1,
            thread_name: "t".into(),
            process_name: "p".into(),
            context: None,
        };
        let frame = Frame::marker("[x]");
        aggregator.set_own_period(&own, Duration::from_secs(2), Some(Duration::from_secs(5)), start);
        aggregator.add(&own, std::slice::from_ref(&frame), &thread, Measurement::Cpu);
        aggregator.add(&Series::new("other"), std::slice::from_ref(&frame), &thread, Measurement::Cpu);
        let at = |seconds| start + Duration::from_secs(seconds);
        let global: Vec<_> = aggregator.finish_period(at(1)).into_iter().map(|p| p.application).collect();
        assert_eq!(global, ["other"]);
        assert!(aggregator.finish_own_periods(at(1)).is_empty(), "its 2 s are not over");
        let own_profiles = aggregator.finish_own_periods(at(2));
        assert_eq!(own_profiles.len(), 1);
        assert_eq!((own_profiles[0].start, own_profiles[0].end), (start, at(2)));
        assert_eq!(own_profiles[0].upload_timeout, Some(Duration::from_secs(5)));
        aggregator.add(&own, std::slice::from_ref(&frame), &thread, Measurement::Cpu);
        let last = aggregator.finish_all(at(3));
        assert_eq!((last.len(), last[0].start), (1, at(2)), "the agent's stop ends it too");
    }

    #[test]
    fn thread_counts_are_the_difference_of_two_tallies() {
        let tally = |started, ended| ThreadTally { started, ended };
        let counts = ThreadCounts::between(tally(5, 2), tally(9, 3), 8);
        assert_eq!(counts, ThreadCounts { live: 8, started: 4, ended: 1 });
        // After an exec the kernel counts again from zero.
        let counts = ThreadCounts::between(tally(5, 2), tally(1, 0), 2);
        assert_eq!(counts, ThreadCounts { live: 2, started: 1, ended: 0 });
    }

    fn python(name: &str, line: u32) -> Frame {
        Frame { kind: FrameKind::Python, function: name.into(), file: "app.py".into(), start_line: 1, line }
    }

    fn thread(tid: u32) -> Thread {
        Thread {
            pid: 10,
            container_pid: None,
            container_id: None,
            tid,
            thread_name: "python".into(),
            process_name: "python3.11".into(),
            context: None,
        }
    }

    #[test]
    fn same_stack_on_same_thread_is_counted_once_with_its_weight() {
        let start = SystemTime::UNIX_EPOCH;
        let mut aggregator =
            Aggregator::new(BTreeMap::new(), 10_000_000, Dimensions::CPU.with(Dimension::Wall, true), start);
        let stack = [python("crunch", 5), python("<module>", 9)];
        let app = Series::new("app.py");
        aggregator.add(&app, &stack, &thread(10), Measurement::Cpu);
        aggregator.add(&app, &stack, &thread(10), Measurement::Cpu);
        aggregator.add(&app, &stack, &thread(11), Measurement::Cpu);
        aggregator.add(&app, &stack, &thread(10), Measurement::OffCpu { wait: Wait::Sleep, ns: 5_000_000_000 });
        aggregator.add(&app, &stack, &thread(10), Measurement::OffCpu { wait: Wait::Sleep, ns: 1_000_000_000 });
        aggregator.add(&Series::new("other"), &stack[1..], &thread(11), Measurement::Cpu);
        let end = start + std::time::Duration::from_secs(45);
        let profiles = aggregator.finish_period(end);
        assert_eq!(profiles.len(), 2);
        let app = &profiles[0];
        assert_eq!(app.application, "app.py");
        assert_eq!(app.end, end);
        assert_eq!(app.frames.len(), 2, "frames are interned");
        assert!(app.dimensions.contains(Dimension::Wall));
        assert_eq!(app.stacks.len(), 3, "one stack per thread and wait");
        assert_eq!(app.total_samples(), 3);
        let on_10 = |wait| app.stacks.iter().find(|(key, _)| key.thread.tid == 10 && key.wait == wait).unwrap().1;
        use SampleType::{Cpu, OffCpu, Samples, Wall};
        let on_cpu: StackValue = [(Samples, 2), (Cpu, 20_000_000), (Wall, 20_000_000)].into_iter().collect();
        assert_eq!(*on_10(None), on_cpu);
        let sleeping: StackValue = [(Wall, 6_000_000_000), (OffCpu, 6_000_000_000)].into_iter().collect();
        assert_eq!(*on_10(Some(Wait::Sleep)), sleeping);
        assert!(aggregator.finish_period(end).is_empty(), "a period starts empty");
    }
}
