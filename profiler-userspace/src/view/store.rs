//! The profiles on disk, read once into memory: per application, every
//! period's samples over tables of frames, stacks and label sets shared by
//! all its periods (a day of periods repeats the same stacks), so that any
//! range, filter and sample type is a scan of integers.

use std::{
    collections::HashMap,
    fs,
    hash::Hash,
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use prost::Message;

use crate::pprof::proto;

/// How a frame is colored: by the code it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Python,
    Native,
    Kernel,
    /// `[truncated]`, `[idle]` and such: no code of their own.
    Marker,
}

/// A function: a box of the flame graph and a row of the top table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Function {
    pub name: String,
    pub file: String,
    pub kind: Kind,
}

/// A line of a function: a row of the top table by line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Line {
    pub function: u32,
    pub line: i64,
}

/// One period's profile: one file.
pub struct Period {
    file: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Files of one application with labels of their own (a pod's) are
    /// series of their own; heap in use is a level per series.
    pub series: String,
    /// The column of each of the application's sample types in `values`.
    columns: Vec<Option<usize>>,
    pub samples: Vec<Sample>,
}

impl Period {
    /// The sample's value of the application's sample type `type_index`.
    pub fn value(&self, sample: &Sample, type_index: usize) -> i64 {
        self.columns
            .get(type_index)
            .copied()
            .flatten()
            .and_then(|column| sample.values.get(column))
            .copied()
            .unwrap_or(0)
    }
}

pub struct Sample {
    pub stack: u32,
    pub labels: u32,
    values: Box<[i64]>,
}

/// Values with ids: each stored once.
pub struct Interner<T> {
    pub items: Vec<T>,
    ids: HashMap<T, u32>,
}

impl<T: Clone + Eq + Hash> Interner<T> {
    fn id(&mut self, item: T) -> u32 {
        if let Some(&id) = self.ids.get(&item) {
            return id;
        }
        let id = self.items.len() as u32;
        self.items.push(item.clone());
        self.ids.insert(item, id);
        id
    }
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner { items: Vec::new(), ids: HashMap::new() }
    }
}

/// What is known of one application: all its periods on disk.
#[derive(Default)]
pub struct Application {
    pub sample_types: Vec<(String, String)>,
    pub functions: Interner<Function>,
    pub lines: Interner<Line>,
    /// Leaf first, as in pprof.
    pub stacks: Interner<Box<[u32]>>,
    pub label_sets: Interner<Box<[(String, String)]>>,
    /// Sorted by start.
    pub periods: Vec<Period>,
    /// By file name: its length and time of change, to see it change.
    files: HashMap<String, (u64, SystemTime)>,
    /// Files that are not profiles, with why, reported to the page.
    pub unreadable: Vec<String>,
    checked: Option<Instant>,
}

/// A file read and decoded, not yet merged into its application.
struct Decoded {
    name: String,
    stamp: (u64, SystemTime),
    profile: Result<proto::Profile>,
}

/// How long what was read of a directory is trusted before it is read
/// again: the agent writes a file per period, so a page that asks many
/// things at once needs one look.
const FRESH_FOR: Duration = Duration::from_secs(2);

