//! Turning the frames the kernel records (code object, instruction) into
//! names, files and lines, by reading code objects from the process.

use super::{layout::Layout, linetable, Interpreter};
use crate::{
    process::procmem::ProcessMemory,
    stack::{Frame, FrameKind},
};
use anyhow::{ensure, Context};
use profiler_common::{PyFrame, PY_ENTRY_FRAME};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

/// Caches are emptied when they reach these sizes, which keeps a process
/// that keeps creating code objects (`exec`, lambdas) from growing them.
const MAX_CODES: usize = 16 * 1024;
const MAX_LINES: usize = 64 * 1024;
/// Longest name or file name read, in bytes; longer ones are cut.
const MAX_STRING_BYTES: u64 = 4096;
/// Largest line table read; a larger one is treated as corrupt.
const MAX_LINETABLE_BYTES: u64 = 1 << 20;
/// A cached code object is checked again (one read of its first bytes) when it is used
/// this long after its last check. The agent reads samples in batches (every 100 ms): each
/// code object in use is checked about once per batch, at most once per frame looked up.
const RECHECK_AFTER: Duration = Duration::from_millis(20);

/// What a code object says about itself.
struct CodeInfo {
    function: Arc<str>,
    file: Arc<str>,
    first_line: i32,
    linetable: Box<[u8]>,
}

/// A code object read, with what tells it from another at its address.
struct CachedCode {
    info: Arc<CodeInfo>,
    fingerprint: Fingerprint,
    checked: Instant,
}

/// The fields of a code object that another one at the same address would not share:
/// type, name, file and line table pointers, first line.
type Fingerprint = [u64; 5];

