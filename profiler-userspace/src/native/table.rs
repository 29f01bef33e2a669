//! Compact unwind tables from an ELF file's CFI, for the kernel's unwinder
//! (`profiler-ebpf/src/unwind.rs`), which binary-searches them.
//!
//! gimli evaluates every FDE of `.eh_frame` (what the process itself unwinds
//! with) and of `.debug_frame` (some files describe functions only there;
//! `.eh_frame` wins where both do) into rows of [`UnwindRow`]: from `pc` on,
//! where the CFA is and where the caller's rbp was saved. x86-64 only.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;

use anyhow::{bail, Context, Result};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, EndianSlice, LittleEndian,
    RegisterRule, UnwindContext, UnwindExpression, UnwindOffset, UnwindSection, UnwindTableRow, X86_64,
};
use object::{Architecture, CompressionFormat, Object, ObjectSection};
use profiler_common::unwind::{CFA_END, CFA_NONE, CFA_PLT, CFA_RBP, CFA_RSP, CFA_UNSUPPORTED, RBP_AT_CFA, RBP_SAME};
use profiler_common::UnwindRow;

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// The unwind table of an ELF file (its bytes): rows sorted by `pc`, no two
/// in a row with the same rule, a [`CFA_NONE`] row where a function's range
/// ends and no other begins. Empty for a file without CFI. An error for a
/// file that is not x86-64 ELF, whose CFI is malformed, or whose addresses
/// do not fit the rows' 32 bits.
pub fn table(elf_bytes: &[u8]) -> Result<Vec<UnwindRow>> {
    let elf = object::File::parse(elf_bytes).context("not an ELF file")?;
    if elf.architecture() != Architecture::X86_64 {
        bail!("not an x86-64 file ({:?})", elf.architecture());
    }
    let address = |name| elf.section_by_name(name).map_or(0, |section| section.address());
    let mut rows = Rows::default();
    let eh_frame = match elf.section_by_name(".eh_frame") {
        Some(section) => {
            let data = section.data().context(".eh_frame")?;
            // Its pointers are mostly relative to themselves (pcrel), which
            // gimli resolves from the section's address.
            let bases = BaseAddresses::default()
                .set_eh_frame(section.address())
                .set_text(address(".text"))
                .set_got(address(".got"));
            let mut eh_frame = EhFrame::new(data, LittleEndian);
            eh_frame.set_address_size(8);
            disjoint(read(&mut rows, &eh_frame, ".eh_frame", &bases)?)
        }
        None => Vec::new(),
    };
    let mut fdes = eh_frame.clone();
    if let Some(data) = debug_frame(&elf, &mut rows)? {
        let mut debug_frame = DebugFrame::new(&data, LittleEndian);
        debug_frame.set_address_size(8);
        let fdes_there = read(&mut rows, &debug_frame, ".debug_frame", &BaseAddresses::default())?;
        fdes.extend(uncovered(disjoint(fdes_there), &eh_frame));
    }
    let table = assemble(fdes, &rows.rows);
    log::debug!(
        "unwind table: {} rows; {} FDEs skipped (unreadable), {} rbp rules not followed{}",
        table.len(),
        rows.skipped_fdes,
        rows.rbp_rules_ignored,
        if rows.debug_frame_unread { ", .debug_frame compressed in a format not read" } else { "" }
    );
    Ok(table)
}

/// The contents of `.debug_frame`, decompressed (`-gz` builds compress it
/// with zlib); `None` without one, or compressed otherwise (zstd), which is
/// noted in `rows`.
fn debug_frame<'a>(elf: &object::File<'a>, rows: &mut Rows) -> Result<Option<Cow<'a, [u8]>>> {
    let Some(section) = elf.section_by_name(".debug_frame") else { return Ok(None) };
    let compressed = section.compressed_data().context(".debug_frame")?;
    match compressed.format {
        CompressionFormat::None => Ok(Some(Cow::Borrowed(compressed.data))),
        CompressionFormat::Zlib => {
            let size = usize::try_from(compressed.uncompressed_size).context(".debug_frame: size")?;
            let mut data = Vec::with_capacity(size);
            flate2::read::ZlibDecoder::new(compressed.data)
                .take(size as u64)
                .read_to_end(&mut data)
                .context(".debug_frame: zlib")?;
            Ok(Some(Cow::Owned(data)))
        }
        _ => {
            rows.debug_frame_unread = true;
            Ok(None)
        }
    }
}

