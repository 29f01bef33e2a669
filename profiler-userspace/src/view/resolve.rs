//! One profile file read in place: a pprof `Profile` message's tables, each
//! entry once, as indexes into the file's string table. Reading threads make
//! these; the store (`store.rs`) takes them into an application's tables.

use std::hash::BuildHasher;

use anyhow::Result;

use super::{store::Kind, wire};
use crate::export::frame_kind;

/// A file's profile over tables of its own, each entry once, read in place
/// from its bytes: what a decoding thread hands over. Strings are indexes in
/// the file's string table; stacks are leaf first, of indexes in `lines`.
pub(super) struct Resolved {
    /// The file's string table, copied: the span of the file from its first
    /// string to its last (writers put them together, at the end).
    text: Vec<u8>,
    /// Where each string of the string table is in `text`.
    strings: Vec<(u32, u32)>,
    pub(super) start_ms: i64,
    pub(super) end_ms: i64,
    pub(super) sample_types: Vec<(u32, u32)>,
    /// `(name, file, kind)`.
    pub(super) functions: Vec<(u32, u32, Kind)>,
    /// `(index in functions, line)`.
    pub(super) lines: Vec<(u32, i64)>,
    pub(super) stacks: Slices,
    /// `(key, value)` pairs, in the file's order.
    pub(super) label_sets: Vec<Box<[(u32, u32)]>>,
    /// `(index in stacks, index in label_sets)`.
    pub(super) samples: Vec<(u32, u32)>,
    /// `sample_types.len()` per sample.
    pub(super) values: Vec<i64>,
}

/// The messages of a `Profile` that are tables, as they are in the file: the
/// tables may come in any order, so each is read once all are found.
#[derive(Default)]
struct Tables<'a> {
    sample_types: Vec<&'a [u8]>,
    samples: Vec<&'a [u8]>,
    locations: Vec<&'a [u8]>,
    functions: Vec<&'a [u8]>,
}

/// A string index as read from the file: out-of-range indexes read as ""
/// (index 0), as pprof's readers do.
#[derive(Clone, Copy)]
struct Strings {
    count: i64,
}

impl Strings {
    fn index(self, index: i64) -> u32 {
        if (0..self.count).contains(&index) {
            index as u32
        } else {
            0
        }
    }
}

/// Where each location's lines are in `Resolved::lines`: a location with
/// inlined functions has several lines, innermost first, `lines[start..end]`.
struct Locations {
    /// `(id, start, end)`, in the file's order.
    spans: Vec<(i64, u32, u32)>,
    /// Writers number locations 1, 2, 3...: then a location is found by its
    /// id, else through this map.
    by_id: Option<hashbrown::HashMap<i64, (u32, u32)>>,
}

impl Locations {
    fn new(spans: Vec<(i64, u32, u32)>) -> Locations {
        let dense = spans.iter().enumerate().all(|(index, &(id, _, _))| id == index as i64 + 1);
        let by_id = (!dense).then(|| spans.iter().map(|&(id, start, end)| (id, (start, end))).collect());
        Locations { spans, by_id }
    }

    fn span(&self, id: i64) -> Option<(u32, u32)> {
        match &self.by_id {
            None => self.spans.get(usize::try_from(id - 1).ok()?).map(|&(_, start, end)| (start, end)),
            Some(by_id) => by_id.get(&id).copied(),
        }
    }
}

impl Resolved {
    /// Reads a pprof `Profile` message (profile.proto's field numbers).
    pub(super) fn new(bytes: &[u8]) -> Result<Resolved> {
        let mut resolved = Resolved {
            text: Vec::new(),
            strings: Vec::new(),
            start_ms: 0,
            end_ms: 0,
            sample_types: Vec::new(),
            functions: Vec::new(),
            lines: Vec::new(),
            stacks: Slices::default(),
            label_sets: Vec::new(),
            samples: Vec::new(),
            values: Vec::new(),
        };
        let tables = resolved.read_profile(bytes)?;
        let strings = Strings { count: resolved.strings.len() as i64 };
        if resolved.strings.is_empty() {
            resolved.strings.push((0, 0));
        }
        resolved.read_sample_types(&tables.sample_types, strings)?;
        let function_index = resolved.read_functions(&tables.functions, bytes, strings)?;
        let locations = resolved.read_locations(&tables.locations, &function_index)?;
        resolved.read_samples(&tables.samples, &locations, strings)?;
        resolved.keep_strings_only(bytes);
        Ok(resolved)
    }

