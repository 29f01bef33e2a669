//! How close each eBPF program of the embedded object comes to the
//! verifier's stack limit, read from the object itself.
//!
//! The verifier refuses a program whose deepest chain of BPF-to-BPF calls
//! (`bpf_loop` callbacks included) needs more than 512 bytes of stack, each
//! frame rounded up to 32 bytes. The frame sizes are the compiler's, so they
//! are the same on every kernel; what differs is how strictly a kernel
//! counts them (6.18 allows more than 6.1 or 6.12 do), which is why every
//! program keeps a margin under the strictest count, computed here the way
//! 6.1's `check_max_stack_depth` does.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SymbolKind};

/// The verifier's limit on a call chain's combined stack.
pub const STACK_LIMIT: u32 = 512;
/// Frames are counted in multiples of this.
const FRAME_ROUNDING: u32 = 32;
/// The stack pointer register, r10.
const FRAME_POINTER: u8 = 10;

/// One function of the object: where its code is and what it calls.
struct Function {
    name: String,
    /// Bytes of stack the function itself uses.
    frame: u32,
    /// Functions it calls, or hands to a helper as a callback.
    callees: Vec<usize>,
}

/// The combined stack of each program (entry point) of `elf`: the largest
/// sum of rounded frames along any call chain from it.
pub fn program_stacks(elf: &[u8]) -> Result<Vec<(String, u32)>> {
    let file = object::File::parse(elf).context("the eBPF object is not an ELF file")?;
    // Functions by (section, byte offset of their first instruction).
    let mut index: HashMap<(SectionIndex, u64), usize> = HashMap::new();
    let mut functions = Vec::new();
    let mut programs = Vec::new();
    for symbol in file.symbols().filter(|symbol| symbol.kind() == SymbolKind::Text && symbol.size() > 0) {
        let Some(section) = symbol.section_index() else { continue };
        index.insert((section, symbol.address()), functions.len());
        if symbol.is_global() && file.section_by_index(section)?.name()? != ".text" {
            programs.push(functions.len());
        }
        functions.push(Function { name: symbol.name()?.to_string(), frame: 0, callees: Vec::new() });
    }
    for symbol in file.symbols().filter(|symbol| symbol.kind() == SymbolKind::Text && symbol.size() > 0) {
        let Some(section_index) = symbol.section_index() else { continue };
        let section = file.section_by_index(section_index)?;
        let code = section.data()?;
        let start = symbol.address() as usize;
        let code = code.get(start..start + symbol.size() as usize).context("a function outside its section")?;
        let relocations: HashMap<u64, RelocationTarget> =
            section.relocations().map(|(offset, relocation)| (offset, relocation.target())).collect();
        let me = index[&(section_index, symbol.address())];
        let (frame, calls) = scan(code, start as u64);
        functions[me].frame = frame;
        for call in calls {
            let target = match relocations.get(&call.offset) {
                Some(RelocationTarget::Symbol(symbol)) => {
                    let symbol = file.symbol_by_index(*symbol)?;
                    let base = symbol.section_index().context("a call to an undefined symbol")?;
                    // A `ld_imm64` of a map's address is no call.
                    if file.section_by_index(base)?.kind() != object::SectionKind::Text {
                        continue;
                    }
                    let offset = if symbol.kind() == SymbolKind::Section {
                        call.section_offset(symbol.address())
                    } else {
                        symbol.address()
                    };
                    (base, offset)
                }
                Some(_) => bail!("a call with an unexpected relocation in {}", functions[me].name),
                // Unrelocated: a call, or an address already marked as a
                // function's (`BPF_PSEUDO_FUNC`), in the same section.
                None if !call.address_load || call.pseudo_func => (section_index, call.local_target),
                None => continue,
            };
            let callee =
                *index.get(&target).with_context(|| format!("a call into no function from {}", functions[me].name))?;
            functions[me].callees.push(callee);
        }
    }
    let mut stacks: Vec<(String, u32)> = programs
        .iter()
        .map(|&program| (functions[program].name.clone(), chain_depth(&functions, program, 0)))
        .collect();
    stacks.sort();
    Ok(stacks)
}

/// The deepest rounded stack from `function` down; `depth` guards against
/// recursion, which the verifier refuses anyway.
fn chain_depth(functions: &[Function], function: usize, depth: usize) -> u32 {
    let own = functions[function].frame.max(1).div_ceil(FRAME_ROUNDING) * FRAME_ROUNDING;
    if depth > 8 {
        return own;
    }
    own + functions[function].callees.iter().map(|&callee| chain_depth(functions, callee, depth + 1)).max().unwrap_or(0)
}

/// A BPF-to-BPF call, or a function's address loaded for a callback.
struct Call {
    /// Byte offset of the instruction in its section.
    offset: u64,
    /// Its immediate.
    imm: i64,
    /// Whether it is a `ld_imm64` of a function's address (imm in bytes)
    /// rather than a call (imm in instructions, after the call).
    address_load: bool,
    /// A `ld_imm64` already marked as a function's address.
    pseudo_func: bool,
    /// Where it goes when no relocation names its target.
    local_target: u64,
}

impl Call {
    /// The target of a call relocated against its section's symbol at
    /// `base`.
    fn section_offset(&self, base: u64) -> u64 {
        if self.address_load {
            base.wrapping_add(self.imm as u64)
        } else {
            base.wrapping_add(((self.imm + 1) * 8) as u64)
        }
    }
}

