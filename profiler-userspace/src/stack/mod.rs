//! Stack assembly: the frames of one sample, named, in one order (innermost
//! first), with the thread it ran on and, off the CPU, what it waited for.

use std::{collections::BTreeMap, sync::Arc};

use profiler_common::PyFrame;

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

/// The texts of marker frames: not code, they tell the reader something about the stack.
pub mod marker {
    /// The Python walk stopped at the kernel's frame limit.
    pub const TRUNCATED: &str = "[truncated]";
    /// The Python walk met something that is not a frame chain.
    pub const BROKEN: &str = "[broken python stack]";
    /// A Python frame whose code object could not be read.
    pub const UNKNOWN_PYTHON: &str = "[unknown python frame]";
    /// Off-CPU time of a thread sampled as it got the CPU back: its stacks are not known.
    pub const PREEMPTED: &str = "[preempted]";
}

/// Names native addresses (`native::symbolize::NativeSymbolizer`).
pub trait NativeNames {
    /// Appends the frames of kernel addresses, innermost first.
    fn kernel(&mut self, addrs: &[u64], out: &mut Vec<Frame>);
    /// Appends the frames of `pid`'s user addresses, innermost first.
    fn user(&mut self, pid: u32, addrs: &[u64], out: &mut Vec<Frame>);
}

/// An interpreter's frames of one sample, put into its native stack (`cpython::Instance`).
pub trait InterpreterFrames {
    /// Names `frames` (innermost first, as the kernel walked them, ending with
    /// `status`) and merges them into `stack[native..]`, the sample's native
    /// user frames.
    fn insert(&mut self, frames: &[PyFrame], status: u32, stack: &mut Vec<Frame>, native: usize) -> Walk;
}

/// How an interpreter's walk of one sample went, for the period's summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// Frames whose code could not be named.
    pub unnamed: u64,
    /// The walk met something that is not a frame chain.
    pub broken: bool,
}

/// One sample's stacks, as the kernel took them.
pub struct Raw<'a> {
    pub pid: u32,
    pub kernel: &'a [u64],
    /// The user return addresses that can be trusted.
    pub user: &'a [u64],
    pub python: &'a [PyFrame],
    pub python_status: u32,
    /// Off the CPU: what it waited for.
    pub wait: Option<Wait>,
}

/// Fills `out` with the named stack of `raw`, innermost first: kernel frames,
/// then user frames with the interpreter's merged in, then markers.
pub fn assemble(
    out: &mut Vec<Frame>,
    raw: &Raw,
    native: &mut impl NativeNames,
    interpreter: Option<&mut dyn InterpreterFrames>,
) -> Walk {
    out.clear();
    native.kernel(raw.kernel, out);
    let user_from = out.len();
    native.user(raw.pid, raw.user, out);
    let walk = interpreter.map_or_else(Walk::default, |interpreter| {
        interpreter.insert(raw.python, raw.python_status, out, user_from)
    });
    if raw.wait == Some(Wait::Preempted) {
        out.push(Frame::marker(marker::PREEMPTED));
    }
    walk
}
