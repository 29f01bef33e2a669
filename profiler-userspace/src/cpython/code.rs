//! Turning the frames the kernel records (code object, instruction) into
//! names, files and lines, by reading code objects from the process.

use super::{layout::Layout, linetable, Interpreter};
use crate::{
    aggregate::{Frame, FrameKind},
    procmem::ProcessMemory,
};
use anyhow::{ensure, Context};
use profiler_common::{PyFrame, PY_ENTRY_FRAME};
use std::{collections::HashMap, sync::Arc};

/// Caches are emptied when they reach these sizes, which keeps a process
/// that keeps creating code objects (`exec`, lambdas) from growing them.
const MAX_CODES: usize = 16 * 1024;
const MAX_LINES: usize = 64 * 1024;
/// Longest name or file name read, in bytes; longer ones are cut.
const MAX_STRING_BYTES: u64 = 4096;
/// Largest line table read; a larger one is treated as corrupt.
const MAX_LINETABLE_BYTES: u64 = 1 << 20;

/// What a code object says about itself.
struct CodeInfo {
    function: Arc<str>,
    file: Arc<str>,
    first_line: i32,
    linetable: Box<[u8]>,
}

/// Symbolizes the Python frames of one process.
///
/// Code objects are cached by address. An address freed and reused by another
/// code object while still cached would get the old names (the kernel rejects
/// any other type of object): the agent empties the caches every period,
/// which bounds that to one period, at the cost of reading each code object
/// once per period rather than once per sample.
pub struct FrameSymbolizer {
    mem: ProcessMemory,
    layout: Layout,
    code_type: u64,
    codes: HashMap<u64, Arc<CodeInfo>>,
    /// Line per (code object, instruction).
    lines: HashMap<(u64, u64), u32>,
    /// 3.11+: one evaluation-loop call runs Python-to-Python calls inline.
    pub inline_calls: bool,
}

impl FrameSymbolizer {
    pub fn new(pid: u32, interpreter: &Interpreter) -> Self {
        FrameSymbolizer {
            mem: ProcessMemory::new(pid),
            layout: interpreter.layout,
            code_type: interpreter.kernel.code_type,
            codes: HashMap::new(),
            lines: HashMap::new(),
            inline_calls: (interpreter.version.major, interpreter.version.minor) >= (3, 11),
        }
    }

    /// Forgets every code object read so far.
    pub fn forget_code(&mut self) {
        self.codes.clear();
        self.lines.clear();
    }

    /// The frame running `frame.code` at `frame.instr`; None when the code
    /// object cannot be read (the process exited, or the frame was bogus).
    pub fn symbolize(&mut self, frame: &PyFrame) -> Option<Frame> {
        let frame = &PyFrame { code: frame.code & !PY_ENTRY_FRAME, instr: frame.instr };
        let code = self.code(frame.code)?;
        let line = self.line(frame, &code);
        Some(Frame {
            kind: FrameKind::Python,
            function: code.function.clone(),
            file: code.file.clone(),
            start_line: u32::try_from(code.first_line).unwrap_or(0),
            line,
        })
    }

    fn code(&mut self, addr: u64) -> Option<Arc<CodeInfo>> {
        if let Some(code) = self.codes.get(&addr) {
            return Some(code.clone());
        }
        match self.read_code(addr) {
            Ok(code) => {
                if self.codes.len() >= MAX_CODES {
                    self.codes.clear();
                }
                let code = Arc::new(code);
                self.codes.insert(addr, code.clone());
                Some(code)
            }
            Err(e) => {
                log::debug!("code object {addr:#x}: {e:#}");
                None
            }
        }
    }

