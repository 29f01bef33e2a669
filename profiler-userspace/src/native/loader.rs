//! Loads unwind tables into the kernel's maps, on a thread of its own so
//! that parsing a large library never holds up the agent's loop.
//!
//! A table is made once per file (by build ID, else device and inode) and
//! shared by every process that maps it; it takes whole chunks of
//! `UNWIND_ROWS`, allocated first-fit and freed when its last process is
//! gone. A process's mappings are read again when the kernel's walk meets
//! an address outside them (`Request::Mapped`): that is how libraries it
//! loads later (`import zlib` maps an extension module) get their tables.
//! Nothing is polled, so processes that sleep cost nothing.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use object::{elf, read::elf::ProgramHeader, Object, ObjectKind};
use profiler_common::{
    unwind::CFA_NONE, ProcessUnwind, UnwindChunk, UnwindMapping, UnwindRow, MAX_UNWIND_MAPPINGS, UNWIND_CHUNKS,
    UNWIND_CHUNK_ROWS,
};

/// The name `/proc/PID/maps` gives the kernel's vDSO.
const VDSO: &str = "[vdso]";

/// Files whose identity is remembered; past it, the memory starts over.
const MAX_IDENTITIES: usize = 16384;

/// How long a process that is not urgent must live to get tables.
const SETTLE: Duration = Duration::from_secs(1);

/// The least time between two readings of a process's mappings on the
/// kernel's word that it runs code outside them.
const REREAD: Duration = Duration::from_millis(200);

/// How often processes waiting to have lived [`SETTLE`] are looked at.
const SETTLE_CHECK: Duration = Duration::from_millis(250);

/// What the loader reports, for the metrics and the summary.
#[derive(Debug, Default)]
pub struct UnwindStats {
    /// Tables in the kernel, and the rows they hold.
    pub tables: AtomicU64,
    pub rows: AtomicU64,
    /// The most rows the kernel held at once.
    pub peak_rows: AtomicU64,
    /// Tables that did not fit in `UNWIND_ROWS`.
    pub tables_refused: AtomicU64,
}

enum Request {
    /// A process was seen (or exec'd): load tables for its executable files,
    /// at once if `urgent`, else once it has lived [`SETTLE`].
    Process {
        pid: u32,
        urgent: bool,
    },
    Exited(u32),
    /// The process ran code outside the mappings it was loaded with.
    Mapped(u32),
}

/// The agent's handle on the loader thread.
pub struct Loader {
    requests: mpsc::Sender<Request>,
    pub stats: Arc<UnwindStats>,
}

impl Loader {
    pub fn start(rows: Array<MapData, UnwindChunk>, processes: BpfHashMap<MapData, u32, ProcessUnwind>) -> Loader {
        let (requests, receiver) = mpsc::channel();
        let stats = Arc::new(UnwindStats::default());
        let mut state = State {
            rows,
            processes,
            tables: HashMap::new(),
            identities: HashMap::new(),
            no_table: HashSet::new(),
            loaded: HashMap::new(),
            settling: HashMap::new(),
            reread: HashMap::new(),
            generation: 0,
            urgent: HashSet::new(),
            free: BTreeMap::from([(0, UNWIND_CHUNKS)]),
            stats: stats.clone(),
            full_reported: false,
        };
        std::thread::Builder::new()
            .name("unwind-tables".into())
            .spawn(move || state.run(receiver))
            .expect("spawning the unwind table thread");
        Loader { requests, stats }
    }

    /// `urgent` for the processes users profile on purpose (CPython, `--pid`);
    /// the others wait a second, so that the many short-lived ones (a
    /// compiler's) never cost a table.
    pub fn process(&self, pid: u32, urgent: bool) {
        let _ = self.requests.send(Request::Process { pid, urgent });
    }

    pub fn exited(&self, pid: u32) {
        let _ = self.requests.send(Request::Exited(pid));
    }

    /// The kernel met an address of `pid` outside its known mappings: a
    /// library loaded since, most often.
    pub fn mapped(&self, pid: u32) {
        let _ = self.requests.send(Request::Mapped(pid));
    }
}

/// A file's identity: its build ID, else where it lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FileKey {
    BuildId(Vec<u8>),
    Inode { device: String, inode: u64 },
}

struct Table {
    first_chunk: u32,
    chunks: u32,
    rows: u32,
    users: u32,
}

/// An executable mapping of a file, from `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileMapping {
    start: u64,
    end: u64,
    offset: u64,
    device: String,
    inode: u64,
    path: String,
}