    /// The `Profile`'s own fields: its times, where its strings are, and
    /// where its tables are.
    fn read_profile<'a>(&mut self, bytes: &'a [u8]) -> Result<Tables<'a>> {
        let mut tables = Tables::default();
        let mut duration_nanos = 0;
        for field in wire::fields(bytes) {
            let (number, value) = field?;
            match number {
                1 => tables.sample_types.push(value.bytes()),
                2 => tables.samples.push(value.bytes()),
                4 => tables.locations.push(value.bytes()),
                5 => tables.functions.push(value.bytes()),
                6 => {
                    let string = value.bytes();
                    let start = string.as_ptr() as usize - bytes.as_ptr() as usize;
                    self.strings.push((start as u32, (start + string.len()) as u32));
                }
                9 => self.start_ms = value.int() / 1_000_000,
                10 => duration_nanos = value.int(),
                _ => {}
            }
        }
        self.end_ms = self.start_ms + duration_nanos / 1_000_000;
        Ok(tables)
    }

    fn read_sample_types(&mut self, messages: &[&[u8]], strings: Strings) -> Result<()> {
        for message in messages {
            let (mut kind, mut unit) = (0, 0);
            for field in wire::fields(message) {
                match field? {
                    (1, value) => kind = strings.index(value.int()),
                    (2, value) => unit = strings.index(value.int()),
                    _ => {}
                }
            }
            self.sample_types.push((kind, unit));
        }
        Ok(())
    }

    /// The functions, and the index in `functions` of each function id.
    fn read_functions(
        &mut self,
        messages: &[&[u8]],
        bytes: &[u8],
        strings: Strings,
    ) -> Result<hashbrown::HashMap<i64, u32>> {
        let mut function_index = hashbrown::HashMap::with_capacity(messages.len());
        for message in messages {
            let (mut id, mut name, mut system_name, mut file) = (0, 0, 0, 0);
            for field in wire::fields(message) {
                match field? {
                    (1, value) => id = value.int(),
                    (2, value) => name = strings.index(value.int()),
                    (3, value) => system_name = strings.index(value.int()),
                    (4, value) => file = strings.index(value.int()),
                    _ => {}
                }
            }
            // As the agent's pprof writer put it (`export::frame_kind`).
            let function = frame_kind::Function {
                name: self.text(name, bytes),
                system_name: self.text(system_name, bytes),
                filename: self.text(file, bytes),
            };
            let kind = Kind::from(frame_kind::decode(&function));
            function_index.insert(id, self.functions.len() as u32);
            self.functions.push((name, file, kind));
        }
        Ok(function_index)
    }

    /// The locations' lines, into `lines`.
    fn read_locations(
        &mut self,
        messages: &[&[u8]],
        function_index: &hashbrown::HashMap<i64, u32>,
    ) -> Result<Locations> {
        let mut spans = Vec::with_capacity(messages.len());
        for message in messages {
            let (mut id, start) = (0, self.lines.len() as u32);
            for field in wire::fields(message) {
                match field? {
                    (1, value) => id = value.int(),
                    (4, line) => {
                        let (mut function_id, mut number) = (0, 0);
                        for field in wire::fields(line.bytes()) {
                            match field? {
                                (1, value) => function_id = value.int(),
                                (2, value) => number = value.int(),
                                _ => {}
                            }
                        }
                        if let Some(&function) = function_index.get(&function_id) {
                            self.lines.push((function, number));
                        }
                    }
                    _ => {}
                }
            }
            spans.push((id, start, self.lines.len() as u32));
        }
        Ok(Locations::new(spans))
    }

    /// The samples: their stacks, label sets and values.
    fn read_samples(&mut self, messages: &[&[u8]], locations: &Locations, strings: Strings) -> Result<()> {
        // Samples of one thread have the same labels: the same label
        // messages, byte for byte, which are read once.
        let mut label_sets_seen: hashbrown::HashMap<Vec<&[u8]>, u32> = hashbrown::HashMap::new();
        let (mut stack, mut label_messages, mut values) = (Vec::new(), Vec::new(), Vec::new());
        let types = self.sample_types.len();
        self.samples.reserve(messages.len());
        self.values.reserve(messages.len() * types);
        for message in messages {
            stack.clear();
            label_messages.clear();
            values.clear();
            for field in wire::fields(message) {
                match field? {
                    (1, value) => value.ints(|id| match locations.span(id) {
                        Some((start, end)) if end == start + 1 => stack.push(start),
                        Some((start, end)) => stack.extend(start..end),
                        None => {}
                    })?,
                    (2, value) => value.ints(|v| values.push(v))?,
                    (3, label) => label_messages.push(label.bytes()),
                    _ => {}
                }
            }
            let stack = self.stacks.id(&stack);
            let label_set = match label_sets_seen.get(&label_messages) {
                Some(&set) => set,
                None => {
                    self.label_sets.push(read_labels(&label_messages, strings)?);
                    let set = self.label_sets.len() as u32 - 1;
                    label_sets_seen.insert(label_messages.clone(), set);
                    set
                }
            };
            self.samples.push((stack, label_set));
            // A value per type; a short sample counts as zeros.
            self.values.extend((0..types).map(|i| values.get(i).copied().unwrap_or(0)));
        }
        Ok(())
    }

    /// Keeps the strings, and nothing else of the file, for the merging
    /// thread.
    fn keep_strings_only(&mut self, bytes: &[u8]) {
        let first = self.strings.iter().map(|&(start, _)| start).min().unwrap_or(0);
        let last = self.strings.iter().map(|&(_, end)| end).max().unwrap_or(0);
        self.text = bytes[first as usize..last as usize].to_vec();
        for (start, end) in &mut self.strings {
            (*start, *end) = (*start - first, *end - first);
        }
    }

    /// String `index` of the file's string table, once read.
    pub(super) fn string(&self, index: u32) -> &str {
        self.text(index, &self.text)
    }

    /// String `index` of the file's string table, in `bytes`.
    fn text<'a>(&self, index: u32, bytes: &'a [u8]) -> &'a str {
        let (start, end) = self.strings.get(index as usize).copied().unwrap_or((0, 0));
        std::str::from_utf8(&bytes[start as usize..end as usize]).unwrap_or("\u{fffd}")
    }
}

