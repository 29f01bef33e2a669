//! Profiles as files: `<root>/<application>/<start>-<end>.pb.gz` (gzipped
//! pprof) for tools, and `.svg` (flame graph) beside it for people. Processes
//! of one application with labels of their own (a pod's, say) make profiles
//! of their own: `<start>-<end>-<hash of those labels>.pb.gz`.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;

use crate::{aggregate::PeriodProfile, export::flamegraph};

/// A directory with one subdirectory per application.
pub struct LocalDir {
    root: PathBuf,
    /// The agent's labels, which every profile has.
    common_labels: BTreeMap<String, String>,
}

/// The files written for one profile.
#[derive(Debug)]
pub struct Written {
    pub pprof: PathBuf,
    /// None for a profile with nothing to draw.
    pub flamegraph: Option<PathBuf>,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>, common_labels: BTreeMap<String, String>) -> Self {
        LocalDir { root: root.into(), common_labels }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `profile`, whose gzipped pprof is `pprof_gz`, and its flame
    /// graph.
    pub fn write(&self, profile: &PeriodProfile, pprof_gz: &[u8]) -> anyhow::Result<Written> {
        let dir = self.root.join(dir_name(&profile.application));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut stem = format!("{}-{}", compact_utc(profile.start), compact_utc(profile.end));
        let own_labels: Vec<_> =
            profile.labels.iter().filter(|(key, value)| self.common_labels.get(*key) != Some(*value)).collect();
        if !own_labels.is_empty() {
            stem.push_str(&format!("-{:08x}", fnv1a(format!("{own_labels:?}").as_bytes()) as u32));
        }
        let pprof = write_atomically(&dir, &format!("{stem}.pb.gz"), pprof_gz)?;
        let flamegraph = match flamegraph::svg(profile)? {
            Some(svg) => Some(write_atomically(&dir, &format!("{stem}.svg"), &svg)?),
            None => None,
        };
        Ok(Written { pprof, flamegraph })
    }
}

/// `20261122T003656Z`: sorts by time, and has no `:` that would trouble
/// other systems or URLs.
fn compact_utc(time: SystemTime) -> String {
    // humantime panics on times before 1970, which only a broken clock gives.
    humantime::format_rfc3339_seconds(time.max(UNIX_EPOCH)).to_string().replace(['-', ':'], "")
}

/// A hash that stays the same from run to run (std's does not), so that a
/// series keeps its file name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
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
        aggregate::Measurement,
        export::pprof,
        stack::{Frame, FrameKind, Thread},
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
        profile.add(&[frame], &thread, Measurement::Cpu);
        profile
    }

    #[test]
    fn writes_whole_files_named_by_application_and_period() {
        let root = tempfile::tempdir().unwrap();
        let sink = LocalDir::new(root.path().join("profiles"), BTreeMap::new());
        let profile = profile("../web");
        let written = sink.write(&profile, &pprof::encode_gzipped(&profile).unwrap()).unwrap();

        let dir = root.path().join("profiles/_.._web");
        assert_eq!(written.pprof, dir.join("20261118T110640Z-20261118T110650Z.pb.gz"));
        assert_eq!(written.flamegraph, Some(dir.join("20261118T110640Z-20261118T110650Z.svg")));
        let mut pprof = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(&written.pprof).unwrap()).read_to_end(&mut pprof).unwrap();
        assert_eq!(pprof, pprof::encode(&profile));
        assert_eq!(fs::read(written.flamegraph.unwrap()).unwrap(), flamegraph::svg(&profile).unwrap().unwrap());

        sink.write(&profile, &pprof::encode_gzipped(&profile).unwrap()).expect("a second write replaces the files");
        let mut names: Vec<_> = fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["20261118T110640Z-20261118T110650Z.pb.gz", "20261118T110640Z-20261118T110650Z.svg"]);
    }

    #[test]
    fn processes_of_one_application_with_labels_of_their_own_get_files_of_their_own() {
        let root = tempfile::tempdir().unwrap();
        let common = BTreeMap::from([("host".to_owned(), "vm".to_owned())]);
        let sink = LocalDir::new(root.path(), common.clone());
        let name_of = |pod: Option<&str>| {
            let mut profile = profile("web");
            profile.labels = common.clone();
            profile.labels.extend(pod.map(|pod| ("pod".to_owned(), pod.to_owned())));
            let written = sink.write(&profile, &[]).unwrap();
            written.pprof.file_name().unwrap().to_string_lossy().into_owned()
        };
        let names = [name_of(None), name_of(Some("web-0")), name_of(Some("web-1"))];
        assert_eq!(names[0], "20261118T110640Z-20261118T110650Z.pb.gz");
        assert!(names[1] != names[2] && names[1].starts_with("20261118T110640Z-20261118T110650Z-"), "{names:?}");
        // The same labels, the same name, run after run.
        assert_eq!(name_of(Some("web-0")), names[1]);
    }

    #[test]
    fn says_which_directory_it_cannot_create() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        fs::write(&file, "").unwrap();
        let error = LocalDir::new(&file, BTreeMap::new()).write(&profile("web"), &[]).unwrap_err();
        assert_eq!(error.to_string(), format!("cannot create {}", file.join("web").display()));
    }
}