/// Symbolizes the Python frames of one process.
///
/// Code objects are cached by address. An address can be freed and reused by
/// another code object (a module's code runs once and goes, and the next import
/// may put a function's code there): a cached code object is checked again
/// before use, by its [`Fingerprint`], at most every [`RECHECK_AFTER`], and
/// read anew if it changed. The agent also empties the caches every period.
pub struct FrameSymbolizer {
    mem: ProcessMemory,
    layout: Layout,
    code_type: u64,
    codes: HashMap<u64, CachedCode>,
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
        let now = Instant::now();
        if let Some(cached) = self.codes.get(&addr) {
            if now.duration_since(cached.checked) < RECHECK_AFTER {
                return Some(cached.info.clone());
            }
            match self.read_head(addr).and_then(|head| self.fingerprint(&head)) {
                Ok(fingerprint) if fingerprint != cached.fingerprint => {
                    // Another code object now: its own names and lines.
                    self.codes.remove(&addr);
                    self.lines.retain(|(code, _), _| *code != addr);
                }
                // The same, or unreadable (the process has exited): what was read holds.
                _ => {
                    let cached = self.codes.get_mut(&addr).expect("found above");
                    cached.checked = now;
                    return Some(cached.info.clone());
                }
            }
        }
        match self.read_code(addr) {
            Ok((info, fingerprint)) => {
                if self.codes.len() >= MAX_CODES {
                    self.codes.clear();
                }
                let info = Arc::new(info);
                self.codes.insert(addr, CachedCode { info: info.clone(), fingerprint, checked: now });
                Some(info)
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

    /// The first bytes of the code object at `addr`, which hold every field read.
    fn read_head(&self, addr: u64) -> anyhow::Result<Vec<u8>> {
        let layout = &self.layout.code;
        let fields =
            [self.layout.kernel.object_type.into(), layout.firstlineno, layout.filename, layout.name, layout.linetable];
        Ok(self.mem.read_vec(addr, fields.into_iter().max().unwrap_or(0) as usize + 8)?)
    }

    fn fingerprint(&self, head: &[u8]) -> anyhow::Result<Fingerprint> {
        let layout = &self.layout.code;
        let u64_at = |offset: u64| field::<8>(head, offset).map(u64::from_ne_bytes);
        let first_line = field::<4>(head, layout.firstlineno).map(u32::from_ne_bytes)?;
        Ok([
            u64_at(self.layout.kernel.object_type.into())?,
            u64_at(layout.name)?,
            u64_at(layout.filename)?,
            u64_at(layout.linetable)?,
            first_line.into(),
        ])
    }

    fn read_code(&self, addr: u64) -> anyhow::Result<(CodeInfo, Fingerprint)> {
        // The fields we need all lie in the object's first bytes: one read.
        let head = self.read_head(addr)?;
        let fingerprint = self.fingerprint(&head)?;
        let [object_type, name, filename, linetable, _] = fingerprint;
        ensure!(object_type == self.code_type, "type {object_type:#x} is not PyCode_Type");
        let first_line = field::<4>(&head, self.layout.code.firstlineno).map(i32::from_ne_bytes)?;
        let function = self.read_str(name).context("reading the code object's name")?;
        let file = self.read_str(filename).context("reading co_filename")?;
        let linetable = self.read_bytes(linetable).context("reading co_linetable")?;
        let info = CodeInfo { function: function.into(), file: file.into(), first_line, linetable: linetable.into() };
        Ok((info, fingerprint))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpython::{layout::layout, Version};

    /// Objects laid out in this process's memory as CPython 3.11 lays them out: a code
    /// object and the strings and bytes it points to.
    struct Memory {
        words: Vec<u64>,
        layout: Layout,
    }

    /// Where the objects lie, as byte offsets into the memory.
    const CODE: usize = 0;
    const FIRST_NAME: usize = 1024;
    const SECOND_NAME: usize = 1536;
    const FILE: usize = 2048;
    const LINETABLE: usize = 2560;
    const CODE_TYPE: usize = 3072;

    impl Memory {
        fn new() -> Self {
            let mut memory = Memory { words: vec![0; 4096 / 8], layout: layout(3, 11).unwrap() };
            let (code, kernel) = (memory.layout.code, memory.layout.kernel);
            memory.set(CODE + usize::from(kernel.object_type), memory.addr(CODE_TYPE));
            memory.set(CODE + code.firstlineno as usize, 7);
            memory.set(CODE + code.name as usize, memory.addr(FIRST_NAME));
            memory.set(CODE + code.filename as usize, memory.addr(FILE));
            memory.set(CODE + code.linetable as usize, memory.addr(LINETABLE));
            memory.string(FIRST_NAME, "first");
            memory.string(SECOND_NAME, "second");
            memory.string(FILE, "app.py");
            memory.set(LINETABLE + memory.layout.bytes.size as usize, 0);
            memory
        }

        fn addr(&self, offset: usize) -> u64 {
            self.words.as_ptr() as u64 + offset as u64
        }

        /// Sets the 8 bytes at `offset`, which is 8-byte aligned or holds a 4-byte field
        /// followed by padding.
        fn set(&mut self, offset: usize, value: u64) {
            assert_eq!(offset % 4, 0);
            let bytes: &mut [u8] = bytemuck_bytes(&mut self.words);
            bytes[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        }

        /// A compact ASCII `str` at `offset`.
        fn string(&mut self, offset: usize, text: &str) {
            let unicode = self.layout.unicode;
            self.set(offset + unicode.length as usize, text.len() as u64);
            // Kind 1 (bits 2-4), compact (bit 5), ASCII (bit 6).
            self.set(offset + unicode.state as usize, 1 << 2 | 1 << 5 | 1 << 6);
            let bytes = bytemuck_bytes(&mut self.words);
            let data = offset + unicode.ascii_data as usize;
            bytes[data..data + text.len()].copy_from_slice(text.as_bytes());
        }
    }

    fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: any bytes are valid u64s, and the slice covers the words exactly.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
    }

    fn function(symbolizer: &mut FrameSymbolizer, memory: &Memory) -> String {
        let frame = PyFrame { code: memory.addr(CODE), instr: 0 };
        symbolizer.symbolize(&frame).map(|frame| frame.function.to_string()).unwrap_or_default()
    }

    /// A code object freed and another made at its address (a module's code, then a
    /// function's of the next import) is read again, not named from the cache.
    #[test]
    fn a_code_object_replaced_at_its_address_is_read_again() {
        let mut memory = Memory::new();
        let version = Version { major: 3, minor: 11, micro: 7 };
        let interpreter = Interpreter::new(version, "synthetic".into(), 0, memory.addr(CODE_TYPE)).unwrap();
        let mut symbolizer = FrameSymbolizer::new(std::process::id(), &interpreter);
        assert_eq!(function(&mut symbolizer, &memory), "first");
        std::thread::sleep(RECHECK_AFTER * 2);
        assert_eq!(function(&mut symbolizer, &memory), "first", "unchanged: the cached one");
        let name = memory.layout.code.name as usize;
        memory.set(CODE + name, memory.addr(SECOND_NAME));
        std::thread::sleep(RECHECK_AFTER * 2);
        assert_eq!(function(&mut symbolizer, std::hint::black_box(&memory)), "second");
    }
}