    fn line(&mut self, frame: &PyFrame, code: &CodeInfo) -> u32 {
        let key = (frame.code, frame.instr);
        if let Some(&line) = self.lines.get(&key) {
            return line;
        }
        let bytecode = frame.code + self.layout.code.code_adaptive;
        let line = match self.layout.instr.offset(frame.instr, bytecode) {
            Some(offset) => linetable::line_of(self.layout.line_table, &code.linetable, code.first_line, offset),
            // Before the first instruction (a frame just pushed), CPython
            // reports the first line too.
            None => u32::try_from(code.first_line).ok(),
        }
        .unwrap_or(0);
        if self.lines.len() >= MAX_LINES {
            self.lines.clear();
        }
        self.lines.insert(key, line);
        line
    }

    fn read_code(&self, addr: u64) -> anyhow::Result<CodeInfo> {
        let layout = &self.layout.code;
        // The fields we need all lie in the object's first bytes: one read.
        let fields =
            [self.layout.kernel.object_type.into(), layout.firstlineno, layout.filename, layout.name, layout.linetable];
        let head = self.mem.read_vec(addr, fields.into_iter().max().unwrap_or(0) as usize + 8)?;
        let u64_at = |offset: u64| field::<8>(&head, offset).map(u64::from_ne_bytes);
        let object_type = u64_at(self.layout.kernel.object_type.into())?;
        ensure!(object_type == self.code_type, "type {object_type:#x} is not PyCode_Type");
        let first_line = field::<4>(&head, layout.firstlineno).map(i32::from_ne_bytes)?;
        let function = self.read_str(u64_at(layout.name)?).context("reading the code object's name")?;
        let file = self.read_str(u64_at(layout.filename)?).context("reading co_filename")?;
        let linetable = self.read_bytes(u64_at(layout.linetable)?).context("reading co_linetable")?;
        Ok(CodeInfo { function: function.into(), file: file.into(), first_line, linetable: linetable.into() })
    }

    /// The text of a `str` object; only compact strings (all that code
    /// objects hold) are supported, not the "legacy" ones before 3.12.
    fn read_str(&self, addr: u64) -> anyhow::Result<String> {
        ensure!(addr != 0, "null pointer");
        let layout = &self.layout.unicode;
        let length = u64::try_from(self.mem.read_i64(addr + layout.length)?).context("negative length")?;
        let state = self.mem.read_u32(addr + layout.state)?;
        let (kind, compact, ascii) = ((state >> 2) & 7, state & 1 << 5 != 0, state & 1 << 6 != 0);
        ensure!(compact, "not a compact string (state {state:#x})");
        ensure!(matches!(kind, 1 | 2 | 4), "bad string kind {kind} (state {state:#x})");
        let data = if ascii { layout.ascii_data } else { layout.compact_data };
        let chars = length.min(MAX_STRING_BYTES / u64::from(kind));
        let bytes = self.mem.read_vec(addr + data, (chars * u64::from(kind)) as usize)?;
        // Characters are Latin-1, UCS-2 or UCS-4 code points, by kind.
        let code_points: Vec<u32> = match kind {
            1 => bytes.iter().map(|&b| b.into()).collect(),
            2 => bytes.chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]]).into()).collect(),
            _ => bytes.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect(),
        };
        Ok(code_points.into_iter().map(|c| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER)).collect())
    }

    /// The content of a `bytes` object.
    fn read_bytes(&self, addr: u64) -> anyhow::Result<Vec<u8>> {
        ensure!(addr != 0, "null pointer");
        let layout = &self.layout.bytes;
        let size = u64::try_from(self.mem.read_i64(addr + layout.size)?).context("negative size")?;
        ensure!(size <= MAX_LINETABLE_BYTES, "{size} bytes is too large");
        Ok(self.mem.read_vec(addr + layout.data, size as usize)?)
    }
}

/// `N` bytes at `offset` of `bytes`.
fn field<const N: usize>(bytes: &[u8], offset: u64) -> anyhow::Result<[u8; N]> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| bytes.get(start..start.checked_add(N)?))
        .and_then(|slice| slice.try_into().ok())
        .with_context(|| format!("field at {offset} is outside the {} bytes read", bytes.len()))
}
