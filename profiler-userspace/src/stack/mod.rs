//! Stack assembly: the frames of one sample, named, in one order (innermost
//! first), with the thread it ran on and, off the CPU, what it waited for.

use std::{collections::BTreeMap, sync::Arc};

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
    /// The ID of the container it runs in, from its cgroup.
    pub container_id: Option<Arc<str>>,
    pub tid: u32,
    pub thread_name: Arc<str>,
    pub process_name: Arc<str>,
    /// The labels the thread set for what it runs now (the Python API's
    /// `profiler.labels(...)`), if any.
    pub context: Option<Arc<BTreeMap<String, String>>>,
}

/// What a thread off the CPU waited for: the `wait` label of off-CPU time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wait {
    /// CPython's GIL (3.7 and later; on 3.6 it shows as `Lock`).
    Gil,
    /// A futex: a lock, condition or event.
    Lock,
    Sleep,
    Io,
    /// Runnable, but another task had the CPU.
    Preempted,
    Other,
}

impl Wait {
    /// From one of the kernel's `profiler_common::wait` constants.
    pub fn from_kernel(code: u32) -> Self {
        use profiler_common::wait;
        match code {
            wait::GIL => Wait::Gil,
            wait::LOCK => Wait::Lock,
            wait::SLEEP => Wait::Sleep,
            wait::IO => Wait::Io,
            wait::PREEMPTED => Wait::Preempted,
            _ => Wait::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Wait::Gil => "gil",
            Wait::Lock => "lock",
            Wait::Sleep => "sleep",
            Wait::Io => "io",
            Wait::Preempted => "preempted",
            Wait::Other => "other",
        }
    }
}
