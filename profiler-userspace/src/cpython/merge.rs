//! One stack from two chains: the native frames the kernel unwound and the
//! Python frames it walked, both innermost first.
//!
//! Each native frame of CPython's evaluation loop (`_PyEval_EvalFrameDefault`)
//! is replaced by the Python frames it was running. Before 3.11 that is one
//! frame per call. From 3.11 one call runs Python-to-Python calls inline, and
//! the kernel marks the first frame of each call ([`PY_ENTRY_FRAME`], from
//! 3.11's `is_entry` or the shim frame 3.12+ pushes under it): a call's
//! frames are those up to and including the next marked one. Generators and
//! C code calling back into Python (a `sorted(key=...)`, a C extension's
//! callback) start a call of their own, so they match the same way. Python
//! frames left over (a native stack cut short) go outermost; without any
//! evaluation-loop frame (no symbols, no unwinding) they go outermost too,
//! as before native unwinding.
//!
//! Evaluation-loop frames are found by address ([`EvalLoop::Address`]): the
//! function's range, from the interpreter's ELF symbols, holds the frame's
//! address, whatever native symbolization named it (`[unknown]` when it
//! failed, a neighbour's name in a stripped file). Only an interpreter whose
//! file lacks the symbol (or its size) falls back to the frame's name
//! ([`EvalLoop::Name`]).

use std::ops::Range;

use profiler_common::PY_ENTRY_FRAME;

use crate::stack::{Frame, FrameKind};

/// The native function that runs Python frames.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

/// How to tell the native frames that are calls of the evaluation loop.
#[derive(Clone, Copy, Debug)]
pub enum EvalLoop<'a> {
    /// Those whose address is in `range`, the evaluation loop's code:
    /// `user[i]` is the address of native frame `i`, innermost first. The
    /// first is the sampled instruction, in the function when `start <= a <
    /// end`; the others are return addresses, just after a call, so in the
    /// function when `start < a <= end` (a call that never returns may end
    /// it, and an address at `start` returns to the function before).
    Address { range: &'a Range<u64>, user: &'a [u64] },
    /// Those named `_PyEval_EvalFrameDefault`, when its addresses are not known.
    Name,
}

impl EvalLoop<'_> {
    /// Whether native frame `i`, `frame`, is an evaluation-loop call.
    fn is_call(&self, i: usize, frame: &Frame) -> bool {
        match *self {
            EvalLoop::Address { range, user } => match user.get(i) {
                Some(&addr) if i == 0 => range.start <= addr && addr < range.end,
                Some(&addr) => range.start < addr && addr <= range.end,
                None => false,
            },
            EvalLoop::Name => frame.kind == FrameKind::Native && &*frame.function == EVAL_LOOP,
        }
    }
}

/// Whether the first frame of `code | flags` starts an evaluation-loop call.
pub fn is_entry(code: u64, inline_calls: bool) -> bool {
    !inline_calls || code & PY_ENTRY_FRAME != 0
}

