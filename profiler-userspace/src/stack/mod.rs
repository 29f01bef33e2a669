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
    /// Appends the frames of `pid`'s user addresses, innermost first:
    /// exactly one per address, so that `out[from + i]` (`from` its length
    /// before) is the frame of `addrs[i]`, which
    /// [`InterpreterFrames::insert`] relies on.
    fn user(&mut self, pid: u32, addrs: &[u64], out: &mut Vec<Frame>);
}

/// An interpreter's frames of one sample, put into its native stack (`cpython::Instance`).
pub trait InterpreterFrames {
    /// Names `frames` (innermost first, as the kernel walked them, ending with
    /// `status`) and merges them into `stack[native..]`, the sample's native
    /// user frames: `stack[native + i]` is the frame of `user[i]` (the
    /// sampled instruction, then return addresses).
    fn insert(&mut self, frames: &[PyFrame], status: u32, stack: &mut Vec<Frame>, native: usize, user: &[u64]) -> Walk;
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
    debug_assert_eq!(out.len() - user_from, raw.user.len(), "one frame per user address");
    let walk = interpreter.map_or_else(Walk::default, |interpreter| {
        interpreter.insert(raw.python, raw.python_status, out, user_from, raw.user)
    });
    if raw.wait == Some(Wait::Preempted) {
        out.push(Frame::marker(marker::PREEMPTED));
    }
    walk
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

    fn frame(kind: FrameKind, name: &str) -> Frame {
        Frame { kind, function: name.into(), file: "".into(), start_line: 0, line: 0 }
    }

    fn names(stack: &[Frame]) -> Vec<(FrameKind, &str)> {
        stack.iter().map(|frame| (frame.kind, &*frame.function)).collect()
    }

    /// Names addresses from two fixed tables, and remembers the pids asked about.
    #[derive(Default)]
    struct FakeNative {
        pids: Vec<u32>,
    }

    impl NativeNames for FakeNative {
        fn kernel(&mut self, addrs: &[u64], out: &mut Vec<Frame>) {
            out.extend(addrs.iter().map(|addr| match addr {
                0xffff_0001 => frame(FrameKind::Kernel, "do_syscall_64"),
                0xffff_0002 => frame(FrameKind::Kernel, "entry_SYSCALL_64"),
                _ => frame(FrameKind::Kernel, "[unknown kernel]"),
            }));
        }

        fn user(&mut self, pid: u32, addrs: &[u64], out: &mut Vec<Frame>) {
            self.pids.push(pid);
            out.extend(addrs.iter().map(|addr| match addr {
                0x1000 => frame(FrameKind::Native, "read"),
                0x2000 => frame(FrameKind::Native, EVAL_LOOP),
                0x3000 => frame(FrameKind::Native, "main"),
                _ => frame(FrameKind::Native, "[unknown]"),
            }));
        }
    }

    /// Replaces the first evaluation-loop frame of `stack[native..]`, the
    /// one of address 0x2000, by one Python frame per `PyFrame` (named by
    /// its code address), and records what it was given.
    #[derive(Default)]
    struct FakeInterpreter {
        calls: Vec<(usize, u32, usize, Vec<u64>)>,
        walk: Walk,
    }

    impl InterpreterFrames for FakeInterpreter {
        fn insert(
            &mut self,
            frames: &[PyFrame],
            status: u32,
            stack: &mut Vec<Frame>,
            native: usize,
            user: &[u64],
        ) -> Walk {
            self.calls.push((native, status, frames.len(), user.to_vec()));
            assert_eq!(stack.len() - native, user.len(), "one native frame per user address");
            let python = frames.iter().map(|py| frame(FrameKind::Python, &format!("py@{:#x}", py.code)));
            let at = user.iter().position(|&addr| addr == 0x2000).map(|at| native + at);
            match at {
                Some(at) => {
                    stack.splice(at..=at, python);
                }
                None => stack.extend(python),
            }
            self.walk
        }
    }

    const KERNEL: [u64; 2] = [0xffff_0001, 0xffff_0002];
    const USER: [u64; 3] = [0x1000, 0x2000, 0x3000];
    const PYTHON: [PyFrame; 2] = [PyFrame { code: 0xa0, instr: 0 }, PyFrame { code: 0xb0, instr: 0 }];