impl Application {
    /// Reads the files of `dir` that are new or changed since the last call,
    /// and forgets those removed.
    pub fn refresh(&mut self, dir: &Path) -> Result<()> {
        if self.checked.is_some_and(|checked| checked.elapsed() < FRESH_FOR) {
            return Ok(());
        }
        let mut on_disk = HashMap::new();
        for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".pb.gz") {
                continue;
            }
            // A file removed since the listing is simply not there.
            if let Ok(metadata) = entry.metadata() {
                on_disk.insert(name, (metadata.len(), metadata.modified()?));
            }
        }
        // Files rewritten or removed (a retention job) take their period
        // with them; the tables keep what they interned, unused.
        self.files.retain(|name, stamp| on_disk.get(name) == Some(stamp));
        self.periods.retain(|period| self.files.contains_key(&period.file));
        let to_read: Vec<_> = on_disk.iter().filter(|(name, _)| !self.files.contains_key(*name)).collect();
        for decoded in read_in_parallel(dir, &to_read) {
            self.files.insert(decoded.name.clone(), decoded.stamp);
            match decoded.profile {
                Ok(profile) => self.add(&decoded.name, &profile),
                Err(error) => self.unreadable.push(format!("{}: {error:#}", decoded.name)),
            }
        }
        self.periods.sort_by_key(|period| (period.start_ms, period.series.clone()));
        self.checked = Some(Instant::now());
        Ok(())
    }

    /// The index of sample type `name`, such as `cpu`.
    pub fn sample_type(&self, name: &str) -> Option<usize> {
        self.sample_types.iter().position(|(kind, _)| kind == name)
    }

    fn add(&mut self, file_name: &str, profile: &proto::Profile) {
        let string = |id: i64| profile.string_table.get(id as usize).cloned().unwrap_or_default();
        let columns = profile
            .sample_type
            .iter()
            .map(|value_type| {
                let key = (string(value_type.r#type), string(value_type.unit));
                match self.sample_types.iter().position(|known| *known == key) {
                    Some(index) => index,
                    None => {
                        self.sample_types.push(key);
                        self.sample_types.len() - 1
                    }
                }
            })
            .collect::<Vec<_>>();
        let mut columns_by_type = vec![None; self.sample_types.len()];
        for (column, &type_index) in columns.iter().enumerate() {
            columns_by_type[type_index] = Some(column);
        }

        let functions: HashMap<u64, u32> = profile
            .function
            .iter()
            .map(|function| {
                let (name, file) = (string(function.name), string(function.filename));
                let kind = match () {
                    // The symbolizer's name for the kernel, and pprof's.
                    _ if file == "[kernel]" || file == "[kernel.kallsyms]" => Kind::Kernel,
                    _ if function.system_name != 0 => Kind::Native,
                    _ if file.is_empty() => Kind::Marker,
                    _ => Kind::Python,
                };
                (function.id, self.functions.id(Function { name, file, kind }))
            })
            .collect();
        // A location with inlined functions has several lines, innermost first.
        let locations: HashMap<u64, Vec<u32>> = profile
            .location
            .iter()
            .map(|location| {
                let lines = location
                    .line
                    .iter()
                    .filter_map(|line| {
                        let function = *functions.get(&line.function_id)?;
                        Some(self.lines.id(Line { function, line: line.line }))
                    })
                    .collect();
                (location.id, lines)
            })
            .collect();

        let samples = profile
            .sample
            .iter()
            .map(|sample| {
                let stack: Box<[u32]> =
                    sample.location_id.iter().flat_map(|id| locations.get(id).into_iter().flatten().copied()).collect();
                let mut labels: Vec<_> = sample
                    .label
                    .iter()
                    .filter(|label| label.str != 0)
                    .map(|label| (string(label.key), string(label.str)))
                    .collect();
                labels.sort();
                Sample {
                    stack: self.stacks.id(stack),
                    labels: self.label_sets.id(labels.into()),
                    values: sample.value.clone().into(),
                }
            })
            .collect();
        let start_ms = profile.time_nanos / 1_000_000;
        self.periods.push(Period {
            file: file_name.to_owned(),
            start_ms,
            end_ms: start_ms + profile.duration_nanos / 1_000_000,
            series: series_of(file_name).to_owned(),
            columns: columns_by_type,
            samples,
        });
    }
}

/// `20261122T051323Z-20261122T051409Z-8c0f3a2e.pb.gz` → `8c0f3a2e`; the
/// local directory's names (sinks::local).
fn series_of(file_name: &str) -> &str {
    let stem = file_name.trim_end_matches(".pb.gz");
    stem.splitn(3, '-').nth(2).unwrap_or("")
}

/// Reads and decodes `files` of `dir` on every core: a day of periods is
/// thousands of files.
fn read_in_parallel(dir: &Path, files: &[(&String, &(u64, SystemTime))]) -> Vec<Decoded> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len().max(1));
    let chunk = files.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|files| {
                scope.spawn(move || {
                    files
                        .iter()
                        .map(|(name, stamp)| Decoded {
                            name: (*name).clone(),
                            stamp: **stamp,
                            profile: decode(&dir.join(name)),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|handle| handle.join().expect("a decoding thread does not panic")).collect()
    })
}

/// A gzipped pprof file.
fn decode(path: &Path) -> Result<proto::Profile> {
    let compressed = fs::read(path)?;
    let mut bytes = Vec::with_capacity(compressed.len() * 4);
    flate2::read::GzDecoder::new(compressed.as_slice()).read_to_end(&mut bytes).context("not gzip")?;
    proto::Profile::decode(bytes.as_slice()).context("not a pprof profile")
}

/// A profiles directory: one subdirectory per application, read when asked.
pub struct Store {
    root: PathBuf,
    applications: Mutex<HashMap<String, Arc<Mutex<Application>>>>,
}

/// An application as listed: its name, files, and last change.
#[derive(serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub files: usize,
    pub last_change_ms: u128,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root, applications: Mutex::default() }
    }

    /// The applications: the subdirectories, but hidden ones (the spool).
    pub fn list(&self) -> Result<Vec<Listed>> {
        let root = &self.root;
        let mut found = Vec::new();
        let entries = fs::read_dir(root).with_context(|| {
            format!("cannot read the profiles directory {} (the agent's --output-dir)", root.display())
        })?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type()?.is_dir() {
                continue;
            }
            let mut listed = Listed { name, files: 0, last_change_ms: 0 };
            for file in fs::read_dir(entry.path())?.flatten() {
                if file.file_name().to_string_lossy().ends_with(".pb.gz") {
                    listed.files += 1;
                    let changed = file.metadata().and_then(|metadata| metadata.modified()).unwrap_or(UNIX_EPOCH);
                    let changed = changed.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
                    listed.last_change_ms = listed.last_change_ms.max(changed);
                }
            }
            found.push(listed);
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Application `name`, its files read up to now.
    pub fn application(&self, name: &str) -> Result<Arc<Mutex<Application>>> {
        // Only a directory of the listing: never a path out of the root.
        if !self.list()?.iter().any(|listed| listed.name == name) {
            bail!("no application `{name}` in {}", self.root.display());
        }
        let application =
            self.applications.lock().expect("no query panics").entry(name.to_owned()).or_default().clone();
        application.lock().expect("no query panics").refresh(&self.root.join(name))?;
        Ok(application)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_the_hash_of_the_local_directory_names() {
        assert_eq!(series_of("20261122T051323Z-20261122T051409Z.pb.gz"), "");
        assert_eq!(series_of("20261122T051323Z-20261122T051409Z-8c0f3a2e.pb.gz"), "8c0f3a2e");
    }
}