/// The stack a function's code uses (the deepest byte below r10 it reads,
/// writes or hands to a helper) and its calls. Straight-line: a register is
/// taken as an r10-derived pointer from `rX = r10` through `rX += imm` until
/// anything else writes it, which over-counts at worst.
fn scan(code: &[u8], start: u64) -> (u32, Vec<Call>) {
    let mut derived: [Option<i64>; 11] = [None; 11];
    derived[FRAME_POINTER as usize] = Some(0);
    let mut deepest: i64 = 0;
    let mut calls = Vec::new();
    let mut pc = 0;
    while pc + 8 <= code.len() {
        let insn = &code[pc..pc + 8];
        let (opcode, dst, src) = (insn[0], insn[1] & 0xf, insn[1] >> 4);
        let off = i64::from(i16::from_le_bytes([insn[2], insn[3]]));
        let imm = i64::from(i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
        let offset = start + pc as u64;
        let class = opcode & 7;
        let mut written = None;
        match (class, opcode) {
            // ld_imm64: two slots; a function's address when relocated
            // against code, or when src is 4 (`BPF_PSEUDO_FUNC`).
            (0, 0x18) => {
                let local_target = if src == 4 { (offset as i64 + (imm + 1) * 8) as u64 } else { 0 };
                calls.push(Call { offset, imm, address_load: true, pseudo_func: src == 4, local_target });
                written = Some(dst);
                pc += 8;
            }
            // ldx: a load, from the stack when its base is r10-derived.
            (1, _) => {
                if let Some(base) = derived.get(src as usize).copied().flatten() {
                    deepest = deepest.min(base + off);
                }
                written = Some(dst);
            }
            // st, stx: stores (and atomics) to the stack.
            (2, _) | (3, _) => {
                if let Some(base) = derived.get(dst as usize).copied().flatten() {
                    deepest = deepest.min(base + off);
                }
            }
            // A call: helpers may fill stack buffers their arguments point to.
            (5, 0x85) => {
                for pointer in derived[1..=5].iter().flatten() {
                    deepest = deepest.min(*pointer);
                }
                if src == 1 {
                    let local_target = (offset as i64 + (imm + 1) * 8) as u64;
                    calls.push(Call { offset, imm, address_load: false, pseudo_func: false, local_target });
                }
                // Calls clobber r0 to r5.
                for reg in &mut derived[..=5] {
                    *reg = None;
                }
            }
            // 64-bit ALU: `rX = r10`, `rX += imm` keep a stack pointer.
            (7, 0xbf) if src == FRAME_POINTER => {
                derived[dst as usize] = Some(0);
                pc += 8;
                continue;
            }
            (7, 0xbf) => {
                derived[dst as usize] = derived.get(src as usize).copied().flatten();
                pc += 8;
                continue;
            }
            (7, 0x07) => {
                if let Some(base) = derived.get_mut(dst as usize).and_then(Option::as_mut) {
                    *base += imm;
                    pc += 8;
                    continue;
                }
                written = Some(dst);
            }
            (4, _) | (7, _) => written = Some(dst),
            _ => {}
        }
        if let Some(reg) = written.filter(|&reg| reg != FRAME_POINTER) {
            if let Some(slot) = derived.get_mut(reg as usize) {
                *slot = None;
            }
        }
        pc += 8;
    }
    ((-deepest).max(0) as u32, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instruction's bytes.
    fn insn(opcode: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut bytes = [opcode, dst | src << 4, 0, 0, 0, 0, 0, 0];
        bytes[2..4].copy_from_slice(&off.to_le_bytes());
        bytes[4..].copy_from_slice(&imm.to_le_bytes());
        bytes
    }

    #[test]
    fn a_frame_is_its_deepest_stack_access_direct_or_through_a_helper_argument() {
        let code: Vec<u8> = [
            // *(u64 *)(r10 - 16) = r1
            insn(0x7b, 10, 1, -16, 0),
            // r2 = r10; r2 += -200; call 4 (bpf_probe_read: fills r2's buffer)
            insn(0xbf, 2, 10, 0, 0),
            insn(0x07, 2, 0, 0, -200),
            insn(0x85, 0, 0, 0, 4),
            // r2 is clobbered by the call: this store is not to the stack
            insn(0x7b, 2, 1, -300, 0),
            // call +1 (a BPF-to-BPF call to the next instruction but one)
            insn(0x85, 0, 1, 0, 1),
            insn(0x95, 0, 0, 0, 0),
        ]
        .concat();
        let (frame, calls) = scan(&code, 0);
        assert_eq!(frame, 200);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].local_target, 5 * 8 + 16);
    }

    #[test]
    fn chains_add_rounded_frames_along_the_deepest_path() {
        let function = |frame, callees: &[usize]| Function { name: String::new(), frame, callees: callees.to_vec() };
        let functions = [function(264, &[1, 2]), function(8, &[]), function(248, &[1])];
        // 288 + 256 + 32
        assert_eq!(chain_depth(&functions, 0, 0), 576);
    }

    /// The embedded programs all keep their margin (checked on every build;
    /// the kernel matrix checks the verifier's own instruction counts).
    #[test]
    fn every_embedded_program_keeps_a_stack_margin() {
        let object = crate::kernel::object();
        if object.is_empty() {
            let missing = "the eBPF object is missing (this build embeds an empty stand-in)";
            crate::cpython::skip_or_fail(missing, "build it with `cargo xtask build`, which builds it first");
            return;
        }
        let stacks = program_stacks(object).unwrap();
        assert!(stacks.len() >= 10, "{stacks:?}");
        for (program, stack) in stacks {
            assert!(stack <= crate::kernel::STACK_BUDGET, "{program}: combined stack {stack} of {STACK_LIMIT} bytes");
        }
    }
}
