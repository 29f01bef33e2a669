//! The profiles on disk, read once into memory: per application, every
//! period's samples over tables of frames, stacks and label sets shared by
//! all its periods (a day of periods repeats the same stacks), so that any
//! range, filter and sample type is a scan of integers. Files are read and
//! decoded on every core (`resolve.rs` reads one), then taken in here.

use std::{
    collections::HashMap,
    fs,
    hash::Hash,
    io::Read,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};

use super::resolve::Resolved;
use crate::stack::FrameKind;

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

impl From<FrameKind> for Kind {
    fn from(kind: FrameKind) -> Kind {
        match kind {
            FrameKind::Python => Kind::Python,
            FrameKind::Native => Kind::Native,
            FrameKind::Kernel => Kind::Kernel,
            FrameKind::Marker => Kind::Marker,
        }
    }
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
    /// The column of each of the application's sample types in a sample's
    /// values.
    columns: Vec<Option<usize>>,
    pub samples: Vec<Sample>,
    /// The samples' values, `columns.len()` per sample, in one allocation.
    values: Vec<i64>,
    stride: usize,
}

impl Period {
    /// Sample `index`'s value of the application's sample type `type_index`.
    pub fn value(&self, index: usize, type_index: usize) -> i64 {
        match self.columns.get(type_index).copied().flatten() {
            Some(column) => self.values[index * self.stride + column],
            None => 0,
        }
    }
}

pub struct Sample {
    pub stack: u32,
    pub labels: u32,
}

/// Values with ids: each stored once, looked up by a borrowed form of
/// themselves (`[u32]` for `Box<[u32]>`), which is copied only when new.
pub struct Interner<T> {
    pub items: Vec<T>,
    ids: hashbrown::HashMap<T, u32>,
}

impl<T: Clone + Eq + Hash> Interner<T> {
    fn id<Q: ?Sized + Hash + hashbrown::Equivalent<T>>(&mut self, item: &Q, to_owned: impl FnOnce(&Q) -> T) -> u32 {
        if let Some(&id) = self.ids.get(item) {
            return id;
        }
        let (id, item) = (self.items.len() as u32, to_owned(item));
        self.items.push(item.clone());
        self.ids.insert(item, id);
        id
    }
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner { items: Vec::new(), ids: hashbrown::HashMap::new() }
    }
}

/// A [`Function`] borrowed from a file's bytes; hashes as the function does
/// (same fields, same order).
#[derive(Hash)]
struct FunctionRef<'a> {
    name: &'a str,
    file: &'a str,
    kind: Kind,
}

impl hashbrown::Equivalent<Function> for FunctionRef<'_> {
    fn equivalent(&self, function: &Function) -> bool {
        self.name == function.name && self.file == function.file && self.kind == function.kind
    }
}

