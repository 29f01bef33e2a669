//! Line numbers from a code object's line table, in the three formats
//! CPython has used (see [`LineTable`]).
//!
//! The location table of 3.11+ (PEP 657, CPython's `Objects/locations.md`) is
//! a list of entries, each covering 1 to 8 code units (2 bytes each) of
//! bytecode. The first byte of an entry has bit 7 set, the entry's code in
//! bits 3-6 and its length minus one in bits 0-2; the code says how the line
//! changes from the previous entry's (starting at `co_firstlineno`) and how
//! the columns that follow are encoded.

use super::layout::LineTable;

/// The line of the instruction at byte offset `offset` in the bytecode, or
/// None when the table gives it none or ends before it.
pub fn line_of(format: LineTable, table: &[u8], first_line: i32, offset: u64) -> Option<u32> {
    match format {
        LineTable::Lnotab => u32::try_from(lnotab_line(table, first_line, offset)).ok(),
        LineTable::Pep626 => pep626_line(table, first_line, offset),
        LineTable::Locations => locations_line(table, first_line, offset / 2),
    }
}

/// `co_lnotab` (3.6 to 3.9, `Objects/lnotab_notes.txt`): (bytecode delta,
/// line delta) byte pairs, the line delta signed; as `PyCode_Addr2Line`, the
/// line of the last pair starting at or before `offset`.
fn lnotab_line(table: &[u8], first_line: i32, offset: u64) -> i64 {
    let mut line = i64::from(first_line);
    let mut start = 0;
    for pair in table.chunks_exact(2) {
        start += u64::from(pair[0]);
        if start > offset {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    line
}

/// No line, as a line delta of [`pep626_line`]'s table.
const PEP626_NO_LINE: i8 = -128;

/// `co_linetable` of 3.10 (PEP 626, `Objects/lnotab_notes.txt`): pairs of
/// (bytes covered, signed line delta or -128 for none), each a range that
/// starts where the previous ends; as `_PyLineTable_NextAddressRange`.
fn pep626_line(table: &[u8], first_line: i32, offset: u64) -> Option<u32> {
    let mut line = i64::from(first_line);
    let mut end = 0;
    for pair in table.chunks_exact(2) {
        let delta = pair[1] as i8;
        if delta != PEP626_NO_LINE {
            line += i64::from(delta);
        }
        end += u64::from(pair[0]);
        if offset < end {
            return if delta == PEP626_NO_LINE { None } else { u32::try_from(line).ok() };
        }
    }
    None
}

/// No location: the instructions belong to no line.
const CODE_NONE: u8 = 15;
/// Signed varint line delta, then end line delta, column and end column.
const CODE_LONG: u8 = 14;
/// Signed varint line delta, no columns.
const CODE_NO_COLUMNS: u8 = 13;
/// One-line forms: line delta of `code - 10`, two column bytes.
const CODE_ONE_LINE0: u8 = 10;
const CODE_ONE_LINE2: u8 = 12;

/// The line of the code unit at index `unit` (byte offset / 2) in the
/// bytecode, as the location table of 3.11+ gives it.
fn locations_line(table: &[u8], first_line: i32, unit: u64) -> Option<u32> {
    let mut line = i64::from(first_line);
    let mut start = 0u64;
    let mut pos = 0;
    while let Some(&head) = table.get(pos) {
        if head & 0x80 == 0 {
            return None; // Not the start of an entry: corrupt table.
        }
        let code = (head >> 3) & 15;
        let end = start + u64::from(head & 7) + 1;
        line += match code {
            CODE_LONG | CODE_NO_COLUMNS => signed_varint(&table[pos + 1..])?,
            CODE_ONE_LINE0..=CODE_ONE_LINE2 => i64::from(code - CODE_ONE_LINE0),
            _ => 0,
        };
        if unit < end {
            return if code == CODE_NONE { None } else { u32::try_from(line).ok() };
        }
        start = end;
        // The next entry starts at the next byte with bit 7 set.
        pos += 1;
        while table.get(pos).is_some_and(|b| b & 0x80 == 0) {
            pos += 1;
        }
    }
    None
}

/// Varints hold 6 bits per byte, least significant first; bit 6 says another
/// byte follows.
fn varint(bytes: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 63) << (6 * i);
        if b & 64 == 0 {
            return Some(value);
        }
    }
    None
}

