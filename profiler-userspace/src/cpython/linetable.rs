//! Line numbers from `co_linetable`, the location table of CPython 3.11+
//! (PEP 657; format described in CPython's `Objects/locations.md`).
//!
//! The table is a list of entries, each covering 1 to 8 code units (2 bytes
//! each) of bytecode. The first byte of an entry has bit 7 set, the entry's
//! code in bits 3-6 and its length minus one in bits 0-2; the code says how
//! the line changes from the previous entry's (starting at `co_firstlineno`)
//! and how the columns that follow are encoded.

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
/// bytecode, or None when the table gives it none or ends before it.
pub fn line_of(table: &[u8], first_line: i32, unit: u64) -> Option<u32> {
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
    use std::process::Command;

    #[test]
    fn varints() {
        assert_eq!(varint(&[5]), Some(5));
        assert_eq!(varint(&[0x40 | 1, 2]), Some(1 | 2 << 6));
        assert_eq!(varint(&[0x40]), None);
        assert_eq!(signed_varint(&[6]), Some(3));
        assert_eq!(signed_varint(&[7]), Some(-3));
    }

    #[test]
    fn hand_made_table() {
        // Entry 1: short form (code 0), 2 units, same line.
        // Entry 2: one-line form, delta 2, 1 unit, two column bytes.
        // Entry 3: no location, 1 unit.
        // Entry 4: no-column form, delta -1 (signed varint 3), 3 units.
        let table = [0x80 | 1, 0x00, 0x80 | 12 << 3, 4, 9, 0x80 | 15 << 3, 0x80 | 13 << 3 | 2, 3];
        let lines: Vec<_> = (0..8).map(|unit| line_of(&table, 10, unit)).collect();
        assert_eq!(lines, [Some(10), Some(10), Some(12), None, Some(11), Some(11), Some(11), None]);
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

    /// Asks a real CPython 3.11 for its line tables and, per code unit, the
    /// line from `co_positions()`, and checks the decoder agrees everywhere.
    #[test]
    fn agrees_with_cpython_311() {
        let python = "/root/.pyenv/versions/3.11.7/bin/python3.11";
        if !std::path::Path::new(python).exists() {
            eprintln!("skipped: {python} not installed");
            return;
        }
        // One line per code object: first line, table in hex, line per unit.
        let dump = r##"
import sys, types, inspect
def walk(co):
    yield co
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            yield from walk(c)
sources = [(sys.argv[1].replace("#GAP", "\n" * 300), "<shapes>"), (open(inspect.__file__).read(), inspect.__file__)]
for src, name in sources:
    for co in walk(compile(src, name, "exec")):
        lines = ",".join("-" if p[0] is None else str(p[0]) for p in co.co_positions())
        print(co.co_firstlineno, co.co_linetable.hex() or "-", lines)
"##;
        let out = Command::new(python).args(["-c", dump, SHAPES]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let mut codes = 0;
        for row in text.lines() {
            let fields: Vec<&str> = row.split(' ').collect();
            let first_line: i32 = fields[0].parse().unwrap();
            let table = hex(fields[1]);
            for (unit, expected) in fields[2].split(',').enumerate() {
                let expected = expected.parse::<u32>().ok();
                assert_eq!(line_of(&table, first_line, unit as u64), expected, "unit {unit} of {row}");
            }
            codes += 1;
        }
        assert!(codes > 100, "only {codes} code objects");
    }

    fn hex(text: &str) -> Vec<u8> {
        if text == "-" {
            return Vec::new();
        }
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }
}
