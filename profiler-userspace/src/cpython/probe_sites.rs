//! Where to put a uprobe on a function of an ELF file.
//!
//! A uprobe replaces an instruction with a breakpoint; unless the kernel can
//! emulate the instruction (x86 emulates branches, not `mov` or `test`), it
//! then runs it out of line under single-step: a second trap. Measured here
//! (a VM), that second trap was most of a probe's cost. CPython's raw
//! allocator functions are a few register moves and a tail call to libc
//! (`_PyMem_RawMalloc` is `test; mov; cmovne; mov; jmp malloc@plt`): probed
//! at the tail call, they cost one trap, with the arguments where libc's
//! function takes them (the `ctx` argument gone).

use std::{collections::HashMap, path::Path};

use anyhow::{Context, Result};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};
use object::{Object, ObjectSection, ObjectSymbol};

/// A function of the file, as file offsets (what uprobes are attached at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub entry: u64,
    /// The tail call (`jmp`) that the function reaches, from its entry,
    /// through register-only instructions that leave the stack alone: the
    /// stack still holds the caller's return address there, so a return
    /// probe works there too.
    pub tail_call: Option<u64>,
}

/// Those of `names` that the symbol tables of the ELF file `path` define.
pub fn functions(path: &Path, names: &[&str]) -> Result<HashMap<String, Function>> {
    let read = || -> Result<_> {
        let file = std::fs::File::open(path)?;
        // SAFETY: a read-only mapping; a file changed under it gives wrong
        // offsets at worst, which the kernel checks.
        Ok(unsafe { memmap2::Mmap::map(&file) }?)
    };
    let data = read().with_context(|| format!("cannot read {}", path.display()))?;
    let elf = object::File::parse(&*data).with_context(|| format!("{} is not an ELF file", path.display()))?;
    let mut functions = HashMap::new();
    for symbol in elf.symbols().chain(elf.dynamic_symbols()) {
        let Some(name) = symbol.name().ok().filter(|name| names.contains(name)) else { continue };
        let Some(section) = symbol.section_index().and_then(|index| elf.section_by_index(index).ok()) else { continue };
        let Some((section_offset, _)) = section.file_range() else { continue };
        let to_offset = |address: u64| address - section.address() + section_offset;
        let code = section.data().ok().and_then(|data| data.get((symbol.address() - section.address()) as usize..));
        let tail_call = code.and_then(|code| tail_call(code, symbol.address()));
        functions.insert(
            name.to_owned(),
            Function { entry: to_offset(symbol.address()), tail_call: tail_call.map(to_offset) },
        );
    }
    Ok(functions)
}

/// The address of the tail call of the x86-64 code at `address`, if the
/// first few instructions lead to it without a branch, a memory access or a
/// change to the stack.
fn tail_call(code: &[u8], address: u64) -> Option<u64> {
    const MAX_INSTRUCTIONS: usize = 8;
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    for instruction in decoder.iter().take(MAX_INSTRUCTIONS) {
        match instruction.flow_control() {
            FlowControl::UnconditionalBranch if instruction.is_jmp_short_or_near() => return Some(instruction.ip()),
            FlowControl::Next if registers_only(&instruction) => {}
            _ => return None,
        }
    }
    None
}

/// Whether every operand is a register other than the stack and frame
/// pointers, or an immediate (`endbr64` has none), and the stack is left
/// alone.
fn registers_only(instruction: &Instruction) -> bool {
    (0..instruction.op_count()).all(|n| match instruction.op_kind(n) {
        OpKind::Register => !matches!(instruction.op_register(n).full_register(), Register::RSP | Register::RBP),
        OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate64 => true,
        OpKind::Immediate8to16 | OpKind::Immediate8to32 | OpKind::Immediate8to64 | OpKind::Immediate32to64 => true,
        _ => false,
    }) && !matches!(instruction.mnemonic(), iced_x86::Mnemonic::Push | iced_x86::Mnemonic::Pop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_call_after_register_moves_is_found() {
        // _PyMem_RawMalloc of CPython 3.11 (pyenv): test rsi,rsi; mov eax,1;
        // cmovne rax,rsi; mov rdi,rax; jmp malloc@plt
        let code = [
            0x48, 0x85, 0xf6, 0xb8, 0x01, 0, 0, 0, 0x48, 0x0f, 0x45, 0xc6, 0x48, 0x89, 0xc7, 0xe9, 0xac, 0xde, 0xf4,
            0xff,
        ];
        assert_eq!(tail_call(&code, 0x1ac870), Some(0x1ac87f));
        // endbr64; mov rdi,rsi; jmp free@plt
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x89, 0xf7, 0xe9, 0x38, 0xdf, 0xf4, 0xff];
        assert_eq!(tail_call(&code, 0x1000), Some(0x1007));
    }

    #[test]
    fn no_tail_call_past_a_branch_a_stack_change_or_memory() {
        // mov rdi,rsi; test rdi,rdi; je +0x0d (_PyMem_RawCalloc)
        assert_eq!(tail_call(&[0x48, 0x89, 0xf7, 0x48, 0x85, 0xff, 0x74, 0x0d], 0x1000), None);
        // sub rsp,8; jmp (_PyObject_ArenaMmap's start, then a call)
        assert_eq!(tail_call(&[0x48, 0x83, 0xec, 0x08, 0xe9, 0, 0, 0, 0], 0x1000), None);
        // push rbx; jmp
        assert_eq!(tail_call(&[0x53, 0xe9, 0, 0, 0, 0], 0x1000), None);
        // mov rdi,[rsi]; jmp
        assert_eq!(tail_call(&[0x48, 0x8b, 0x3e, 0xe9, 0, 0, 0, 0], 0x1000), None);
    }

    #[test]
    fn functions_of_a_real_libpython() {
        let Some(build) = crate::cpython::pyenv_build(11) else { return };
        let names = ["_PyMem_RawMalloc", "_PyMem_RawFree", "_PyMem_RawCalloc", "PyObject_Malloc"];
        let functions = functions(&build.libpython, &names).unwrap();
        assert!(functions["_PyMem_RawMalloc"].tail_call.is_some(), "{functions:?}");
        assert_eq!(functions["_PyMem_RawFree"].tail_call, Some(functions["_PyMem_RawFree"].entry + 3));
        assert_eq!(functions["_PyMem_RawCalloc"].tail_call, None);
        assert_eq!(functions.len(), 4);
    }
}