struct State {
    rows: Array<MapData, UnwindChunk>,
    processes: BpfHashMap<MapData, u32, ProcessUnwind>,
    tables: HashMap<FileKey, Table>,
    /// What each file is, by device, inode and path, so that a file is read
    /// once, not once per process that maps it.
    identities: HashMap<(String, u64, String), Option<Identity>>,
    /// Files without CFI (or that could not be read), not tried again.
    no_table: HashSet<FileKey>,
    /// Per process: its mappings when last loaded, and the tables it uses.
    loaded: HashMap<u32, (Vec<FileMapping>, Vec<FileKey>)>,
    /// Processes loaded at once (CPython, `--pid`), whose tables may take the
    /// space kept for them (`store`).
    urgent: HashSet<u32>,
    /// Of the last `ProcessUnwind` written.
    generation: u32,
    /// When each process's mappings were last read for a `Request::Mapped`.
    reread: HashMap<u32, Instant>,
    /// Processes waiting to have lived [`SETTLE`], since when.
    settling: HashMap<u32, Instant>,
    /// Free chunk ranges: start → length.
    free: BTreeMap<u32, u32>,
    stats: Arc<UnwindStats>,
    full_reported: bool,
}

impl State {
    fn run(&mut self, requests: mpsc::Receiver<Request>) {
        loop {
            let first = match requests.recv_timeout(SETTLE_CHECK) {
                Ok(request) => Some(request),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // All that waits, so that exits free tables and urgent processes
            // are loaded before the rest.
            let mut loads = Vec::new();
            for request in first.into_iter().chain(std::iter::from_fn(|| requests.try_recv().ok())) {
                match request {
                    Request::Process { pid, urgent: true } => {
                        self.settling.remove(&pid);
                        self.urgent.insert(pid);
                        loads.push((pid, true));
                    }
                    Request::Process { pid, urgent: false } => {
                        self.settling.insert(pid, Instant::now());
                    }
                    Request::Mapped(pid) if self.loaded.contains_key(&pid) => {
                        // Every sample in a new library asks: read at most
                        // once per `REREAD`.
                        let due = self.reread.get(&pid).is_none_or(|read| read.elapsed() >= REREAD);
                        if due && !loads.iter().any(|&(loading, _)| loading == pid) {
                            self.reread.insert(pid, Instant::now());
                            loads.push((pid, false));
                        }
                    }
                    Request::Mapped(_) => {}
                    Request::Exited(pid) => {
                        self.settling.remove(&pid);
                        self.urgent.remove(&pid);
                        self.reread.remove(&pid);
                        loads.retain(|&(loading, _)| loading != pid);
                        self.forget(pid)
                    }
                }
            }
            for (pid, force) in loads {
                self.load(pid, force);
            }
            let settled: Vec<u32> =
                self.settling.iter().filter(|(_, seen)| seen.elapsed() >= SETTLE).map(|(pid, _)| *pid).collect();
            for pid in settled {
                self.settling.remove(&pid);
                self.load(pid, true);
            }
        }
    }

    /// Loads the tables of `pid`'s files, unless its mappings are the same
    /// as last time (`force`: after an exec, they are new whatever they are).
    fn load(&mut self, pid: u32, force: bool) {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            self.forget(pid);
            return;
        };
        let mappings = file_mappings(&maps);
        if !force && self.loaded.get(&pid).is_some_and(|(known, _)| *known == mappings) {
            return;
        }
        self.generation = self.generation.wrapping_add(1);
        let mut value = ProcessUnwind {
            len: 0,
            generation: self.generation,
            mappings: [UnwindMapping::default(); MAX_UNWIND_MAPPINGS],
        };
        let mut keys = Vec::new();
        let mut files: HashMap<(String, u64), Option<Identity>> = HashMap::new();
        for mapping in mappings.iter().take(MAX_UNWIND_MAPPINGS) {
            let file =
                files.entry((mapping.device.clone(), mapping.inode)).or_insert_with(|| self.file(pid, mapping)).clone();
            // A mapping without a table is listed all the same, with no rows:
            // the kernel then knows its addresses and does not report them
            // as unmapped (`kind::UNMAPPED`) at every sample.
            let (start, end) = (mapping.start, mapping.end);
            let mut entry = UnwindMapping { start, end, ..UnwindMapping::default() };
            if let Some((key, segments)) = file {
                // The segment this mapping starts in gives the load bias.
                let segment =
                    segments.iter().find(|(_, offset, size)| (*offset..offset + size).contains(&mapping.offset));
                if let (Some(table), Some(&(vaddr, offset, _))) = (self.tables.get(&key), segment) {
                    entry.bias = mapping.start.wrapping_sub(vaddr + (mapping.offset - offset));
                    entry.first_row = table.first_chunk * UNWIND_CHUNK_ROWS as u32;
                    entry.rows = table.rows;
                    keys.push(key);
                }
            }
            value.mappings[value.len as usize] = entry;
            value.len += 1;
        }
        // Take the new tables before releasing the old: shared ones stay.
        for key in &keys {
            if let Some(table) = self.tables.get_mut(key) {
                table.users += 1;
            }
        }
        self.forget(pid);
        let inserted = !keys.is_empty()
            && self
                .processes
                .insert(pid, value, 0)
                .inspect_err(|error| log::debug!("pid {pid}: unwind mappings not loaded: {error}"))
                .is_ok();
        log::debug!("pid {pid}: {} of {} executable mappings have tables", keys.len(), mappings.len());
        if inserted {
            self.loaded.insert(pid, (mappings, keys));
        } else {
            self.loaded.insert(pid, (mappings, Vec::new()));
            for key in &keys {
                self.release(key);
            }
        }
    }

