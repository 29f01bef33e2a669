//! The processes the agent knows: what each is profiled as, its pod's
//! labels, its interpreter, and when to look at it again.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use profiler_common::ThreadTally;

use super::{
    containers::{self, Container},
    discovery::{self, ProcessInfo},
    kubernetes::Pods,
};
use crate::{aggregate::Series, cpython, stack::Thread};

/// What the agent knows of one process.
pub struct Process {
    /// The application it is profiled as, with its own labels.
    pub series: Series,
    /// The application name discovery gave it.
    discovered: Arc<str>,
    /// What it registered as on the control socket, if it did.
    registered: Option<Series>,
    pub process_name: Arc<str>,
    /// Its pid in its own PID namespace, when that differs.
    container_pid: Option<u32>,
    /// The container it runs in, from its cgroup.
    container: Option<Container>,
    /// The CPython it runs, when profiled as such.
    pub python: Option<cpython::Instance>,
    /// Whether and when to look at it again.
    recheck: Recheck,
    /// Executable address ranges, sorted; empty when unknown.
    code: Vec<Range<u64>>,
    /// When `code` was read: it is read again, at most this often, when an
    /// address falls outside it (a library loaded since, or garbage).
    code_read: Instant,
    pub exited: bool,
    /// The kernel's thread tally at the end of the last period.
    pub threads_seen: ThreadTally,
    /// It asked, on the control socket, not to be profiled any more.
    pub stopped: bool,
    /// Its context label sets, by id (see `StackRecord::label_set`), and their bytes.
    label_sets: HashMap<u64, Arc<BTreeMap<String, String>>>,
    label_set_bytes: usize,
}

/// When to look at a process again.
pub enum Recheck {
    Never,
    /// No CPython was found in it: again when it maps new code, which may be
    /// a libpython it loads with `dlopen` (uwsgi's Python plugin, say).
    OnNewCode,
    /// CPython still starting up (its version not yet in memory): again at
    /// `next`, until `give_up`.
    At {
        next: Instant,
        give_up: Instant,
    },
}

/// How often, and how long, a starting CPython is looked at again.
const STARTING_RECHECK: Duration = Duration::from_millis(50);
const STARTING_PATIENCE: Duration = Duration::from_secs(5);

/// Context label sets a process may define (`Profiler.labels(...)`: one per
/// distinct set of labels), and their bytes: what a process sends stays small.
pub const MAX_LABEL_SETS: usize = 1024;
pub const MAX_LABEL_SET_BYTES: usize = 256 * 1024;
/// Their bytes over all processes: many processes of one user cannot grow the agent either.
pub const MAX_ALL_LABEL_SET_BYTES: usize = 8 << 20;

/// How often a process's executable ranges may be read again.
const CODE_RANGES_REFRESH: Duration = Duration::from_secs(1);

