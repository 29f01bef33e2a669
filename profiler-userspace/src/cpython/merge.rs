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

use profiler_common::PY_ENTRY_FRAME;

use crate::aggregate::{Frame, FrameKind};

/// The native function that runs Python frames.
const EVAL_LOOP: &str = "_PyEval_EvalFrameDefault";

/// Whether the first frame of `code | flags` starts an evaluation-loop call.
pub fn is_entry(code: u64, inline_calls: bool) -> bool {
    !inline_calls || code & PY_ENTRY_FRAME != 0
}

/// Replaces, in `stack[native..]` (native frames, innermost first), each
/// evaluation-loop frame by its Python frames from `python` (innermost
/// first, each with whether it is the first of its call).
pub fn merge(stack: &mut Vec<Frame>, native: usize, python: impl IntoIterator<Item = (Frame, bool)>) {
    let mut python = python.into_iter().peekable();
    if python.peek().is_none() {
        return;
    }
    let has_eval_loop = stack[native..].iter().any(is_eval_loop);
    if !has_eval_loop {
        stack.extend(python.map(|(frame, _)| frame));
        return;
    }
    let natives: Vec<Frame> = stack.drain(native..).collect();
    for frame in natives {
        if !is_eval_loop(&frame) {
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

fn is_eval_loop(frame: &Frame) -> bool {
    frame.kind == FrameKind::Native && &*frame.function == EVAL_LOOP
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
        merge(&mut stack, 1, [(py("compress_blob"), false), (py("<module>"), true)]);
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
        merge(&mut stack, 0, python);
        assert_eq!(names(&stack), ["key", "PyObject_Call", "builtin_sorted", "sort_all", "<module>", "main"]);
    }

    /// Before 3.11 every Python frame is an evaluation-loop call.
    #[test]
    fn one_call_per_frame_before_3_11() {
        let mut stack: Vec<Frame> =
            [EVAL_LOOP, "_PyFunction_Vectorcall", EVAL_LOOP, "main"].map(native).into_iter().collect();
        let python = [py("inner"), py("outer")].map(|frame| (frame, is_entry(0x1000, false)));
        merge(&mut stack, 0, python);
        assert_eq!(names(&stack), ["inner", "_PyFunction_Vectorcall", "outer", "main"]);
    }

    #[test]
    fn without_evaluation_loop_frames_python_frames_go_outermost() {
        let mut stack = vec![native("memcpy")];
        merge(&mut stack, 0, [(py("copy"), true), (py("<module>"), false)]);
        assert_eq!(names(&stack), ["memcpy", "copy", "<module>"]);
    }

    #[test]
    fn leftovers_of_either_chain_are_kept() {
        // The native stack was cut: the outer Python frames go outermost.
        let mut cut = vec![native(EVAL_LOOP)];
        merge(&mut cut, 0, [(py("inner"), true), (py("outer"), true)]);
        assert_eq!(names(&cut), ["inner", "outer"]);
        // The Python walk was cut: the outer evaluation loop stays as it is.
        let mut short = vec![native(EVAL_LOOP), native(EVAL_LOOP), native("main")];
        merge(&mut short, 0, [(py("inner"), true)]);
        assert_eq!(names(&short), ["inner", EVAL_LOOP, "main"]);
    }
}