/// The CFA expression binutils gives a lazy PLT entry (`.plt`): rsp + 8,
/// plus 8 once the entry has pushed its index, i.e. from offset 11 of the
/// 16-byte entry: `DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and;
/// DW_OP_lit11; DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus`.
const PLT_EXPRESSION: [u8; 11] = [0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22];
/// The same for IBT entries (`endbr64; push; bnd jmp`), which compare with
/// 10. The instructions of both layouts start at offsets where `>= 10` and
/// `>= 11` agree (0, 6, 11 and 0, 4, 9, 15), and the kernel only sees
/// instruction boundaries, so both are [`CFA_PLT`].
const PLT_EXPRESSION_IBT: [u8; 11] = [0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3a, 0x2a, 0x33, 0x24, 0x22];

/// An FDE's address range and its rows in [`Rows::rows`]. After overlaps are
/// cut, `start` may lie past the first row's `pc`: the row in force at
/// `start` is then the last one at or before it.
#[derive(Clone, Debug)]
struct Fde {
    start: u32,
    end: u32,
    rows: Range<usize>,
}

/// The rows of every FDE read so far, and what the table could not say
/// (logged: they explain a stack that stops early).
#[derive(Default)]
struct Rows {
    rows: Vec<UnwindRow>,
    /// FDEs whose CIE or instructions gimli could not read: their range is
    /// left as a gap.
    skipped_fdes: usize,
    /// Rows whose rbp rule is neither a save slot nor "unchanged" (another
    /// register, an expression): taken as unchanged, which can only mislead
    /// a later frame that finds its CFA from rbp.
    rbp_rules_ignored: usize,
    /// `.debug_frame` is compressed in a format not read here.
    debug_frame_unread: bool,
}

/// Reads every FDE of `section` (called `name` in errors) into `rows`. A
/// section whose entries cannot be delimited is an error; an FDE that cannot
/// be evaluated is skipped and counted.
fn read<'a, S>(rows: &mut Rows, section: &S, name: &str, bases: &BaseAddresses) -> Result<Vec<Fde>>
where
    S: UnwindSection<Reader<'a>>,
{
    let mut fdes = Vec::new();
    let mut cies: HashMap<usize, CommonInformationEntry<Reader<'a>>> = HashMap::new();
    // One context for every FDE: it holds the row state and a stack for
    // DW_CFA_remember_state, allocated once.
    let mut context = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    'entries: loop {
        let partial = match entries.next() {
            Ok(Some(CieOrFde::Fde(partial))) => partial,
            Ok(Some(CieOrFde::Cie(_))) => continue,
            Ok(None) => break,
            Err(error) => bail!("{name}: malformed entry: {error}"),
        };
        let parsed = partial.parse(|section, bases, offset| {
            let key = UnwindOffset::into(offset);
            if let Some(cie) = cies.get(&key) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            cies.insert(key, cie.clone());
            Ok(cie)
        });
        let Ok(fde) = parsed else {
            rows.skipped_fdes += 1;
            continue;
        };
        let (start, end) = (fde.initial_address(), fde.end_address());
        // Address 0 is the linker's tombstone for a discarded function's
        // FDE (in .debug_frame); no code of an ELF file lives there.
        if start == 0 || start >= end {
            continue;
        }
        let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(end)) else {
            bail!(
                "{name}: the FDE at offset {:#x} covers {start:#x}..{end:#x}, beyond the table's 32-bit addresses",
                fde.offset()
            );
        };
        let first = rows.rows.len();
        let Ok(mut table) = fde.rows(section, bases, &mut context) else {
            rows.skipped_fdes += 1;
            continue;
        };
        loop {
            let row = match table.next_row() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(_) => {
                    rows.rows.truncate(first);
                    rows.skipped_fdes += 1;
                    continue 'entries;
                }
            };
            let Ok(pc) = u32::try_from(row.start_address()) else { break };
            if pc >= end || row.start_address() >= row.end_address() {
                continue;
            }
            let (new, rbp_ignored) = rule(row, section, pc);
            rows.rbp_rules_ignored += usize::from(rbp_ignored);
            // Rows come in increasing order of (non-empty) ranges: a new
            // row either repeats the last rule or starts a new one.
            if !rows.rows[first..].last().is_some_and(|last| same_rule(last, &new)) {
                rows.rows.push(new);
            }
        }
        if rows.rows.len() > first {
            fdes.push(Fde { start, end, rows: first..rows.rows.len() });
        }
    }
    Ok(fdes)
}