/// A label set borrowed from a file's bytes; hashes as the owned set does
/// (a slice: its length, then each pair).
#[derive(Hash)]
struct LabelsRef<'a, 'b>(&'b [(&'a str, &'a str)]);

impl hashbrown::Equivalent<Box<[(String, String)]>> for LabelsRef<'_, '_> {
    fn equivalent(&self, labels: &Box<[(String, String)]>) -> bool {
        self.0.len() == labels.len() && self.0.iter().zip(labels.iter()).all(|(a, b)| a.0 == b.0 && a.1 == b.1)
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
    unreadable: HashMap<String, String>,
    checked: Option<Instant>,
    /// `(read, to read)` while files are being read.
    reading: Option<(usize, usize)>,
}

/// How long what was read of a directory is trusted before it is read
/// again: the agent writes a file per period, so a page that asks many
/// things at once needs one look.
const FRESH_FOR: Duration = Duration::from_secs(2);

impl Application {
    /// Forgets the files removed or changed since the last look, and returns
    /// those to read, newest first (names sort by time); none while files are
    /// being read, or if the last look was less than `FRESH_FOR` ago.
    fn files_to_read(&mut self, dir: &Path) -> Result<Vec<(String, (u64, SystemTime))>> {
        if self.reading().is_some() || self.checked.is_some_and(|checked| checked.elapsed() < FRESH_FOR) {
            return Ok(Vec::new());
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
        self.unreadable.retain(|name, _| self.files.contains_key(name));
        let mut to_read: Vec<_> = on_disk.into_iter().filter(|(name, _)| !self.files.contains_key(name)).collect();
        to_read.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        self.checked = Some(Instant::now());
        Ok(to_read)
    }

    /// Takes file `name` of `dir`, read by a reading thread.
    fn take(&mut self, dir: &Path, name: &str, stamp: (u64, SystemTime), resolved: Result<Resolved>) {
        self.files.insert(name.to_owned(), stamp);
        match resolved {
            Ok(resolved) => self.add(name, resolved),
            Err(error) => {
                log::warn!("{}: not read: {error:#}", dir.join(name).display());
                self.unreadable.insert(name.to_owned(), format!("{error:#}"));
            }
        }
        if let Some((done, _)) = &mut self.reading {
            *done += 1;
        }
    }

    /// Files read and to read, while some are still to be read.
    pub fn reading(&self) -> Option<(usize, usize)> {
        self.reading.filter(|(done, total)| done < total)
    }

    /// The index of sample type `name`, such as `cpu`.
    pub fn sample_type(&self, name: &str) -> Option<usize> {
        self.sample_types.iter().position(|(kind, _)| kind == name)
    }

    /// Files that could not be read, with why.
    pub fn unreadable(&self) -> Vec<String> {
        let mut unreadable: Vec<_> = self.unreadable.iter().map(|(name, why)| format!("{name}: {why}")).collect();
        unreadable.sort();
        unreadable
    }

    /// Takes a file's profile into the application's tables: only its
    /// distinct functions, lines, stacks and label sets are looked up, and
    /// only those new to the application are copied.
    pub(super) fn add(&mut self, file_name: &str, resolved: Resolved) {
        let (columns, stride) = self.columns(&resolved);
        let stacks = self.intern_stacks(&resolved);
        let label_sets = self.intern_label_sets(&resolved);
        // Kept in order of start, as files come in any order.
        let series = series_of(file_name);
        let at = self
            .periods
            .partition_point(|period| (period.start_ms, period.series.as_str()) <= (resolved.start_ms, series));
        self.periods.insert(
            at,
            Period {
                file: file_name.to_owned(),
                start_ms: resolved.start_ms,
                end_ms: resolved.end_ms,
                series: series.to_owned(),
                columns,
                samples: resolved
                    .samples
                    .iter()
                    .map(|&(stack, labels)| Sample {
                        stack: stacks[stack as usize],
                        labels: label_sets[labels as usize],
                    })
                    .collect(),
                stride,
                values: resolved.values,
            },
        );
    }

    /// The column of each of the application's sample types in the file's
    /// values (types new to the application are added), and how many
    /// columns the file has.
    fn columns(&mut self, resolved: &Resolved) -> (Vec<Option<usize>>, usize) {
        let columns_of_file: Vec<usize> = resolved
            .sample_types
            .iter()
            .map(|&(kind, unit)| {
                let key = (resolved.string(kind), resolved.string(unit));
                match self.sample_types.iter().position(|(k, u)| (k.as_str(), u.as_str()) == key) {
                    Some(index) => index,
                    None => {
                        self.sample_types.push((key.0.to_owned(), key.1.to_owned()));
                        self.sample_types.len() - 1
                    }
                }
            })
            .collect();
        let mut columns = vec![None; self.sample_types.len()];
        for (column, &type_index) in columns_of_file.iter().enumerate() {
            columns[type_index] = Some(column);
        }
        (columns, columns_of_file.len())
    }

    /// The application's id of each of the file's stacks, through its
    /// functions and lines.
    fn intern_stacks(&mut self, resolved: &Resolved) -> Vec<u32> {
        let functions: Vec<u32> = resolved
            .functions
            .iter()
            .map(|&(name, file, kind)| {
                let function = FunctionRef { name: resolved.string(name), file: resolved.string(file), kind };
                self.functions.id(&function, |function| Function {
                    name: function.name.to_owned(),
                    file: function.file.to_owned(),
                    kind,
                })
            })
            .collect();
        let lines: Vec<u32> = resolved
            .lines
            .iter()
            .map(|&(function, line)| {
                self.lines.id(&Line { function: functions[function as usize], line }, |line| *line)
            })
            .collect();
        let mut global = Vec::new();
        (0..resolved.stacks.len())
            .map(|stack| {
                global.clear();
                global.extend(resolved.stacks.get(stack).iter().map(|&line| lines[line as usize]));
                self.stacks.id(global.as_slice(), |stack| stack.into())
            })
            .collect()
    }

    /// The application's id of each of the file's label sets.
    fn intern_label_sets(&mut self, resolved: &Resolved) -> Vec<u32> {
        let mut pairs = Vec::new();
        resolved
            .label_sets
            .iter()
            .map(|labels| {
                pairs.clear();
                pairs.extend(labels.iter().map(|&(key, value)| (resolved.string(key), resolved.string(value))));
                // One order, so that a set is one set whoever wrote it.
                pairs.sort_unstable();
                self.label_sets.id(&LabelsRef(&pairs), |labels| {
                    labels.0.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
                })
            })
            .collect()
    }
}

/// `20261122T051323Z-20261122T051409Z-8c0f3a2e.pb.gz` → `8c0f3a2e`; the
/// local directory's names (sinks::local).
fn series_of(file_name: &str) -> &str {
    let stem = file_name.trim_end_matches(".pb.gz");
    stem.splitn(3, '-').nth(2).unwrap_or("")
}

/// Reads, decodes and resolves `files` of `dir` on every core (a day of
/// periods is thousands of files), handing each to `take` on this thread as
/// it comes: a file's decoded form is large, its resolved form small.
fn read_in_parallel(
    dir: &Path,
    files: &[(String, (u64, SystemTime))],
    mut take: impl FnMut(&str, (u64, SystemTime), Result<Resolved>),
) {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len());
    let next = AtomicUsize::new(0);
    let (sender, receiver) = mpsc::sync_channel(64);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (sender, next) = (sender.clone(), &next);
            // One buffer per thread for the files' bytes, which stay here.
            let mut bytes = Vec::new();
            scope.spawn(move || loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, _)) = files.get(index) else { break };
                let resolved = gunzip(&dir.join(name), &mut bytes).and_then(|()| Resolved::new(&bytes));
                if sender.send((index, resolved)).is_err() {
                    break;
                }
            });
        }
        drop(sender);
        for (index, resolved) in receiver {
            let (name, stamp) = &files[index];
            take(name, *stamp, resolved);
        }
    });
}