    /// The key and loadable segments of the file of `mapping`, its table
    /// loaded if it has one; `None` when it has none. A file is read (mapped)
    /// only the first time it is seen and when its table must be made.
    fn file(&mut self, pid: u32, mapping: &FileMapping) -> Option<Identity> {
        let place = (mapping.device.clone(), mapping.inode, mapping.path.clone());
        let identity = match self.identities.get(&place) {
            Some(identity) => identity.clone(),
            None => {
                let identity = read_file(pid, mapping).and_then(|bytes| identify(&bytes, mapping));
                if self.identities.len() >= MAX_IDENTITIES {
                    self.identities.clear();
                }
                self.identities.insert(place, identity.clone());
                identity
            }
        };
        let (key, segments) = identity?;
        if self.no_table.contains(&key) {
            return None;
        }
        if !self.tables.contains_key(&key) {
            let rows = match read_file(pid, mapping).map(|bytes| super::table(&bytes)) {
                Some(Ok(rows)) if !rows.is_empty() => rows,
                Some(Ok(_)) => {
                    self.no_table.insert(key);
                    return None;
                }
                Some(Err(error)) => {
                    log::debug!("{}: no unwind table: {error:#}", mapping.path);
                    self.no_table.insert(key);
                    return None;
                }
                None => return None,
            };
            log::debug!("{}: an unwind table of {} rows", mapping.path, rows.len());
            let table = self.store(&rows, self.urgent.contains(&pid))?;
            self.tables.insert(key.clone(), table);
        }
        Some((key, segments))
    }

    /// Writes `rows` into free chunks of `UNWIND_ROWS`. Half of them are
    /// kept for the tables of urgent processes (the ones users profile on
    /// purpose), whatever else runs on the host.
    fn store(&mut self, rows: &[UnwindRow], urgent: bool) -> Option<Table> {
        let chunks = rows.len().div_ceil(UNWIND_CHUNK_ROWS) as u32;
        let free: u32 = self.free.values().sum();
        if !urgent && free < chunks + UNWIND_CHUNKS / 2 {
            self.stats.tables_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Some((&start, &len)) = self.free.iter().find(|(_, len)| **len >= chunks) else {
            self.stats.tables_refused.fetch_add(1, Ordering::Relaxed);
            if !self.full_reported {
                self.full_reported = true;
                log::warn!(
                    "the kernel's unwind tables are full ({} rows): stacks in more files are cut at their first frame",
                    UNWIND_CHUNKS as usize * UNWIND_CHUNK_ROWS
                );
            }
            return None;
        };
        self.free.remove(&start);
        if len > chunks {
            self.free.insert(start + chunks, len - chunks);
        }
        let mut chunk =
            Box::new(UnwindChunk { rows: [UnwindRow { cfa_rule: CFA_NONE, ..Default::default() }; UNWIND_CHUNK_ROWS] });
        for (index, part) in rows.chunks(UNWIND_CHUNK_ROWS).enumerate() {
            chunk.rows[..part.len()].copy_from_slice(part);
            if self.rows.set(start + index as u32, *chunk, 0).is_err() {
                self.free_chunks(start, chunks);
                return None;
            }
        }
        self.stats.tables.fetch_add(1, Ordering::Relaxed);
        let now = self.stats.rows.fetch_add(rows.len() as u64, Ordering::Relaxed) + rows.len() as u64;
        self.stats.peak_rows.fetch_max(now, Ordering::Relaxed);
        Some(Table { first_chunk: start, chunks, rows: rows.len() as u32, users: 0 })
    }

    /// The process is gone (or changed): its tables lose a user.
    fn forget(&mut self, pid: u32) {
        let _ = self.processes.remove(&pid);
        if let Some((_, keys)) = self.loaded.remove(&pid) {
            for key in &keys {
                self.release(key);
            }
        }
    }

    fn release(&mut self, key: &FileKey) {
        let Some(table) = self.tables.get_mut(key) else { return };
        table.users = table.users.saturating_sub(1);
        if table.users == 0 {
            let table = self.tables.remove(key).expect("present");
            self.free_chunks(table.first_chunk, table.chunks);
            self.stats.tables.fetch_sub(1, Ordering::Relaxed);
            self.stats.rows.fetch_sub(table.rows as u64, Ordering::Relaxed);
        }
    }

    /// Returns chunks to the free list, merged with their neighbours.
    fn free_chunks(&mut self, mut start: u32, mut len: u32) {
        if let Some((&before, &before_len)) = self.free.range(..start).next_back() {
            if before + before_len == start {
                self.free.remove(&before);
                start = before;
                len += before_len;
            }
        }
        if let Some(after_len) = self.free.remove(&(start + len)) {
            len += after_len;
        }
        self.free.insert(start, len);
    }
}

/// The file-backed executable mappings of a `/proc/PID/maps` text, sorted by
/// address (as the kernel lists them).
fn file_mappings(maps: &str) -> Vec<FileMapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset, device, inode) =
                (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
            let path = fields.collect::<Vec<_>>().join(" ");
            let inode: u64 = inode.parse().ok()?;
            let file = inode != 0 && path.starts_with('/') && !path.ends_with(" (deleted)");
            if !perms.contains('x') || !(file || path == VDSO) {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(FileMapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                device: device.to_owned(),
                inode,
                path,
            })
        })
        .collect()
}