/// The row at `pc` for one CFI row, and whether its rbp rule was not
/// followed. The return address must be at CFA - 8, where the kernel reads
/// it; a rule the kernel cannot follow stops the walk there
/// ([`CFA_UNSUPPORTED`]) rather than giving it a wrong caller.
fn rule<'a, S: UnwindSection<Reader<'a>>>(row: &UnwindTableRow<usize>, section: &S, pc: u32) -> (UnwindRow, bool) {
    let stop = |cfa_rule| (UnwindRow { pc, cfa_rule, ..UnwindRow::default() }, false);
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => return stop(CFA_END),
        _ => return stop(CFA_UNSUPPORTED),
    }
    let (cfa_rule, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let rule = if *register == X86_64::RSP {
                CFA_RSP
            } else if *register == X86_64::RBP {
                CFA_RBP
            } else {
                return stop(CFA_UNSUPPORTED);
            };
            match i16::try_from(*offset) {
                Ok(offset) => (rule, offset),
                Err(_) => return stop(CFA_UNSUPPORTED),
            }
        }
        CfaRule::Expression(expression) if is_plt(expression, section) => (CFA_PLT, 8),
        CfaRule::Expression(_) => return stop(CFA_UNSUPPORTED),
    };
    let (rbp_rule, rbp_offset, ignored) = match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(offset)) => match i16::try_from(offset) {
            Ok(offset) => (RBP_AT_CFA, offset, false),
            Err(_) => return stop(CFA_UNSUPPORTED),
        },
        None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => (RBP_SAME, 0, false),
        Some(_) => (RBP_SAME, 0, true),
    };
    (UnwindRow { pc, cfa_offset, rbp_offset, cfa_rule, rbp_rule, _pad: 0 }, ignored)
}

fn is_plt<'a, S: UnwindSection<Reader<'a>>>(expression: &UnwindExpression<usize>, section: &S) -> bool {
    expression
        .get(section)
        .is_ok_and(|bytes| matches!(bytes.0.slice(), b if b == PLT_EXPRESSION || b == PLT_EXPRESSION_IBT))
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    (a.cfa_rule, a.cfa_offset, a.rbp_rule, a.rbp_offset) == (b.cfa_rule, b.cfa_offset, b.rbp_rule, b.rbp_offset)
}

/// The FDEs of one section, sorted by address, with overlaps cut: the FDE
/// that starts first keeps the addresses it shares with a later one.
fn disjoint(mut fdes: Vec<Fde>) -> Vec<Fde> {
    fdes.sort_by_key(|fde| fde.start);
    let mut covered = 0;
    fdes.retain_mut(|fde| {
        fde.start = fde.start.max(covered);
        covered = covered.max(fde.end);
        fde.start < fde.end
    });
    fdes
}

/// The parts of the `lower` FDEs (disjoint, sorted) that none of `upper`
/// (disjoint, sorted) covers: `.eh_frame` is what the process itself unwinds
/// with, so it wins over `.debug_frame`.
fn uncovered(lower: Vec<Fde>, upper: &[Fde]) -> Vec<Fde> {
    let mut out = Vec::with_capacity(lower.len());
    for fde in lower {
        let mut start = fde.start;
        let mut next = upper.partition_point(|u| u.end <= start);
        while start < fde.end {
            match upper.get(next) {
                Some(u) if u.start < fde.end => {
                    if u.start > start {
                        out.push(Fde { start, end: u.start, rows: fde.rows.clone() });
                    }
                    start = start.max(u.end);
                    next += 1;
                }
                _ => {
                    out.push(Fde { start, end: fde.end, rows: fde.rows.clone() });
                    break;
                }
            }
        }
    }
    out
}

/// The table: the rows of disjoint FDEs in address order, a [`CFA_NONE`]
/// row where an FDE ends and no other starts (so that a walk stops in a gap
/// instead of applying the previous function's rule), and no row that
/// repeats the rule of the one before it.
fn assemble(mut fdes: Vec<Fde>, rows: &[UnwindRow]) -> Vec<UnwindRow> {
    fdes.sort_unstable_by_key(|fde| fde.start);
    let gap = |pc| UnwindRow { pc, cfa_rule: CFA_NONE, rbp_rule: RBP_SAME, ..UnwindRow::default() };
    let mut out: Vec<UnwindRow> = Vec::with_capacity(rows.len() + fdes.len());
    let push = |out: &mut Vec<UnwindRow>, row: UnwindRow| {
        if !out.last().is_some_and(|last| same_rule(last, &row)) {
            out.push(row);
        }
    };
    let mut end = None;
    for fde in fdes {
        if let Some(end) = end.filter(|&end| end != fde.start) {
            push(&mut out, gap(end));
        }
        let rows = &rows[fde.rows];
        let first = rows.partition_point(|row| row.pc <= fde.start).saturating_sub(1);
        push(&mut out, UnwindRow { pc: fde.start, ..rows[first] });
        for row in rows[first + 1..].iter().take_while(|row| row.pc < fde.end) {
            push(&mut out, *row);
        }
        end = Some(fde.end);
    }
    if let Some(end) = end {
        push(&mut out, gap(end));
    }
    out
}

