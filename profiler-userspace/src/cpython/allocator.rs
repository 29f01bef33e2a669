//! Where `--memory` probes a CPython process: its allocator functions (the
//! raw domain and pymalloc's arenas) by symbol, or libc's for a build
//! without a symbol table; and what an arena's pools hold.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::probe_sites;
use crate::{
    kernel::{MemoryProgram, ProbeSite},
    process::procmem::ProcessMemory,
};

/// An allocator function of CPython (the first of `symbols` its build has),
/// its libc counterpart if any, and the program probing them.
struct MemoryProbe {
    program: MemoryProgram,
    symbols: &'static [&'static str],
    libc_symbol: Option<&'static str>,
}

const RAW_MALLOC: &[&str] = &["_PyMem_RawMalloc"];
const RAW_CALLOC: &[&str] = &["_PyMem_RawCalloc"];
const RAW_REALLOC: &[&str] = &["_PyMem_RawRealloc"];
/// pymalloc's arena allocator: renamed in 3.12.
const ARENA_ALLOC: &[&str] = &["_PyObject_ArenaMmap", "_PyMem_ArenaAlloc"];
const ARENA_FREE: &[&str] = &["_PyObject_ArenaMunmap", "_PyMem_ArenaFree"];

/// Every probe of `--memory`: the raw domain (objects over 512 bytes and
/// `PyMem_Raw*`) and pymalloc's arenas, entries and returns. The first one
/// tells whether the build has a symbol table.
const MEMORY_PROBES: [MemoryProbe; 10] = {
    use MemoryProgram::*;
    [
        MemoryProbe { program: RawMalloc, symbols: RAW_MALLOC, libc_symbol: Some("malloc") },
        MemoryProbe { program: RawCalloc, symbols: RAW_CALLOC, libc_symbol: Some("calloc") },
        MemoryProbe { program: RawRealloc, symbols: RAW_REALLOC, libc_symbol: Some("realloc") },
        MemoryProbe { program: RawFree, symbols: &["_PyMem_RawFree"], libc_symbol: Some("free") },
        MemoryProbe { program: RawReturn, symbols: RAW_MALLOC, libc_symbol: Some("malloc") },
        MemoryProbe { program: RawReturn, symbols: RAW_CALLOC, libc_symbol: Some("calloc") },
        MemoryProbe { program: RawReturn, symbols: RAW_REALLOC, libc_symbol: Some("realloc") },
        // An arena is allocated like any raw block: the same entry program.
        MemoryProbe { program: RawMalloc, symbols: ARENA_ALLOC, libc_symbol: None },
        MemoryProbe { program: ArenaReturn, symbols: ARENA_ALLOC, libc_symbol: None },
        MemoryProbe { program: RawFree, symbols: ARENA_FREE, libc_symbol: None },
    ]
};

/// The sites to probe for the allocator in `object` (libpython or the
/// executable; a path as the agent sees it), or at the `libc` it maps for a
/// build without a symbol table, where pymalloc's arenas cannot be seen.
pub fn memory_sites(object: &Path, libc: Option<&Path>) -> Result<Vec<ProbeSite>> {
    let names: Vec<&str> = MEMORY_PROBES.iter().flat_map(|probe| probe.symbols).copied().collect();
    // Files are parsed once here: aya would parse them again per probe.
    let cpython = probe_sites::functions(object, &names)?;
    let mut sites = Vec::new();
    if cpython.contains_key(MEMORY_PROBES[0].symbols[0]) {
        for probe in &MEMORY_PROBES {
            let Some(function) = probe.symbols.iter().find_map(|symbol| cpython.get(*symbol)) else {
                bail!("{} has no {}", object.display(), probe.symbols.join(" or "));
            };
            let (offset, skip_ctx) = match function.tail_call {
                Some(tail_call) => (tail_call, false),
                None => (function.entry, true),
            };
            sites.push(ProbeSite { program: probe.program, file: object.to_owned(), offset, skip_ctx });
        }
    } else {
        let libc = libc.with_context(|| format!("{} has no symbol table, and no libc is mapped", object.display()))?;
        let names: Vec<&str> = MEMORY_PROBES.iter().filter_map(|probe| probe.libc_symbol).collect();
        let functions = probe_sites::functions(libc, &names)?;
        for probe in MEMORY_PROBES.iter().filter(|probe| probe.libc_symbol.is_some()) {
            let function = probe.libc_symbol.and_then(|symbol| functions.get(symbol));
            let function = function.with_context(|| format!("{} has no {:?}", libc.display(), probe.libc_symbol))?;
            sites.push(ProbeSite {
                program: probe.program,
                file: libc.to_owned(),
                offset: function.entry,
                skip_ctx: false,
            });
        }
    }
    Ok(sites)
}

/// pymalloc's pools: their size, and the step of their block sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pymalloc {
    pub pool_bytes: u64,
    pub alignment: u64,
}

/// pymalloc's pool header (`struct pool_header`), the same in every
/// version: the blocks in use (`ref.count`) and the size class (`szidx`).
const POOL_COUNT: usize = 0;
const POOL_SIZE_CLASS: usize = 36;
const POOL_HEADER: usize = 40;
/// Blocks of at most 512 bytes.
const SMALL_REQUEST_THRESHOLD: u64 = 512;

/// Blocks in use and their bytes in the pools of the arena at `arena` of
/// `arena_bytes`; None when the arena cannot be read (freed meanwhile).
pub fn arena_in_use(mem: &ProcessMemory, arena: u64, arena_bytes: u64, pymalloc: Pymalloc) -> Option<(u64, u64)> {
    let Pymalloc { pool_bytes, alignment } = pymalloc;
    // Pools start at the first pool-aligned address of the arena.
    let first = arena.next_multiple_of(pool_bytes);
    let (mut blocks, mut bytes) = (0, 0);
    let mut header = [0u8; POOL_HEADER];
    for pool in (first..arena + arena_bytes - pool_bytes + 1).step_by(pool_bytes as usize) {
        mem.read(pool, &mut header).ok()?;
        let field = |at: usize| u64::from(u32::from_ne_bytes(header[at..at + 4].try_into().unwrap()));
        let (count, block) = (field(POOL_COUNT), (field(POOL_SIZE_CLASS) + 1) * alignment);
        // A pool never used is zeroes; anything else that is not a header
        // of a pool in use (more blocks than fit) counts nothing.
        if block <= SMALL_REQUEST_THRESHOLD && count * block <= pool_bytes {
            blocks += count;
            bytes += count * block;
        }
    }
    Some((blocks, bytes))
}