/// Signed varints keep the sign in bit 0 and the magnitude above it.
fn signed_varint(bytes: &[u8]) -> Option<i64> {
    let value = varint(bytes)?;
    let magnitude = (value >> 1) as i64;
    Some(if value & 1 != 0 { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpython::layout::{install_hint, layout, pyenv_build, skip_or_fail};
    use std::{path::Path, process::Command};

    #[test]
    fn varints() {
        assert_eq!(varint(&[5]), Some(5));
        assert_eq!(varint(&[0x40 | 1, 2]), Some(1 | 2 << 6));
        assert_eq!(varint(&[0x40]), None);
        assert_eq!(signed_varint(&[6]), Some(3));
        assert_eq!(signed_varint(&[7]), Some(-3));
    }

    #[test]
    fn hand_made_location_table() {
        // Entry 1: short form (code 0), 2 units, same line.
        // Entry 2: one-line form, delta 2, 1 unit, two column bytes.
        // Entry 3: no location, 1 unit.
        // Entry 4: no-column form, delta -1 (signed varint 3), 3 units.
        let table = [0x80 | 1, 0x00, 0x80 | 12 << 3, 4, 9, 0x80 | 15 << 3, 0x80 | 13 << 3 | 2, 3];
        let lines: Vec<_> = (0..8).map(|unit| line_of(LineTable::Locations, &table, 10, unit * 2)).collect();
        assert_eq!(lines, [Some(10), Some(10), Some(12), None, Some(11), Some(11), Some(11), None]);
    }

    #[test]
    fn hand_made_lnotab() {
        // Line 10 from 0; at 4, +2 then -1 (a zero-length step): 11; at 6, +2: 13; no end.
        let table = [4, 2, 0, 0xff, 2, 2];
        let lines: Vec<_> = (0..5).map(|unit| line_of(LineTable::Lnotab, &table, 10, unit * 2)).collect();
        assert_eq!(lines, [Some(10), Some(10), Some(11), Some(13), Some(13)]);
    }

    #[test]
    fn hand_made_pep626_table() {
        // 4 bytes on line 10, 2 on no line, 2 on line 9 (-1 from 10), then the end.
        let table = [4, 0, 2, 0x80, 2, 0xff];
        let lines: Vec<_> = (0..5).map(|unit| line_of(LineTable::Pep626, &table, 10, unit * 2)).collect();
        assert_eq!(lines, [Some(10), Some(10), None, Some(9), None]);
    }

    /// Functions of varied shapes: multi-line expressions (negative deltas,
    /// the long form), big line jumps, comprehensions, try/except, nested
    /// code, a jump of 300 lines (`#GAP`).
    const SHAPES: &str = r##"
import math

def simple(a, b):
    return a + b

class Worker:
    def crunch(self, items):
        total = 0
        for item in items:
            if item % 2:
                total += math.sqrt(
                    item
                ) * (
                    item + 1
                )
            else:
                total -= item
        return [x * 2 for x in range(total) if x > 3]

    async def later(self):
        try:
            await self.crunch([1, 2, 3])
        except (ValueError,
                KeyError) as e:
            raise RuntimeError("no") from e
        finally:
            pass

def far_away(f=lambda x: x + 1):
    def inner():
        return f(
            1)
    y = {k: v for k, v in zip(range(3), range(3))}
    #GAP
    with open(__file__) as fh:
        return fh.read(), y, inner()
"##;

    /// Asks each of pyenv's CPythons for its line tables and, per code unit,
    /// the line that CPython's own tools give (`co_positions()` from 3.11,
    /// `co_lines()` in 3.10, `dis.findlinestarts` before), and checks the
    /// decoder agrees everywhere.
    #[test]
    fn agrees_with_every_cpython() {
        for minor in 7..=12 {
            let Some(build) = pyenv_build(minor) else {
                let install = install_hint("/", &format!("/root/.pyenv/versions/3.{minor}/bin/python3.{minor}"));
                skip_or_fail(&format!("pyenv's CPython 3.{minor} is not installed"), &install);
                continue;
            };
            let format = layout(3, minor).unwrap().line_table;
            check_line_tables(&build.python, format);
        }
    }

    fn check_line_tables(python: &Path, format: LineTable) {
        // One line per code object: first line, table in hex, line per unit.
        let dump = r##"
import dis, sys, types, inspect
def walk(co):
    yield co
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            yield from walk(c)
def lines_per_unit(co):
    if hasattr(co, "co_positions"):
        return [p[0] for p in co.co_positions()]
    units = len(co.co_code) // 2
    if hasattr(co, "co_lines"):
        ranges = co.co_lines()
    else:
        starts = list(dis.findlinestarts(co)) + [(units * 2, None)]
        ranges = [(start, end, line) for (start, line), (end, _) in zip(starts, starts[1:])]
    lines = [None] * units
    for start, end, line in ranges:
        for unit in range(start // 2, end // 2):
            lines[unit] = line
    return lines
sources = [(sys.argv[1].replace("#GAP", "\n" * 300), "<shapes>"), (open(inspect.__file__).read(), inspect.__file__)]
for src, name in sources:
    for co in walk(compile(src, name, "exec")):
        table = co.co_linetable if sys.version_info >= (3, 10) else co.co_lnotab
        lines = ",".join("-" if line is None else str(line) for line in lines_per_unit(co))
        print(co.co_firstlineno, table.hex() or "-", lines)
"##;
        let out = Command::new(python).args(["-c", dump, SHAPES]).output().unwrap();
        assert!(out.status.success(), "{}: {}", python.display(), String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let mut codes = 0;
        for row in text.lines() {
            let fields: Vec<&str> = row.split(' ').collect();
            let first_line: i32 = fields[0].parse().unwrap();
            let table = hex(fields[1]);
            for (unit, expected) in fields[2].split(',').enumerate() {
                let expected = expected.parse::<u32>().ok();
                let line = line_of(format, &table, first_line, unit as u64 * 2);
                assert_eq!(line, expected, "{}: unit {unit} of {row}", python.display());
            }
            codes += 1;
        }
        assert!(codes > 100, "{}: only {codes} code objects", python.display());
    }

    fn hex(text: &str) -> Vec<u8> {
        if text == "-" {
            return Vec::new();
        }
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }
}
