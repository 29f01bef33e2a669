//! Profiles as files: `<root>/<application>/<start>-<end>.pb.gz` (gzipped
//! pprof) for tools, and `.svg` (flame graph) beside it for people.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;

use crate::{aggregate::PeriodProfile, flamegraph};

/// A directory with one subdirectory per application.
pub struct LocalDir {
    root: PathBuf,
}

/// The files written for one profile.
#[derive(Debug)]
pub struct Written {
    pub pprof: PathBuf,
    pub flamegraph: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `profile`, whose gzipped pprof is `pprof_gz`, and its flame
    /// graph.
    pub fn write(&self, profile: &PeriodProfile, pprof_gz: &[u8]) -> anyhow::Result<Written> {
        let dir = self.root.join(dir_name(&profile.application));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let stem = format!("{}-{}", compact_utc(profile.start), compact_utc(profile.end));
        Ok(Written {
            pprof: write_atomically(&dir, &format!("{stem}.pb.gz"), pprof_gz)?,
            flamegraph: write_atomically(&dir, &format!("{stem}.svg"), &flamegraph::svg(profile)?)?,
        })
    }
}

/// `20261122T003656Z`: sorts by time, and has no `:` that would trouble
/// other systems or URLs.
fn compact_utc(time: SystemTime) -> String {
    // humantime panics on times before 1970, which only a broken clock gives.
    humantime::format_rfc3339_seconds(time.max(UNIX_EPOCH)).to_string().replace(['-', ':'], "")
}

/// `application` as a single directory name, kept readable: no path
/// separators, no control characters (NUL among them), never `.`, `..` or
/// hidden, and short enough for any file system (255 bytes).
fn dir_name(application: &str) -> String {
    const MAX_BYTES: usize = 200;
    let mut name: String =
        application.chars().map(|c| if c == '/' || c == '\\' || c.is_control() { '_' } else { c }).collect();
    if name.is_empty() || name.starts_with('.') {
        name.insert(0, '_');
    }
    while name.len() > MAX_BYTES {
        name.pop();
    }
    name
}

/// Writes `bytes` to `dir/name` through a temporary file renamed over it, so
/// that a reader sees the whole file or none of it. The temporary file is
/// hidden, so that globs such as `*.pb.gz` skip it.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            // Else a crash soon after the rename may leave an empty file.
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, &path));
    if let Err(error) = written {
        // Best effort: the error worth reporting is the first one.
        let _ = fs::remove_file(&temporary);
        return Err(error).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read, time::Duration};

    use super::*;
    use crate::{
        aggregate::{Frame, FrameKind, Thread},
        pprof,
    };

    #[test]
    fn dir_names_stay_one_readable_directory() {
        for (application, expected) in [
            ("web", "web"),
            ("python -m http.server", "python -m http.server"),
            ("/srv/app/main.py", "_srv_app_main.py"),
            ("../../etc", "_.._.._etc"),
            (".", "_."),
            ("..", "_.."),
            (".hidden", "_.hidden"),
            ("", "_"),
            ("a\0b\nc\\d", "a_b_c_d"),
            ("Zürich", "Zürich"),
        ] {
            assert_eq!(dir_name(application), expected, "for {application:?}");
        }
        let long = dir_name(&"é".repeat(300));
        assert!(long.len() <= 200 && long.chars().all(|c| c == 'é'), "{long}");
    }

    fn profile(application: &str) -> PeriodProfile {
        let start = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut profile = PeriodProfile::new(application.to_owned(), BTreeMap::new(), start, 10_000_000);
        profile.end = start + Duration::from_secs(10);
        let frame = Frame {
            kind: FrameKind::Python,
            function: "serve".into(),
            file: "/srv/app.py".into(),
            start_line: 3,
            line: 4,
        };
        let thread = Thread {
            pid: 7,
            container_pid: None,
            container_id: None,
            tid: 7,
            thread_name: "python3".into(),
            process_name: "python3".into(),
            context: None,
        };
        profile.add(&[frame], &thread);
        profile
    }

    #[test]
    fn writes_whole_files_named_by_application_and_period() {
        let root = tempfile::tempdir().unwrap();
        let sink = LocalDir::new(root.path().join("profiles"));
        let profile = profile("../web");
        let written = sink.write(&profile, &pprof::encode_gzipped(&profile).unwrap()).unwrap();

        let dir = root.path().join("profiles/_.._web");
        assert_eq!(written.pprof, dir.join("20261118T110640Z-20261118T110650Z.pb.gz"));
        assert_eq!(written.flamegraph, dir.join("20261118T110640Z-20261118T110650Z.svg"));
        let mut pprof = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(&written.pprof).unwrap()).read_to_end(&mut pprof).unwrap();
        assert_eq!(pprof, pprof::encode(&profile));
        assert_eq!(fs::read(&written.flamegraph).unwrap(), flamegraph::svg(&profile).unwrap());

        sink.write(&profile, &pprof::encode_gzipped(&profile).unwrap()).expect("a second write replaces the files");
        let mut names: Vec<_> = fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["20261118T110640Z-20261118T110650Z.pb.gz", "20261118T110640Z-20261118T110650Z.svg"]);
    }

    #[test]
    fn says_which_directory_it_cannot_create() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        fs::write(&file, "").unwrap();
        let error = LocalDir::new(&file).write(&profile("web"), &[]).unwrap_err();
        assert_eq!(error.to_string(), format!("cannot create {}", file.join("web").display()));
    }
}