/// The bytes of a gzipped file, into `bytes`.
fn gunzip(path: &Path, bytes: &mut Vec<u8>) -> Result<()> {
    let compressed = fs::read(path)?;
    bytes.clear();
    flate2::read::GzDecoder::new(compressed.as_slice()).read_to_end(bytes).context("not gzip")?;
    Ok(())
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
        let listed = !name.is_empty() && !name.starts_with('.') && !name.contains('/');
        if !listed || !self.root.join(name).is_dir() {
            bail!("no application `{name}` in {}", self.root.display());
        }
        let application =
            self.applications.lock().expect("no query panics").entry(name.to_owned()).or_default().clone();
        let dir = self.root.join(name);
        let to_read = application.lock().expect("no query panics").files_to_read(&dir)?;
        if !to_read.is_empty() {
            application.lock().expect("no query panics").reading = Some((0, to_read.len()));
            let reader = application.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                read_in_parallel(&dir, &to_read, |name, stamp, resolved| {
                    reader.lock().expect("no query panics").take(&dir, name, stamp, resolved)
                });
                let mut app = reader.lock().expect("no query panics");
                // Unless a newer reading has begun.
                if app.reading().is_none() {
                    app.reading = None;
                }
                drop(app);
                if to_read.len() > 1 {
                    log::info!(
                        "read {} files of {} in {} ms",
                        to_read.len(),
                        dir.display(),
                        started.elapsed().as_millis()
                    );
                }
            });
        }
        // Answer once the newest files (an hour of periods) are in: the page
        // shows the rest as it comes.
        loop {
            match application.lock().expect("no query panics").reading {
                Some((done, total)) if done < total.min(FIRST_ANSWER_FILES) => {}
                _ => break,
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(application)
    }
}