impl Process {
    /// The user return addresses that can be trusted: without frame pointers
    /// `bpf_get_stack` reads stack garbage after the first frames, so the
    /// stack ends at the first address outside executable code (or after the
    /// sampled instruction when the mappings are unknown).
    pub fn user_stack<'s>(&self, addrs: &'s [u64]) -> &'s [u64] {
        let executable = |addr: &u64| {
            let next = self.code.partition_point(|range| range.end <= *addr);
            self.code.get(next).is_some_and(|range| range.contains(addr))
        };
        let len = addrs.iter().skip(1).position(|addr| !executable(addr)).map_or(addrs.len(), |bad| bad + 1);
        &addrs[..len]
    }

    /// Whether it is time to look at it again, given a sample's user stack
    /// `addrs`: an address outside its code reads its mappings again (at
    /// most once per [`CODE_RANGES_REFRESH`]), and new ones call for a look.
    pub fn due(&mut self, pid: u32, addrs: &[u64]) -> bool {
        match self.recheck {
            Recheck::Never => false,
            Recheck::At { next, .. } => Instant::now() >= next,
            Recheck::OnNewCode => {
                if self.user_stack(addrs).len() == addrs.len()
                    || self.exited
                    || self.code_read.elapsed() <= CODE_RANGES_REFRESH
                {
                    return false;
                }
                self.code_read = Instant::now();
                match discovery::code_ranges(pid) {
                    Ok(code) if code != self.code => {
                        self.code = code;
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// The thread `tid` of this process, named `thread_name`, running with
    /// its context label set `label_set`.
    pub fn thread(&self, pid: u32, tid: u32, thread_name: Arc<str>, label_set: u64) -> Thread {
        Thread {
            pid,
            container_pid: self.container_pid,
            container_id: self.container.as_ref().and_then(|container| container.id.clone()),
            tid,
            thread_name,
            process_name: self.process_name.clone(),
            context: self.label_sets.get(&label_set).cloned(),
        }
    }
}

/// What a look at a process found, for [`Table::looked_at`].
pub struct Look {
    pub info: ProcessInfo,
    pub python: Option<cpython::Instance>,
    pub recheck: Recheck,
}

/// Every process the agent knows, by pid.
#[derive(Default)]
pub struct Table {
    processes: HashMap<u32, Process>,
    /// The agent's `--application-name`, which a process's own name for itself overrides.
    application_name: Option<String>,
    /// With `--kubernetes`: this node's pods.
    pods: Option<Pods>,
    /// The pods' generation the processes' labels were last set from.
    pods_seen: u64,
}

impl Table {
    pub fn new(application_name: Option<String>, pods: Option<Pods>) -> Self {
        Table { application_name, pods, ..Table::default() }
    }

    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.processes.get(&pid)
    }

    pub fn get_mut(&mut self, pid: u32) -> Option<&mut Process> {
        self.processes.get_mut(&pid)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Process)> {
        self.processes.iter_mut().map(|(&pid, process)| (pid, process))
    }

    /// The processes profiled as CPython.
    pub fn pythons(&self) -> usize {
        self.processes.values().filter(|process| process.python.is_some()).count()
    }

    /// When to look again at a process caught starting, unless it has been
    /// starting for [`STARTING_PATIENCE`] already.
    pub fn retry(&self, pid: u32) -> Option<Recheck> {
        let now = Instant::now();
        let give_up = match self.processes.get(&pid).map(|process| &process.recheck) {
            Some(Recheck::At { give_up, .. }) => *give_up,
            _ => now + STARTING_PATIENCE,
        };
        (now < give_up).then_some(Recheck::At { next: now + STARTING_RECHECK, give_up })
    }

    /// Records a process that could not be read, named `name`; to be looked
    /// at again per `recheck` (never: it is gone).
    pub fn unreadable(&mut self, pid: u32, name: Arc<str>, recheck: Recheck) -> Option<Process> {
        let process = Process {
            series: Series::new(self.application_name.as_deref().unwrap_or(&name)),
            discovered: name.clone(),
            registered: None,
            process_name: name,
            // What can be read of it: its samples keep their container.
            container_pid: discovery::own_namespace_pid(pid),
            container: containers::of_process(pid),
            python: None,
            exited: matches!(recheck, Recheck::Never),
            recheck,
            code: Vec::new(),
            code_read: Instant::now(),
            threads_seen: ThreadTally::default(),
            stopped: false,
            label_sets: HashMap::new(),
            label_set_bytes: 0,
        };
        self.processes.insert(pid, process)
    }

    /// Records what a look at `pid` found; returns what was known of it
    /// before (another program image, after an exec).
    pub fn looked_at(&mut self, pid: u32, look: Look) -> Option<Process> {
        let Look { info, python, recheck } = look;
        let known = self.processes.get(&pid);
        // A process's own name for itself wins over the agent's.
        let application = info.own.application.as_deref().or(self.application_name.as_deref());
        let discovered = application.map_or(info.application, Arc::from);
        let same_program = known.is_some_and(|known| known.discovered == discovered);
        // A registration (control socket) made before this look, as by a
        // forked child before its first sample, holds unless the process now
        // runs another program.
        let registered = known.and_then(|known| known.registered.clone()).filter(|_| same_program);
        let series =
            registered.clone().unwrap_or(Series { application: discovered.clone(), labels: Arc::new(info.own.labels) });
        let process = Process {
            series: self.with_pod_labels(series, info.container.as_ref()),
            discovered,
            registered,
            process_name: info.process_name,
            container_pid: info.namespace_pid,
            container: info.container,
            python,
            recheck,
            code: info.code,
            code_read: Instant::now(),
            exited: false,
            // Looked at again (still starting, or new code): its threads were
            // counted up to the last period end all the same.
            threads_seen: known.map_or_else(ThreadTally::default, |known| known.threads_seen),
            stopped: known.is_some_and(|known| known.stopped) && same_program,
            label_sets: known.map(|known| known.label_sets.clone()).unwrap_or_default(),
            label_set_bytes: known.map_or(0, |known| known.label_set_bytes),
        };
        self.processes.insert(pid, process)
    }

    /// Profiles `pid` as `registered` from now on (the control socket's `start`).
    pub fn register(&mut self, pid: u32, registered: Series) -> Option<&Process> {
        let series = self.with_pod_labels(registered.clone(), self.processes.get(&pid)?.container.as_ref());
        let process = self.processes.get_mut(&pid)?;
        process.registered = Some(registered);
        process.series = series;
        process.stopped = false;
        Some(process)
    }

    /// Label set `id` of process `pid` stands for `labels`, unless the
    /// process has [`MAX_LABEL_SETS`] or [`MAX_LABEL_SET_BYTES`] already, or
    /// all processes [`MAX_ALL_LABEL_SET_BYTES`].
    pub fn set_label_set(&mut self, pid: u32, id: u64, labels: BTreeMap<String, String>) -> Result<(), String> {
        let all: usize = self.processes.values().map(|process| process.label_set_bytes).sum();
        let Some(process) = self.processes.get_mut(&pid) else { return Ok(()) };
        let bytes = |labels: &BTreeMap<String, String>| labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let replaced = process.label_sets.get(&id).map_or(0, |old| bytes(old));
        let held = process.label_set_bytes - replaced + bytes(&labels);
        let count = process.label_sets.len() + usize::from(!process.label_sets.contains_key(&id));
        if count > MAX_LABEL_SETS || held > MAX_LABEL_SET_BYTES {
            return Err(format!(
                "a process has at most {MAX_LABEL_SETS} label sets of {} KiB in all: reuse their ids",
                MAX_LABEL_SET_BYTES / 1024
            ));
        }
        if all - process.label_set_bytes + held > MAX_ALL_LABEL_SET_BYTES {
            return Err("the agent holds as many label sets as it takes, from all processes: try again later".into());
        }
        process.label_sets.insert(id, Arc::new(labels));
        process.label_set_bytes = held;
        Ok(())
    }

    /// Labels the processes in pods that have become known since last time.
    pub fn label_new_pods(&mut self) {
        let Some(pods) = &self.pods else { return };
        let generation = pods.generation();
        if generation == self.pods_seen {
            return;
        }
        self.pods_seen = generation;
        let pods = self.pods.as_ref();
        for process in self.processes.values_mut().filter(|process| process.container.is_some()) {
            process.series = with_pod_labels(pods, process.series.clone(), process.container.as_ref());
        }
    }

    fn with_pod_labels(&self, series: Series, container: Option<&Container>) -> Series {
        with_pod_labels(self.pods.as_ref(), series, container)
    }

    /// Removes the processes that exited, to be forgotten everywhere else.
    pub fn take_exited(&mut self) -> Vec<(u32, Process)> {
        let exited: Vec<u32> = self.processes.iter().filter(|(_, p)| p.exited).map(|(&pid, _)| pid).collect();
        exited.into_iter().filter_map(|pid| self.processes.remove(&pid).map(|process| (pid, process))).collect()
    }
}

/// `series` with the labels of the pod `container` belongs to, if known; the
/// process's own labels win.
fn with_pod_labels(pods: Option<&Pods>, series: Series, container: Option<&Container>) -> Series {
    let Some(mut pod_labels) = pods.zip(container).and_then(|(pods, container)| pods.labels(container)) else {
        return series;
    };
    if pod_labels.keys().all(|key| series.labels.contains_key(key)) {
        return series;
    }
    pod_labels.extend(series.labels.iter().map(|(key, value)| (key.clone(), value.clone())));
    Series { application: series.application, labels: Arc::new(pod_labels) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_stacks_end_at_the_first_address_outside_code() {
        let mut table = Table::default();
        table.unreadable(1, "app".into(), Recheck::OnNewCode);
        let process = table.get_mut(1).unwrap();
        process.code = vec![0x1000..0x2000, 0x5000..0x6000];
        assert_eq!(process.user_stack(&[0x1500, 0x5fff, 0x9000, 0x1100]), [0x1500, 0x5fff]);
        assert_eq!(process.user_stack(&[0x1500, 0x1600]), [0x1500, 0x1600]);
        // The sampled instruction itself is always kept.
        assert_eq!(process.user_stack(&[0x9000, 0x9500, 0x1500]), [0x9000]);
        assert_eq!(process.user_stack(&[]), [] as [u64; 0]);
        process.code = Vec::new();
        assert_eq!(process.user_stack(&[0x1500, 0x1600]), [0x1500]);
    }

    #[test]
    fn label_sets_are_bounded_per_process_and_in_all() {
        let mut table = Table::default();
        let labels = |value: &str| BTreeMap::from([("endpoint".to_owned(), value.to_owned())]);
        table.unreadable(1, "app".into(), Recheck::Never);
        for id in 1..=MAX_LABEL_SETS as u64 {
            table.set_label_set(1, id, labels("/checkout")).unwrap();
        }
        // The same id again replaces its set; one more is refused.
        table.set_label_set(1, 5, labels("/search")).unwrap();
        let refused = table.set_label_set(1, 0x10000, labels("/cart")).unwrap_err();
        assert!(refused.contains("at most 1024 label sets"), "{refused}");
        let big = "x".repeat(2000);
        let mut processes = 2..;
        let error = loop {
            let pid = processes.next().unwrap();
            table.unreadable(pid, "app".into(), Recheck::Never);
            let filled = (1..).map(|id| table.set_label_set(pid, id, labels(&big))).find(Result::is_err).unwrap();
            let error = filled.unwrap_err();
            if !error.contains("at most") {
                break error;
            }
        };
        assert!(error.contains("from all processes"), "{error}");
        let all: usize = table.processes.values().map(|process| process.label_set_bytes).sum();
        assert!(all <= MAX_ALL_LABEL_SET_BYTES, "{all} bytes held");
    }
}