/// Replaces, in `stack[native..]` (native frames, innermost first), each
/// evaluation-loop frame, told by `eval_loop`, by its Python frames from
/// `python` (innermost first, each with whether it is the first of its call).
pub fn merge(
    stack: &mut Vec<Frame>,
    native: usize,
    eval_loop: EvalLoop,
    python: impl IntoIterator<Item = (Frame, bool)>,
) {
    let mut python = python.into_iter().peekable();
    if python.peek().is_none() {
        return;
    }
    let has_eval_loop = stack[native..].iter().enumerate().any(|(i, frame)| eval_loop.is_call(i, frame));
    if !has_eval_loop {
        stack.extend(python.map(|(frame, _)| frame));
        return;
    }
    let natives: Vec<Frame> = stack.drain(native..).collect();
    for (i, frame) in natives.into_iter().enumerate() {
        if !eval_loop.is_call(i, &frame) {
            stack.push(frame);
            continue;
        }
        // This call's Python frames, up to its first.
        let mut ran_any = false;
        for (python_frame, first) in python.by_ref() {
            stack.push(python_frame);
            ran_any = true;
            if first {
                break;
            }
        }
        if !ran_any {
            // More evaluation-loop frames than Python calls: the Python walk
            // was cut. Keep the native frame, which still says where it ran.
            stack.push(frame);
        }
    }
    stack.extend(python.map(|(frame, _)| frame));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(name: &str) -> Frame {
        Frame { kind: FrameKind::Native, function: name.into(), file: "".into(), start_line: 0, line: 0 }
    }

    fn py(name: &str) -> Frame {
        Frame { kind: FrameKind::Python, function: name.into(), file: "app.py".into(), start_line: 1, line: 1 }
    }

    fn names(stack: &[Frame]) -> Vec<&str> {
        stack.iter().map(|frame| &*frame.function).collect()
    }

    /// 3.11+: `main` calls `compress_blob` inline (one C call runs both);
    /// `compress_blob` calls zlib's C code, which `deflate`s.
    #[test]
    fn inline_python_calls_share_one_evaluation_loop_frame() {
        let mut stack = vec![native("[kernel] x")];
        stack.extend(["longest_match", "deflate", "zlib_compress", EVAL_LOOP, "PyEval_EvalCode", "main"].map(native));
        merge(&mut stack, 1, EvalLoop::Name, [(py("compress_blob"), false), (py("<module>"), true)]);
        assert_eq!(
            names(&stack),
            [
                "[kernel] x",
                "longest_match",
                "deflate",
                "zlib_compress",
                "compress_blob",
                "<module>",
                "PyEval_EvalCode",
                "main"
            ]
        );
    }

    /// C calling back into Python: `sorted` calls the key function in a call
    /// of the evaluation loop of its own.
    #[test]
    fn c_calling_back_into_python_starts_a_call_of_its_own() {
        let mut stack: Vec<Frame> =
            [EVAL_LOOP, "PyObject_Call", "builtin_sorted", EVAL_LOOP, "main"].map(native).into_iter().collect();
        let python = [(py("key"), true), (py("sort_all"), false), (py("<module>"), true)];
        merge(&mut stack, 0, EvalLoop::Name, python);
        assert_eq!(names(&stack), ["key", "PyObject_Call", "builtin_sorted", "sort_all", "<module>", "main"]);
    }

    /// Before 3.11 every Python frame is an evaluation-loop call.
    #[test]
    fn one_call_per_frame_before_3_11() {
        let mut stack: Vec<Frame> =
            [EVAL_LOOP, "_PyFunction_Vectorcall", EVAL_LOOP, "main"].map(native).into_iter().collect();
        let python = [py("inner"), py("outer")].map(|frame| (frame, is_entry(0x1000, false)));
        merge(&mut stack, 0, EvalLoop::Name, python);
        assert_eq!(names(&stack), ["inner", "_PyFunction_Vectorcall", "outer", "main"]);
    }

    /// The evaluation loop's code, at run-time addresses.
    const RANGE: Range<u64> = 0x5000..0x6000;

    /// Native symbolization did not name the evaluation loop (`[unknown]`,
    /// or a stripped build's nearest dynamic symbol): its address tells.
    #[test]
    fn evaluation_loop_frames_are_found_by_address_whatever_their_name() {
        let mut stack = vec![native("[kernel] x")];
        stack.extend(["deflate", "[unknown]", "PyObject_Call", "PyList_Sort", "main"].map(native));
        let user = [0x9000, 0x5100, 0x7000, 0x6000, 0x1000];
        let python = [(py("key"), true), (py("sort_all"), false), (py("<module>"), true)];
        merge(&mut stack, 1, EvalLoop::Address { range: &RANGE, user: &user }, python);
        assert_eq!(names(&stack), ["[kernel] x", "deflate", "key", "PyObject_Call", "sort_all", "<module>", "main"]);
    }

    /// By address, a frame named as the evaluation loop but outside it (say
    /// of another libpython the process loaded) is not one of its calls.
    #[test]
    fn by_address_the_name_does_not_count() {
        let mut stack = vec![native(EVAL_LOOP), native("main")];
        merge(&mut stack, 0, EvalLoop::Address { range: &RANGE, user: &[0x9000, 0x1000] }, [(py("run"), true)]);
        assert_eq!(names(&stack), [EVAL_LOOP, "main", "run"]);
    }

    #[test]
    fn bounds_of_the_sampled_instruction_and_of_return_addresses() {
        let merged = |user: &[u64]| {
            let mut stack: Vec<Frame> = user.iter().map(|_| native("f")).collect();
            merge(&mut stack, 0, EvalLoop::Address { range: &RANGE, user }, [(py("run"), true)]);
            names(&stack).join(" ")
        };
        // The sampled instruction: from the function's first byte, not past its last.
        assert_eq!(merged(&[0x5000, 0x1000]), "run f");
        assert_eq!(merged(&[0x5fff, 0x1000]), "run f");
        assert_eq!(merged(&[0x6000, 0x1000]), "f f run");
        // A return address follows a call, which may be the function's last
        // instruction; at its first byte it returns to the function before.
        assert_eq!(merged(&[0x1000, 0x6000]), "f run");
        assert_eq!(merged(&[0x1000, 0x5001]), "f run");
        assert_eq!(merged(&[0x1000, 0x5000]), "f f run");
    }

    #[test]
    fn without_evaluation_loop_frames_python_frames_go_outermost() {
        let mut stack = vec![native("memcpy")];
        merge(&mut stack, 0, EvalLoop::Name, [(py("copy"), true), (py("<module>"), false)]);
        assert_eq!(names(&stack), ["memcpy", "copy", "<module>"]);
    }

    #[test]
    fn leftovers_of_either_chain_are_kept() {
        // The native stack was cut: the outer Python frames go outermost.
        let mut cut = vec![native(EVAL_LOOP)];
        merge(&mut cut, 0, EvalLoop::Name, [(py("inner"), true), (py("outer"), true)]);
        assert_eq!(names(&cut), ["inner", "outer"]);
        // The Python walk was cut: the outer evaluation loop stays as it is.
        let mut short = vec![native(EVAL_LOOP), native(EVAL_LOOP), native("main")];
        merge(&mut short, 0, EvalLoop::Name, [(py("inner"), true)]);
        assert_eq!(names(&short), ["inner", EVAL_LOOP, "main"]);
    }
}
