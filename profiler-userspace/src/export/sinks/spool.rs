//! The on-disk queue of a remote sink: every upload is written here first
//! and removed once delivered, so that what a backend has not taken
//! survives a restart. Files are `<sequence>.upload`: a JSON header line,
//! then the gzipped pprof. Bounded in bytes: past the cap, the oldest go.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::Upload;

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    next: u64,
}

const SUFFIX: &str = ".upload";

impl Spool {
    /// Opens (or creates) the spool in `dir`; what an earlier run left there
    /// is delivered first.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        let mut spool = Spool { dir: dir.to_owned(), max_bytes, next: 0 };
        spool.next = spool.entries()?.last().map_or(0, |(sequence, _, _)| sequence + 1);
        Ok(spool)
    }

    /// `(sequence, path, bytes)` of every entry, oldest first.
    fn entries(&self) -> Result<Vec<(u64, PathBuf, u64)>> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(sequence) = name.to_str().and_then(|name| name.strip_suffix(SUFFIX)?.parse::<u64>().ok()) else {
                continue;
            };
            entries.push((sequence, entry.path(), entry.metadata()?.len()));
        }
        entries.sort();
        Ok(entries)
    }

    /// Queues `upload`; returns how many of the oldest entries went to keep
    /// the spool within its cap (the new one among them if it alone is
    /// larger).
    pub fn push(&mut self, upload: &Upload) -> Result<u64> {
        let mut bytes = serde_json::to_vec(upload)?;
        bytes.push(b'\n');
        bytes.extend_from_slice(&upload.pprof_gz);
        let path = self.dir.join(format!("{:020}{SUFFIX}", self.next));
        let temporary = self.dir.join(format!(".{:020}.tmp", self.next));
        fs::File::create(&temporary)
            .and_then(|mut file| {
                file.write_all(&bytes)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temporary, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.next += 1;
        let entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|(_, _, bytes)| bytes).sum();
        let mut dropped = 0;
        for (_, path, bytes) in entries {
            if total <= self.max_bytes {
                break;
            }
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            total -= bytes;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The oldest entry. An entry that cannot be read back is removed, with
    /// a warning: it would block every later one.
    pub fn oldest(&self) -> Result<Option<(PathBuf, Upload)>> {
        for (_, path, _) in self.entries()? {
            match read(&path) {
                Ok(upload) => return Ok(Some((path, upload))),
                Err(error) => {
                    log::warn!("dropping the unreadable spooled upload {}: {error:#}", path.display());
                    fs::remove_file(&path)?;
                }
            }
        }
        Ok(None)
    }

    pub fn remove(&self, path: &Path) -> Result<()> {
        fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
    }

    /// Entries and bytes waiting.
    pub fn size(&self) -> Result<(u64, u64)> {
        let entries = self.entries()?;
        Ok((entries.len() as u64, entries.iter().map(|(_, _, bytes)| bytes).sum()))
    }
}

fn read(path: &Path) -> Result<Upload> {
    let bytes = fs::read(path)?;
    let newline = bytes.iter().position(|&b| b == b'\n').context("no header line")?;
    let mut upload: Upload = serde_json::from_slice(&bytes[..newline])?;
    upload.pprof_gz = bytes[newline + 1..].to_vec();
    Ok(upload)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn upload(application: &str, size: usize) -> Upload {
        Upload {
            application: application.into(),
            labels: BTreeMap::from([("env".into(), "prod".into())]),
            from: 100,
            until: 145,
            sample_rate: 100,
            sample_types: vec![("cpu".into(), "nanoseconds".into())],
            timeout_secs: None,
            pprof_gz: vec![7; size],
        }
    }

    #[test]
    fn uploads_come_back_in_order_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.push(&upload("a", 10)).unwrap();
        spool.push(&upload("b", 10)).unwrap();
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.push(&upload("c", 10)).unwrap();
        let mut seen = Vec::new();
        while let Some((path, upload)) = spool.oldest().unwrap() {
            assert_eq!(upload.pprof_gz, vec![7; 10]);
            seen.push(upload.application);
            spool.remove(&path).unwrap();
        }
        assert_eq!(seen, ["a", "b", "c"]);
        assert_eq!(spool.size().unwrap(), (0, 0));
    }

    #[test]
    fn the_oldest_go_past_the_cap_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let entry_bytes = {
            let mut spool = Spool::open(&dir.path().join("probe"), u64::MAX).unwrap();
            spool.push(&upload("x", 1000)).unwrap();
            spool.size().unwrap().1
        };
        let mut spool = Spool::open(&dir.path().join("capped"), 2 * entry_bytes).unwrap();
        assert_eq!(spool.push(&upload("a", 1000)).unwrap(), 0);
        assert_eq!(spool.push(&upload("b", 1000)).unwrap(), 0);
        assert_eq!(spool.push(&upload("c", 1000)).unwrap(), 1);
        assert_eq!(spool.oldest().unwrap().unwrap().1.application, "b");
    }

    #[test]
    fn an_unreadable_entry_is_dropped_not_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join(format!("{:020}{SUFFIX}", 0));
        fs::write(&garbage, b"garbage without header").unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.push(&upload("good", 5)).unwrap();
        assert_eq!(spool.oldest().unwrap().unwrap().1.application, "good");
        assert!(!garbage.exists());
    }
}
