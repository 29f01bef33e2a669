//! Protobuf's wire format, read in place: the viewer reads thousands of
//! pprof files at once, and decoding them into prost's messages (a `String`
//! per string, a `Vec` per sample and location, all freed right after) took
//! most of the time of opening a day of profiles (docs/benchmarks.md).

use anyhow::{bail, ensure, Context, Result};

/// A field's value.
#[derive(Clone, Copy)]
pub enum Value<'a> {
    Varint(u64),
    /// A string, a message, or packed repeated numbers.
    Bytes(&'a [u8]),
    /// A 32- or 64-bit number, which pprof does not use.
    Fixed,
}

impl<'a> Value<'a> {
    pub fn int(self) -> i64 {
        match self {
            Value::Varint(value) => value as i64,
            _ => 0,
        }
    }

    pub fn bytes(self) -> &'a [u8] {
        match self {
            Value::Bytes(bytes) => bytes,
            _ => &[],
        }
    }

    /// The numbers of a repeated integer field: packed (the usual way), or
    /// one per field.
    pub fn ints(self, mut each: impl FnMut(i64)) -> Result<()> {
        match self {
            Value::Varint(value) => each(value as i64),
            Value::Bytes(mut packed) => {
                while !packed.is_empty() {
                    each(varint(&mut packed)? as i64);
                }
            }
            Value::Fixed => bail!("a fixed-size number where integers were expected"),
        }
        Ok(())
    }
}

/// The fields of a message, in order: `(field number, value)`.
pub fn fields(mut message: &[u8]) -> impl Iterator<Item = Result<(u32, Value<'_>)>> {
    std::iter::from_fn(move || {
        if message.is_empty() {
            return None;
        }
        let field = field(&mut message);
        if field.is_err() {
            // Nothing after a malformed field can be trusted.
            message = &[];
        }
        Some(field)
    })
}

fn field<'a>(message: &mut &'a [u8]) -> Result<(u32, Value<'a>)> {
    let key = varint(message)?;
    let value = match key & 7 {
        0 => Value::Varint(varint(message)?),
        1 => skip(message, 8)?,
        2 => {
            let length = usize::try_from(varint(message)?)?;
            ensure!(length <= message.len(), "a field runs past the end of its message");
            let (bytes, rest) = message.split_at(length);
            *message = rest;
            Value::Bytes(bytes)
        }
        5 => skip(message, 4)?,
        wire_type => bail!("unknown wire type {wire_type}"),
    };
    Ok(((key >> 3) as u32, value))
}

fn skip<'a>(message: &mut &'a [u8], length: usize) -> Result<Value<'a>> {
    *message = message.get(length..).context("a number runs past the end of its message")?;
    Ok(Value::Fixed)
}

fn varint(bytes: &mut &[u8]) -> Result<u64> {
    let mut value = 0;
    for (index, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte < 0x80 {
            *bytes = &bytes[index + 1..];
            return Ok(value);
        }
    }
    bail!("a malformed varint")
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::export::pprof::proto;

    /// What prost writes, read back in place.
    #[test]
    fn reads_what_prost_writes() {
        let sample = proto::Sample { location_id: vec![1, 300, 70_000], value: vec![-1, 5], label: Vec::new() };
        let bytes = sample.encode_to_vec();
        let mut locations = Vec::new();
        let mut values = Vec::new();
        for field in fields(&bytes) {
            let (number, value) = field.unwrap();
            match number {
                1 => value.ints(|id| locations.push(id)).unwrap(),
                2 => value.ints(|v| values.push(v)).unwrap(),
                _ => panic!("unexpected field {number}"),
            }
        }
        assert_eq!(locations, [1, 300, 70_000]);
        assert_eq!(values, [-1, 5]);
    }

    #[test]
    fn unpacked_and_fixed_fields_and_malformed_input() {
        // Field 1 as one varint 7, field 3 fixed64, field 4 fixed32, field 2 "ab".
        let bytes = [0x08, 0x07, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0x25, 0, 0, 0, 0, 0x12, 0x02, b'a', b'b'];
        let read: Vec<_> = fields(&bytes).map(|field| field.unwrap()).collect();
        assert_eq!(read.len(), 4);
        assert_eq!((read[0].0, read[0].1.int()), (1, 7));
        assert_eq!((read[3].0, read[3].1.bytes()), (2, &b"ab"[..]));

        let truncated = [0x12, 0x05, b'a'];
        let read: Vec<_> = fields(&truncated).collect();
        assert_eq!(read.len(), 1);
        assert!(read[0].is_err(), "a string longer than its message is an error");
        assert!(fields(&[0x08, 0xff]).next().unwrap().is_err(), "an unfinished varint is an error");
    }
}