/// How many of the newest files are read before the first answer: an hour
/// of periods at the default period.
const FIRST_ANSWER_FILES: usize = 80;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_profiles_are_reported_and_the_others_read() {
        use std::io::Write;

        use prost::Message;

        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("app");
        fs::create_dir(&dir).unwrap();
        let profile = crate::export::pprof::proto::Profile {
            string_table: vec![String::new()],
            time_nanos: 5_000_000,
            ..Default::default()
        };
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&profile.encode_to_vec()).unwrap();
        fs::write(dir.join("a.pb.gz"), gzip.finish().unwrap()).unwrap();
        fs::write(dir.join("b.pb.gz"), b"not gzip").unwrap();
        fs::write(dir.join(".c.pb.gz.tmp"), b"being written").unwrap();

        let store = Store::new(root.path().to_owned());
        // Looks again, and waits for the reading thread to be done.
        let look = || {
            let app = store.application("app").unwrap();
            while app.lock().unwrap().reading().is_some() {
                std::thread::sleep(Duration::from_millis(5));
            }
            app.lock().unwrap().checked = None;
            app
        };
        let app = look();
        assert_eq!(app.lock().unwrap().periods.len(), 1);
        assert_eq!(app.lock().unwrap().periods[0].start_ms, 5);
        let unreadable = app.lock().unwrap().unreadable();
        assert!(unreadable.len() == 1 && unreadable[0].starts_with("b.pb.gz: not gzip"), "{unreadable:?}");

        // Removed, a file is forgotten.
        fs::remove_file(dir.join("b.pb.gz")).unwrap();
        assert!(look().lock().unwrap().unreadable().is_empty());
        fs::remove_file(dir.join("a.pb.gz")).unwrap();
        assert!(look().lock().unwrap().periods.is_empty());
        assert!(store.application("../app").is_err(), "a path out of the root is no application");
    }

    /// A frame of each kind, written by the agent's pprof writer, is read
    /// back as that kind, with its name and file.
    #[test]
    fn frames_are_read_as_the_kind_they_were_written() {
        use crate::aggregate::{Measurement, PeriodProfile};
        use crate::stack::Thread;

        let frames = crate::export::frame_kind::tests::frames();
        let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut profile = PeriodProfile::new("web".to_owned(), Default::default(), start, 10_000_000);
        profile.end = start + Duration::from_secs(10);
        let thread = Thread {
            pid: 42,
            container_pid: None,
            container_id: None,
            tid: 42,
            thread_name: "python3".into(),
            process_name: "python3".into(),
            context: None,
        };
        let stack: Vec<_> = frames.iter().map(|(frame, _)| frame.clone()).collect();
        profile.add(&stack, &thread, Measurement::Cpu);
        let pprof = crate::export::pprof::encode(&profile);

        let mut app = Application::default();
        app.add("a.pb.gz", Resolved::new(&pprof).unwrap());
        let [period] = &app.periods[..] else { panic!("one period") };
        let [sample] = &period.samples[..] else { panic!("one sample") };
        let read: Vec<_> = app.stacks.items[sample.stack as usize]
            .iter()
            .map(|&line| {
                let Line { function, line } = app.lines.items[line as usize];
                let Function { name, file, kind } = &app.functions.items[function as usize];
                (name.as_str(), file.as_str(), *kind, line)
            })
            .collect();
        let written: Vec<_> = frames
            .iter()
            .map(|(frame, file)| (&*frame.function, *file, Kind::from(frame.kind), i64::from(frame.line)))
            .collect();
        assert_eq!(read, written);
    }

    #[test]
    fn series_are_the_hash_of_the_local_directory_names() {
        assert_eq!(series_of("20261122T051323Z-20261122T051409Z.pb.gz"), "");
        assert_eq!(series_of("20261122T051323Z-20261122T051409Z-8c0f3a2e.pb.gz"), "8c0f3a2e");
    }
}