    fn raw(wait: Option<Wait>) -> Raw<'static> {
        Raw { pid: 42, kernel: &KERNEL, user: &USER, python: &PYTHON, python_status: 7, wait }
    }

    #[test]
    fn kernel_frames_come_first_then_user_frames() {
        let mut native = FakeNative::default();
        let mut out = Vec::new();
        let walk = assemble(&mut out, &raw(None), &mut native, None);
        assert_eq!(walk, Walk::default());
        assert_eq!(
            names(&out),
            [
                (FrameKind::Kernel, "do_syscall_64"),
                (FrameKind::Kernel, "entry_SYSCALL_64"),
                (FrameKind::Native, "read"),
                (FrameKind::Native, EVAL_LOOP),
                (FrameKind::Native, "main"),
            ]
        );
        assert_eq!(native.pids, [42]);
    }

    #[test]
    fn the_interpreter_merges_into_the_user_frames_after_the_kernel_ones() {
        let mut native = FakeNative::default();
        let mut interpreter = FakeInterpreter { walk: Walk { unnamed: 3, broken: true }, ..FakeInterpreter::default() };
        let mut out = Vec::new();
        let walk = assemble(&mut out, &raw(None), &mut native, Some(&mut interpreter));
        assert_eq!(walk, Walk { unnamed: 3, broken: true }, "the interpreter's walk is passed through");
        assert_eq!(
            interpreter.calls,
            [(KERNEL.len(), 7, PYTHON.len(), USER.to_vec())],
            "native = the number of kernel frames"
        );
        assert_eq!(
            names(&out),
            [
                (FrameKind::Kernel, "do_syscall_64"),
                (FrameKind::Kernel, "entry_SYSCALL_64"),
                (FrameKind::Native, "read"),
                (FrameKind::Python, "py@0xa0"),
                (FrameKind::Python, "py@0xb0"),
                (FrameKind::Native, "main"),
            ]
        );
    }

    #[test]
    fn without_kernel_frames_user_frames_start_at_zero() {
        let mut native = FakeNative::default();
        let mut interpreter = FakeInterpreter::default();
        let mut out = Vec::new();
        let raw = Raw { kernel: &[], ..raw(None) };
        assemble(&mut out, &raw, &mut native, Some(&mut interpreter));
        assert_eq!(interpreter.calls, [(0, 7, PYTHON.len(), USER.to_vec())]);
        assert_eq!(out[0].kind, FrameKind::Native);
    }

    #[test]
    fn preempted_off_cpu_time_ends_with_a_marker() {
        let mut native = FakeNative::default();
        let mut out = Vec::new();
        assemble(&mut out, &raw(Some(Wait::Preempted)), &mut native, None);
        assert_eq!(out.last(), Some(&Frame::marker(marker::PREEMPTED)));
        assert_eq!(out.len(), KERNEL.len() + USER.len() + 1);
        // Only preemption gets a marker: other waits have their stacks.
        for wait in [Wait::Gil, Wait::Lock, Wait::Sleep, Wait::Io, Wait::Other] {
            assemble(&mut out, &raw(Some(wait)), &mut native, None);
            assert_eq!(out.len(), KERNEL.len() + USER.len(), "{wait:?}");
            assert!(out.iter().all(|frame| frame.kind != FrameKind::Marker), "{wait:?}");
        }
    }

    #[test]
    fn each_call_starts_from_an_empty_stack() {
        let mut native = FakeNative::default();
        let mut out = vec![frame(FrameKind::Native, "left over")];
        assemble(&mut out, &raw(Some(Wait::Preempted)), &mut native, None);
        assert_eq!(out.len(), KERNEL.len() + USER.len() + 1);
        let empty = Raw { pid: 1, kernel: &[], user: &[], python: &[], python_status: 0, wait: None };
        assemble(&mut out, &empty, &mut native, None);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn wait_codes_from_the_kernel() {
        use profiler_common::wait;
        assert_eq!(Wait::from_kernel(wait::GIL), Wait::Gil);
        assert_eq!(Wait::from_kernel(wait::PREEMPTED), Wait::Preempted);
        assert_eq!(Wait::from_kernel(u32::MAX), Wait::Other);
        assert_eq!(Wait::Preempted.label(), "preempted");
    }
}