/// The row in force at `pc` (an address of the file): the last with
/// `row.pc <= pc`, the binary search the kernel does. An address past 32
/// bits gets the last row, the [`CFA_NONE`] that ends every table.
#[cfg(test)]
fn lookup(rows: &[UnwindRow], pc: u64) -> Option<&UnwindRow> {
    let index = rows.partition_point(|row| u64::from(row.pc) <= pc);
    index.checked_sub(1).map(|index| &rows[index])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const LIBPYTHON: &str = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0";
    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const LIBZ: &str = "/lib/x86_64-linux-gnu/libz.so.1";
    const PYTHON_STATIC: &str = "/usr/bin/python3.11";

    fn table_of(path: impl AsRef<Path>) -> Vec<UnwindRow> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        table(&bytes).unwrap_or_else(|error| panic!("{}: {error:#}", path.display()))
    }

    /// What the kernel relies on: sorted, no row repeating the one before,
    /// a gap row last.
    fn assert_well_formed(rows: &[UnwindRow], what: &str) {
        assert!(!rows.is_empty(), "{what}: empty table");
        for pair in rows.windows(2) {
            assert!(pair[0].pc < pair[1].pc, "{what}: rows out of order: {pair:?}");
            assert!(!same_rule(&pair[0], &pair[1]), "{what}: unmerged rows {pair:?}");
        }
        assert_eq!(rows.last().map(|row| row.cfa_rule), Some(CFA_NONE), "{what}: no gap row at the end");
    }

    /// One CIE or FDE of `readelf --debug-dump=frames-interp`: its range
    /// (`None` for a CIE), its CIE's offset, and its rows (LOC, column →
    /// value).
    struct Entry {
        range: Option<Range<u64>>,
        cie: String,
        rows: Vec<(u64, HashMap<String, String>)>,
    }

    /// readelf's interpretation of `path`'s `.eh_frame`, by entry offset.
    fn readelf_eh_frame(path: &str) -> Vec<(String, Entry)> {
        let output = Command::new("readelf")
            // -wN: not the separate debug file of a .gnu_debuglink, whose
            // .eh_frame is empty (NOBITS).
            .args(["-wN", "--debug-dump=frames-interp", path])
            .output()
            .expect("this test needs readelf (binutils) to check tables against");
        assert!(output.status.success(), "readelf {path}: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).unwrap();
        let mut entries: Vec<(String, Entry)> = Vec::new();
        let mut columns: Vec<String> = Vec::new();
        let mut in_eh_frame = false;
        for line in text.lines() {
            if line.starts_with("Contents of the ") {
                in_eh_frame = line.starts_with("Contents of the .eh_frame section");
                continue;
            }
            // A register rule reads `r9 (r9)`: the name in parentheses goes.
            let tokens: Vec<&str> = line.split_whitespace().filter(|token| !token.starts_with('(')).collect();
            if !in_eh_frame || tokens.is_empty() {
                continue;
            }
            match tokens.as_slice() {
                [offset, _, _, "CIE", ..] => {
                    columns.clear();
                    entries.push((offset.to_string(), Entry { range: None, cie: String::new(), rows: Vec::new() }));
                }
                [offset, _, _, "FDE", cie, pc, ..] => {
                    columns.clear();
                    let (start, end) = pc.trim_start_matches("pc=").split_once("..").unwrap();
                    let range = u64::from_str_radix(start, 16).unwrap()..u64::from_str_radix(end, 16).unwrap();
                    let cie = cie.trim_start_matches("cie=").to_string();
                    entries.push((offset.to_string(), Entry { range: Some(range), cie, rows: Vec::new() }));
                }
                [_, "ZERO", "terminator"] => {}
                ["LOC", ..] => columns = tokens[1..].iter().map(|t| t.to_string()).collect(),
                [loc, values @ ..] if !columns.is_empty() => {
                    assert_eq!(values.len(), columns.len(), "readelf row {line:?}");
                    let loc = u64::from_str_radix(loc, 16).unwrap();
                    let values = columns.iter().cloned().zip(values.iter().map(|v| v.to_string())).collect();
                    entries.last_mut().unwrap().1.rows.push((loc, values));
                }
                _ => panic!("unexpected readelf line {line:?}"),
            }
        }
        entries
    }

    /// `register+offset` as readelf prints a CFA.
    fn register_offset(value: &str) -> Option<(&str, i64)> {
        let split = value.find(['+', '-'])?;
        Some((&value[..split], value[split..].parse().ok()?))
    }

    /// The row readelf's columns call for, with the rules of [`rule`]; `plt`
    /// tells whether the address is in `.plt`, where an expression is the
    /// stubs' one (readelf prints any expression as `exp`).
    fn expected(values: &HashMap<String, String>, plt: bool) -> UnwindRow {
        let only = |cfa_rule| UnwindRow { cfa_rule, ..UnwindRow::default() };
        match values.get("ra").map(String::as_str) {
            Some("c-8") => {}
            Some("u") => return only(CFA_END),
            _ => return only(CFA_UNSUPPORTED),
        }
        let (cfa_rule, cfa_offset) = match values["CFA"].as_str() {
            "exp" if plt => (CFA_PLT, 8),
            cfa => match register_offset(cfa) {
                Some((register @ ("rsp" | "rbp"), offset)) => match i16::try_from(offset) {
                    Ok(offset) => (if register == "rsp" { CFA_RSP } else { CFA_RBP }, offset),
                    Err(_) => return only(CFA_UNSUPPORTED),
                },
                _ => return only(CFA_UNSUPPORTED),
            },
        };
        let (rbp_rule, rbp_offset) = match values.get("rbp").and_then(|rbp| rbp.strip_prefix('c')) {
            Some(offset) => match i16::try_from(offset.parse::<i64>().unwrap()) {
                Ok(offset) => (RBP_AT_CFA, offset),
                Err(_) => return only(CFA_UNSUPPORTED),
            },
            None => (RBP_SAME, 0),
        };
        UnwindRow { pc: 0, cfa_offset, rbp_offset, cfa_rule, rbp_rule, _pad: 0 }
    }

    /// Every row of every FDE readelf shows for `path`'s `.eh_frame` (FDEs
    /// without rows have their CIE's) is what `lookup` finds at its LOC, and
    /// every FDE's end is a gap or the start of another FDE. Returns how many
    /// rows of each CFA rule were checked.
    fn check_against_readelf(path: &str) -> HashMap<u8, usize> {
        let rows = table_of(path);
        assert_well_formed(&rows, path);
        let bytes = std::fs::read(path).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let plt = elf.section_by_name(".plt").map(|plt| plt.address()..plt.address() + plt.size());
        let entries = readelf_eh_frame(path);
        let cies: HashMap<&str, &Entry> =
            entries.iter().filter(|(_, entry)| entry.range.is_none()).map(|(offset, e)| (offset.as_str(), e)).collect();
        let starts: HashSet<u64> = entries.iter().filter_map(|(_, entry)| Some(entry.range.as_ref()?.start)).collect();
        let mut checked: HashMap<u8, usize> = HashMap::new();
        let mut wrong = Vec::new();
        for (offset, fde) in &entries {
            let Some(range) = &fde.range else { continue };
            if range.start == 0 || range.is_empty() {
                continue;
            }
            // A CIE may set no rule at all (the signal trampoline's): its
            // FDE says everything, else the frame cannot be unwound.
            let cie_rules = cies[fde.cie.as_str()].rows.first().map(|(_, values)| values.clone());
            let cie_row = [(range.start, cie_rules.unwrap_or_default())];
            let fde_rows = if fde.rows.is_empty() { &cie_row[..] } else { &fde.rows[..] };
            for (index, (loc, values)) in fde_rows.iter().enumerate() {
                // A later row at the same address replaces this one.
                if fde_rows.get(index + 1).is_some_and(|(next, _)| next == loc) || !range.contains(loc) {
                    continue;
                }
                let in_plt = plt.as_ref().is_some_and(|plt| plt.contains(loc));
                let want = expected(values, in_plt);
                let got = lookup(&rows, *loc).copied().unwrap_or_default();
                let same = got.cfa_rule == want.cfa_rule
                    && (!matches!(want.cfa_rule, CFA_RSP | CFA_RBP | CFA_PLT) || same_rule(&got, &want));
                if !same {
                    wrong.push(format!("FDE {offset} at {loc:#x}: readelf {values:?}, table {got:?}"));
                }
                *checked.entry(want.cfa_rule).or_default() += 1;
            }
            let after = lookup(&rows, range.end).unwrap();
            if after.cfa_rule != CFA_NONE && !starts.contains(&range.end) {
                wrong.push(format!("FDE {offset} ends at {:#x} in a gap with no gap row: {after:?}", range.end));
            }
        }
        assert!(
            wrong.is_empty(),
            "{path}: {} rows differ from readelf's, first: {:#?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );
        checked
    }

    /// Whether `path` can be read here (pyenv's builds are under /root); if not, see
    /// [`crate::cpython::skip_or_fail`].
    fn readable(path: &str) -> bool {
        let readable = std::fs::File::open(path).is_ok();
        if !readable {
            let install = crate::cpython::install_hint("/", path);
            crate::cpython::skip_or_fail(&format!("{path} cannot be read (not installed, or not root)"), &install);
        }
        readable
    }

    #[test]
    fn unwind_tables_agree_with_readelf() {
        for path in [LIBC, LIBPYTHON, LIBZ].into_iter().filter(|path| readable(path)) {
            let checked = check_against_readelf(path);
            let total: usize = checked.values().sum();
            assert!(total > 500, "{path}: only {total} rows checked: {checked:?}");
            // The stubs of `.plt` must be recognised, not cut.
            assert!(checked.get(&CFA_PLT).is_some_and(|&n| n > 0), "{path}: no PLT rows: {checked:?}");
            if path == LIBC {
                // libc has functions with rbp frames (alloca, VLAs) and
                // outermost frames (`clone`, `__clone3`).
                assert!(checked.get(&CFA_RBP).is_some_and(|&n| n > 10), "{path}: rbp CFAs: {checked:?}");
                assert!(checked.contains_key(&CFA_END), "{path}: no outermost frame: {checked:?}");
            }
        }
    }

    #[test]
    fn unwind_tables_of_the_python_builds_here() {
        for path in [LIBPYTHON, PYTHON_STATIC].into_iter().filter(|path| readable(path)) {
            let rows = table_of(path);
            assert_well_formed(&rows, path);
            assert!(rows.len() > 10_000, "{path}: {} rows", rows.len());
            assert!(rows.iter().any(|row| row.cfa_rule == CFA_PLT), "{path}: no PLT rows");
        }
    }

    /// A known call chain: `main → a → b → c → d`, with frames of different
    /// shapes: `a` a large frame (rsp + 320), `b` a small one, `c` an rbp
    /// frame (alloca) that saves rbp, `d` a leaf. `main` keeps `argv` (the
    /// top of the stack in use) for the recording.
    const CALL_CHAIN: &str = r#"
#include <string.h>
void *volatile stack_top;
volatile int sink;
__attribute__((noinline)) int d(int x) { sink = x; return x * 3 + sink; }
__attribute__((noinline)) int c(int x) {
    char *buf = __builtin_alloca(x + 100);
    memset(buf, x, x + 100);
    return d(buf[x]) + buf[3];
}
__attribute__((noinline)) int b(int x) { int r = c(x + 1); sink = r; return r + sink * 2; }
__attribute__((noinline)) int a(int x) { volatile char big[300]; big[x] = 1; return b(x) + big[x]; }
int main(int argc, char **argv) { stack_top = argv; return a(argc) & 1; }
"#;

    /// A stack recorded by gdb stopped at `d`, and gdb's own backtrace.
    struct Recording {
        rip: u64,
        rsp: u64,
        rbp: u64,
        /// The stack from `rsp` to `argv`.
        stack: Vec<u8>,
        /// gdb's frames: pc (the return address for callers) and function.
        frames: Vec<(u64, String)>,
        /// Files mapped: path and load bias.
        files: Vec<(PathBuf, u64)>,
    }

    fn build(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
        let source = dir.join("chain.c");
        std::fs::write(&source, CALL_CHAIN).unwrap();
        let binary = dir.join(name);
        let output = Command::new("gcc")
            .args(["-O2", "-fomit-frame-pointer"])
            .args(flags)
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .output()
            .expect("this test needs gcc");
        assert!(output.status.success(), "gcc: {}", String::from_utf8_lossy(&output.stderr));
        binary
    }

    fn hex(token: &str) -> u64 {
        u64::from_str_radix(token.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("not hex: {token:?}"))
    }

    fn record(binary: &Path) -> Recording {
        let dump = binary.with_extension("stack");
        let output = Command::new("gdb")
            .args(["-batch", "-nx", "-ex", "set backtrace past-main on", "-ex", "break d", "-ex", "run", "-ex", "bt"])
            .args(["-ex", "info registers rip rsp rbp", "-ex", "info proc mappings"])
            .args(["-ex", &format!("dump binary memory {} $rsp (long)stack_top", dump.display())])
            .arg(binary)
            .output()
            .expect("this test needs gdb to record a stack");
        let text = String::from_utf8_lossy(&output.stdout);
        let register = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
                .map(|rest| hex(rest.split_whitespace().next().unwrap()))
                .unwrap_or_else(|| {
                    panic!("no {name} in gdb's output:\n{text}\n{}", String::from_utf8_lossy(&output.stderr))
                })
        };
        let (rip, rsp, rbp) = (register("rip"), register("rsp"), register("rbp"));
        let mut frames = Vec::new();
        let mut mappings = Vec::new();
        for line in text.lines() {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            match tokens.as_slice() {
                [number, address, "in", function, ..] if number.starts_with('#') && address.starts_with("0x") => {
                    frames.push((hex(address), function.to_string()))
                }
                [number, function, ..] if number.starts_with('#') => frames.push((rip, function.to_string())),
                [start, _end, _size, offset, .., path] if start.starts_with("0x") && path.starts_with('/') => {
                    mappings.push((hex(start), hex(offset), PathBuf::from(path)))
                }
                _ => {}
            }
        }
        // The bias of a file: where its first segment (file offset 0) is
        // mapped, less the address the file gives that segment.
        let mut files: Vec<(PathBuf, u64)> = Vec::new();
        for (start, offset, path) in mappings {
            if offset == 0 && !files.iter().any(|(known, _)| *known == path) {
                let bytes = std::fs::read(&path).unwrap();
                let elf = object::File::parse(&*bytes).unwrap();
                use object::ObjectSegment;
                let first = elf.segments().find(|segment| segment.file_range().0 == 0).unwrap();
                files.push((path, start - first.address()));
            }
        }
        let stack =
            std::fs::read(&dump).unwrap_or_else(|error| panic!("gdb did not dump the stack ({error}):\n{text}"));
        Recording { rip, rsp, rbp, stack, frames, files }
    }

    /// Unwinds `recording` as the kernel does, with the tables of its files:
    /// the pcs of the frames, and the rules used on the way.
    fn unwind(recording: &Recording) -> (Vec<u64>, HashSet<(u8, u8)>) {
        let tables: Vec<(u64, Vec<UnwindRow>)> =
            recording.files.iter().map(|(path, bias)| (*bias, table_of(path))).collect();
        let read = |address: u64| {
            let at = usize::try_from(address - recording.rsp).unwrap();
            let bytes =
                recording.stack.get(at..at + 8).unwrap_or_else(|| panic!("{address:#x} is not in the recorded stack"));
            u64::from_le_bytes(bytes.try_into().unwrap())
        };
        let (mut pc, mut rsp, mut rbp) = (recording.rip, recording.rsp, recording.rbp);
        let mut pcs = Vec::new();
        let mut rules = HashSet::new();
        loop {
            assert!(pcs.len() < 32, "no end to the stack: {pcs:x?}");
            pcs.push(pc);
            // A caller's pc is a return address, maybe past its function's end.
            let at = if pcs.len() == 1 { pc } else { pc - 1 };
            let row = tables
                .iter()
                .filter(|(bias, _)| at >= *bias)
                .filter_map(|(bias, rows)| lookup(rows, at - bias).filter(|row| row.cfa_rule != CFA_NONE))
                .next()
                .unwrap_or_else(|| panic!("no table covers {at:#x} (frames so far {pcs:x?})"));
            rules.insert((row.cfa_rule, row.rbp_rule));
            let cfa = match row.cfa_rule {
                CFA_RSP => rsp.wrapping_add_signed(row.cfa_offset.into()),
                CFA_RBP => rbp.wrapping_add_signed(row.cfa_offset.into()),
                CFA_PLT => rsp + 8 + if pc & 15 >= 11 { 8 } else { 0 },
                CFA_END => break,
                _ => panic!("the walk stops at {pc:#x}: {row:?}"),
            };
            if row.rbp_rule == RBP_AT_CFA {
                rbp = read(cfa.wrapping_add_signed(row.rbp_offset.into()));
            }
            pc = read(cfa - 8);
            rsp = cfa;
        }
        (pcs, rules)
    }

    /// Builds the call chain with `flags`, stops it in `d` under gdb and
    /// checks that the tables give gdb's backtrace, `d` to `_start`, whose
    /// CFI ends the stack. Returns the recording.
    fn check_recorded_stack(dir: &Path, name: &str, flags: &[&str]) -> Recording {
        let binary = build(dir, name, flags);
        let recording = record(&binary);
        let functions: Vec<&str> = recording.frames.iter().map(|(_, function)| function.as_str()).collect();
        // gdb's own answer is the known chain, into libc, ending at _start.
        assert_eq!(functions[..5], ["d", "c", "b", "a", "main"], "gdb's backtrace: {:?}", recording.frames);
        assert_eq!(functions.last(), Some(&"_start"), "gdb's backtrace: {:?}", recording.frames);
        let (pcs, rules) = unwind(&recording);
        let expected: Vec<u64> = recording.frames.iter().map(|(pc, _)| *pc).collect();
        assert_eq!(pcs, expected, "{name}: unwound {pcs:x?}, gdb: {:x?}", recording.frames);
        // `c` finds its CFA from rbp, and `b` restores the rbp `c` saved.
        assert!(rules.contains(&(CFA_RBP, RBP_AT_CFA)), "{name}: rules used {rules:?}");
        assert!(rules.contains(&(CFA_RSP, RBP_SAME)), "{name}: rules used {rules:?}");
        recording
    }

    #[test]
    fn unwind_recorded_stack_with_eh_frame() {
        let dir = tempfile::tempdir().unwrap();
        check_recorded_stack(dir.path(), "eh_frame", &["-fasynchronous-unwind-tables"]);
    }

    /// Whether the `.eh_frame` of `path` alone covers `address`.
    fn eh_frame_covers(path: &Path, address: u64) -> bool {
        let bytes = std::fs::read(path).unwrap();
        let elf = object::File::parse(&*bytes).unwrap();
        let section = elf.section_by_name(".eh_frame").unwrap();
        let bases = BaseAddresses::default().set_eh_frame(section.address());
        let mut rows = Rows::default();
        let fdes = read(&mut rows, &EhFrame::new(section.data().unwrap(), LittleEndian), ".eh_frame", &bases).unwrap();
        fdes.iter().any(|fde| (u64::from(fde.start)..u64::from(fde.end)).contains(&address))
    }

    #[test]
    fn unwind_recorded_stack_with_debug_frame_only() {
        // Without unwind tables, gcc describes the program's functions in
        // .debug_frame alone (the C runtime's stay in .eh_frame).
        let dir = tempfile::tempdir().unwrap();
        for (name, flags) in [
            ("debug_frame", &["-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-g"][..]),
            ("debug_frame_zlib", &["-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-g", "-gz=zlib"][..]),
        ] {
            let recording = check_recorded_stack(dir.path(), name, flags);
            let (path, bias) = &recording.files[0];
            assert!(!eh_frame_covers(path, recording.rip - bias), "{name}: d is in .eh_frame");
            if name.ends_with("zlib") {
                let bytes = std::fs::read(path).unwrap();
                let elf = object::File::parse(&*bytes).unwrap();
                let format = elf.section_by_name(".debug_frame").unwrap().compressed_data().unwrap().format;
                assert_eq!(format, CompressionFormat::Zlib, "{name}");
            }
        }
    }

    #[test]
    fn unwind_table_of_files_without_cfi_or_not_elf() {
        let dir = tempfile::tempdir().unwrap();
        let binary = build(dir.path(), "chain", &[]);
        let stripped = dir.path().join("stripped");
        let status = Command::new("objcopy")
            .args(["--strip-all", "--remove-section=.eh_frame", "--remove-section=.eh_frame_hdr"])
            .arg(&binary)
            .arg(&stripped)
            .status()
            .expect("this test needs objcopy (binutils)");
        assert!(status.success());
        assert_eq!(table(&std::fs::read(&stripped).unwrap()).unwrap(), Vec::new());

        assert!(table(b"\x7fELF, but not really an ELF file at all").is_err());
        let libc = std::fs::read(LIBC).unwrap();
        assert!(table(&libc[..4096]).is_err(), "a truncated ELF file");
    }

    #[test]
    fn unwind_table_refuses_addresses_past_32_bits() {
        let dir = tempfile::tempdir().unwrap();
        let library = build(dir.path(), "high.so", &["-shared", "-fPIC", "-Wl,-Ttext-segment=0x200000000"]);
        let error = table(&std::fs::read(library).unwrap()).unwrap_err().to_string();
        assert!(error.contains(".eh_frame") && error.contains("0x2000"), "{error}");
    }
}