/// The string labels of a sample, `(key, value)`.
fn read_labels(messages: &[&[u8]], strings: Strings) -> Result<Box<[(u32, u32)]>> {
    let mut labels = Vec::with_capacity(messages.len());
    for label in messages {
        let (mut key, mut text) = (0, 0);
        for field in wire::fields(label) {
            match field? {
                (1, value) => key = strings.index(value.int()),
                (2, value) => text = strings.index(value.int()),
                _ => {}
            }
        }
        // Numeric labels have no string: not filterable here.
        if text != 0 {
            labels.push((key, text));
        }
    }
    Ok(labels.into_boxed_slice())
}

/// Slices of integers stored end to end, each once, with ids: a file's
/// stacks, without an allocation each.
#[derive(Default)]
pub(super) struct Slices {
    items: Vec<u32>,
    /// Where each slice ends in `items`; it starts where the one before ends.
    ends: Vec<u32>,
    ids: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl Slices {
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(super) fn get(&self, id: usize) -> &[u32] {
        slice(&self.items, &self.ends, id)
    }

    fn id(&mut self, slice_to_find: &[u32]) -> u32 {
        let hash = self.hasher.hash_one(slice_to_find);
        if let Some(&id) = self.ids.find(hash, |&id| self.get(id as usize) == slice_to_find) {
            return id;
        }
        let id = self.ends.len() as u32;
        self.items.extend_from_slice(slice_to_find);
        self.ends.push(self.items.len() as u32);
        let Slices { items, ends, ids, hasher } = self;
        ids.insert_unique(hash, id, |&id| hasher.hash_one(slice(items, ends, id as usize)));
        id
    }
}

fn slice<'a>(items: &'a [u32], ends: &[u32], id: usize) -> &'a [u32] {
    let start = if id == 0 { 0 } else { ends[id - 1] as usize };
    &items[start..ends[id] as usize]
}