/// The bytes of `mapping`'s file, as `pid` sees it: mapped, not read, as
/// libraries are large and only their CFI is looked at.
fn read_file(pid: u32, mapping: &FileMapping) -> Option<FileBytes> {
    if mapping.path == VDSO {
        // The kernel's own small ELF image, with its `.eh_frame`: the clock
        // functions programs call often are in it.
        let length = (mapping.end - mapping.start) as usize;
        return crate::process::procmem::ProcessMemory::new(pid)
            .read_vec(mapping.start, length)
            .ok()
            .map(FileBytes::Read);
    }
    let file = std::fs::File::open(format!("/proc/{pid}/root{}", mapping.path)).ok()?;
    // SAFETY: read only. A file truncated while mapped would fault; files
    // that processes map are replaced (a new inode), not truncated in place.
    unsafe { memmap2::Mmap::map(&file) }.ok().map(FileBytes::Mapped)
}

enum FileBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(map) => map,
            FileBytes::Read(bytes) => bytes,
        }
    }
}

/// The key of an ELF executable or library and its loadable segments.
fn identify(bytes: &[u8], mapping: &FileMapping) -> Option<Identity> {
    let elf = object::File::parse(bytes).ok()?;
    if !matches!(elf.kind(), ObjectKind::Executable | ObjectKind::Dynamic) {
        return None;
    }
    let key = match elf.build_id() {
        Ok(Some(id)) => FileKey::BuildId(id.to_vec()),
        _ => FileKey::Inode { device: mapping.device.clone(), inode: mapping.inode },
    };
    Some((key, load_segments(bytes)?))
}

/// A `PT_LOAD` segment: (vaddr, file offset, file size).
type Segment = (u64, u64, u64);

/// What a file is: its key, and its loadable segments.
type Identity = (FileKey, Vec<Segment>);

/// The `PT_LOAD` segments of an ELF file.
fn load_segments(bytes: &[u8]) -> Option<Vec<Segment>> {
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(bytes).ok()?;
    let endian = elf.endian();
    Some(
        elf.elf_program_headers()
            .iter()
            .filter(|header| header.p_type(endian) == elf::PT_LOAD)
            .map(|header| (header.p_vaddr(endian), header.p_offset(endian), header.p_filesz(endian)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_file_mappings_of_a_maps_text() {
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/python3.11
55d0c0a01000-55d0c0c00000 r-xp 00001000 fe:01 1234 /usr/bin/python3.11
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 
7f0000100000-7f0000200000 r-xp 00028000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000300000-7f0000301000 r-xp 00000000 fe:01 77 /tmp/gone.so (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";
        let mappings = file_mappings(maps);
        let paths: Vec<_> = mappings.iter().map(|mapping| (mapping.path.as_str(), mapping.offset)).collect();
        assert_eq!(
            paths,
            [("/usr/bin/python3.11", 0x1000), ("/usr/lib/x86_64-linux-gnu/libc.so.6", 0x28000), ("[vdso]", 0)]
        );
    }
}
