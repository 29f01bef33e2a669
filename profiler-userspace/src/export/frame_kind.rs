//! How the kind of a frame ([`FrameKind`]) crosses a pprof file: pprof's
//! `Function` has no field for it, so it is carried by the function's file
//! name and system name. [`encode`] is what the pprof writer (`export::pprof`)
//! writes for a frame, [`decode`] what a reader (the viewer, `view::store`)
//! takes a function's kind to be, so that both follow one definition:
//!
//! | kind   | `filename`                               | `system_name` |
//! |--------|------------------------------------------|---------------|
//! | Python | the source file                          | none          |
//! | Native | the object file, none if unknown         | the name      |
//! | Kernel | [`KERNEL_FILE`], else [`PERF_KERNEL_FILE`] | the name    |
//! | Marker | none                                     | none          |
//!
//! Readers demangle a function whose system name is its name, and pprof's
//! C++ heuristics turn `<module>` or `<lambda>` into "": Python functions and
//! markers, which are not symbols, have no system name. Files of older agents
//! follow the same rules, and `go tool pprof` shows these fields as they are.
//!
//! What does not round-trip: a Python frame of code without a file name
//! (`compile(source, "", "exec")`) reads as a marker, and a native function
//! without a name as Python code (the symbolizer names unknown code
//! `[unknown]`).

use crate::stack::{Frame, FrameKind};

/// The file of kernel frames, as the symbolizer names them
/// (`native::symbolize`): the flame graph, the summary and the pprof show it.
pub const KERNEL_FILE: &str = "[kernel]";

/// The file pprof shows for kernel frames that have no [`KERNEL_FILE`]: the
/// kernel as `perf` names it, so that it stands apart from native code.
pub const PERF_KERNEL_FILE: &str = "[kernel.kallsyms]";

/// The fields of a pprof `Function` that tell a frame's kind, as text (the
/// string table's "" for none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function<'a> {
    pub name: &'a str,
    pub system_name: &'a str,
    pub filename: &'a str,
}

/// The pprof function of `frame`.
pub fn encode(frame: &Frame) -> Function<'_> {
    let name = &*frame.function;
    match frame.kind {
        FrameKind::Python => Function { name, system_name: "", filename: &frame.file },
        FrameKind::Native => Function { name, system_name: name, filename: &frame.file },
        FrameKind::Kernel => {
            let filename = if is_kernel_file(&frame.file) { &frame.file } else { PERF_KERNEL_FILE };
            Function { name, system_name: name, filename }
        }
        FrameKind::Marker => Function { name, system_name: "", filename: "" },
    }
}

/// The kind of the frame a pprof function was written for.
pub fn decode(function: &Function) -> FrameKind {
    if is_kernel_file(function.filename) {
        FrameKind::Kernel
    } else if !function.system_name.is_empty() {
        FrameKind::Native
    } else if function.filename.is_empty() {
        FrameKind::Marker
    } else {
        FrameKind::Python
    }
}

fn is_kernel_file(file: &str) -> bool {
    file == KERNEL_FILE || file == PERF_KERNEL_FILE
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame of each kind as the agent makes it, and the pprof file name
    /// it gets.
    pub(crate) fn frames() -> Vec<(Frame, &'static str)> {
        let frame = |kind, function: &str, file: &str, start_line, line| Frame {
            kind,
            function: function.into(),
            file: file.into(),
            start_line,
            line,
        };
        // Every kind is here: a new one fails to build until it is added.
        let every_kind = |kind| match kind {
            FrameKind::Python | FrameKind::Native | FrameKind::Kernel | FrameKind::Marker => kind,
        };
        vec![
            (frame(every_kind(FrameKind::Python), "Worker.crunch", "/srv/app.py", 10, 12), "/srv/app.py"),
            (frame(FrameKind::Python, "<module>", "/srv/app.py", 1, 30), "/srv/app.py"),
            (frame(every_kind(FrameKind::Native), "__write", "libc.so.6", 0, 0), "libc.so.6"),
            (frame(FrameKind::Native, "[unknown]", "", 0, 0), ""),
            (frame(every_kind(FrameKind::Kernel), "ksys_write", KERNEL_FILE, 0, 0), KERNEL_FILE),
            (frame(FrameKind::Kernel, "schedule", "", 0, 0), PERF_KERNEL_FILE),
            (frame(FrameKind::Kernel, "[unknown]", PERF_KERNEL_FILE, 0, 0), PERF_KERNEL_FILE),
            (Frame::marker(crate::stack::marker::TRUNCATED), ""),
            (frame(every_kind(FrameKind::Marker), "[preempted]", "", 0, 0), ""),
        ]
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        for (frame, filename) in frames() {
            let function = encode(&frame);
            assert_eq!(function.name, &*frame.function);
            assert_eq!(function.filename, filename, "{frame:?}");
            assert_eq!(decode(&function), frame.kind, "{frame:?} as {function:?}");
        }
    }

    #[test]
    fn only_symbols_have_system_names() {
        for (frame, _) in frames() {
            let function = encode(&frame);
            let symbol = matches!(frame.kind, FrameKind::Native | FrameKind::Kernel);
            assert_eq!(function.system_name, if symbol { function.name } else { "" }, "{frame:?}");
        }
    }

    /// What files written by older agents, and `perf`-style profiles, hold.
    #[test]
    fn reads_the_names_files_already_have() {
        let read = |name, system_name, filename| decode(&Function { name, system_name, filename });
        assert_eq!(read("schedule", "schedule", "[kernel]"), FrameKind::Kernel);
        assert_eq!(read("ksys_write", "ksys_write", "[kernel.kallsyms]"), FrameKind::Kernel);
        assert_eq!(read("__write", "__write", "libc.so.6"), FrameKind::Native);
        assert_eq!(read("[unknown]", "[unknown]", ""), FrameKind::Native);
        assert_eq!(read("<module>", "", "/srv/app.py"), FrameKind::Python);
        assert_eq!(read("[truncated]", "", ""), FrameKind::Marker);
    }
}
