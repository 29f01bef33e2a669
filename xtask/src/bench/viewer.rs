//! The viewer's benchmark: a day of one application's profiles (1,920 periods of 45 s),
//! made of real periods the agent wrote of four pyperformance benchmarks run as one
//! application, opened in Debian's chromium by `ferroscope view` just started; and the same
//! files opened by the peer, `go tool pprof -http`.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::{free_port, profile_files, Agent, KillOnDrop, Workload};

use crate::{setup, step, workspace_root};

/// Periods in a day at the default period.
const PERIODS: u64 = 1_920;
const PERIOD_SECONDS: u64 = 45;
/// The real periods the day is made of: long enough for a service's variety of stacks.
const SOURCE_PERIOD: &str = "15s";
const SOURCE_SECONDS: u64 = 62;
/// pyperformance benchmarks that need nothing beyond the standard library: the
/// application's four processes.
const BENCHMARKS: [&str; 4] = ["raytrace", "json_dumps", "xml_etree", "go"];

/// Runs the benchmark; returns its section of docs/benchmarks.md.
pub fn run(agent_bin: &Path) -> Result<String> {
    let day = tempfile::tempdir()?;
    let sources = record_sources(agent_bin)?;
    let (bytes, samples) = make_day(&sources, &day.path().join("service"))?;
    write_wide_profile(&day.path().join("wide"))?;
    let ours = time_ferroscope_view(agent_bin, day.path())?;
    let files: Vec<PathBuf> = profile_files(day.path(), "service")?;
    let peer_seconds = time_go_pprof(&files)?;
    let report = format!(
        "## Viewer\n\n\
         `ferroscope view` over a day of one application: {PERIODS} periods of {PERIOD_SECONDS} s ({:.1} MiB of gzipped \
         pprof, {samples} samples per period on average), copies (times rewritten) of {} real {SOURCE_PERIOD} \
         periods the agent wrote of four pyperformance benchmarks ({}) run at once as one application on CPython 3.11.7. \
         With Debian's chromium running (Playwright, `tests/browser/open_time.mjs`), the viewer is started and the \
         page opened: first open is from starting `ferroscope view` until the page shows the timeline and the flame \
         graph of the whole day as read so far (the viewer answers once the newest 80 files, an hour, are in, and the \
         page fills in as the rest are read), then until every file is in; then the page's own requests are timed. \
         The peer: `go tool pprof -http` over the same files, timed until its flame graph page answers.\n\n\
         | | ms |\n|---|---:|\n\
         | first open: from starting the viewer to the page showing the newest hour's periods | {} |\n\
         | ... and the whole day, every file read | {} |\n\
         | open again (reload) | {} |\n\
         | timeline (1 request) | {} |\n\
         | one hour's flame graph and top tables | {} |\n\
         | the whole day's wall-time flame graph | {} |\n\
         | diff of the two halves of the day ({} boxes) | {} |\n\
         | search, from typing to the share shown (the page waits 120 ms for typing to pause) | {} |\n\
         | a profile of {WIDE_STACKS} stacks {WIDE_DEPTH} deep ({} boxes): opened | {} |\n\
         | the same: redrawn (a zoom, a resize) | {} |\n\
         | peer: `go tool pprof -http` until its flame graph answers | {:.0} |\n\n\
         Viewer peak RSS: {:.1} MiB. The whole day read and shown, against the peer: x{:.2}.\n",
        bytes as f64 / (1 << 20) as f64,
        sources.len(),
        BENCHMARKS.join(", "),
        ours.first_open_ms,
        ours.complete_ms,
        ours.reopen_ms,
        ours.timeline_ms,
        ours.hour_ms,
        ours.day_wall_ms,
        ours.diff_boxes,
        ours.diff_ms,
        ours.search_ms,
        ours.wide_boxes,
        ours.wide_open_ms,
        ours.wide_redraw_ms,
        peer_seconds * 1000.0,
        ours.peak_rss as f64 / (1 << 20) as f64,
        ours.complete_ms as f64 / (peer_seconds * 1000.0),
    );
    Ok(report)
}

/// The agent's real periods of the four benchmarks, run as one application
/// (`run_benchmark.py`, each benchmark's script name).
fn record_sources(agent_bin: &Path) -> Result<Vec<PathBuf>> {
    step(format!("bench: viewer: recording {SOURCE_SECONDS} s of {} under the agent", BENCHMARKS.join(", ")));
    let agent = Agent::start_binary(agent_bin, &["--period", SOURCE_PERIOD])?;
    let workloads = BENCHMARKS
        .iter()
        .map(|name| {
            let script = setup::pyperformance_benchmark(name);
            let args = [script.to_str().unwrap(), "--worker", "--values=1000", "--warmups=0", "--loops=1"];
            Workload::start_program(&setup::bench_python(), &args, &[])
        })
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(SOURCE_SECONDS));
    let run = agent.stop()?;
    drop(workloads);
    let mut files = profile_files(run.output_dir.path(), "run_benchmark.py")?;
    // The first and last periods are partial.
    files.sort();
    ensure!(files.len() >= 3, "the agent wrote {} periods of the benchmarks; its output:\n{}", files.len(), run.log);
    let sources = tempfile::tempdir()?.keep();
    files[1..files.len() - 1]
        .iter()
        .map(|file| {
            let copy = sources.join(file.file_name().unwrap());
            fs::copy(file, &copy)?;
            Ok(copy)
        })
        .collect()
}

/// Writes the day into `dir`: period `i` is source `i % n` with its start and duration
/// rewritten, named as the agent names files. Returns the bytes written and the mean
/// samples per period.
fn make_day(sources: &[PathBuf], dir: &Path) -> Result<(u64, u64)> {
    fs::create_dir_all(dir)?;
    let decoded: Vec<Vec<u8>> = sources.iter().map(|source| gunzip(&fs::read(source)?)).collect::<Result<_>>()?;
    // Yesterday, at midnight UTC.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let day_start = (now / 86_400 - 1) * 86_400;
    let (mut bytes, mut samples) = (0, 0);
    for period in 0..PERIODS {
        let source = &decoded[period as usize % decoded.len()];
        let start = day_start + period * PERIOD_SECONDS;
        let profile = with_times(source, start * 1_000_000_000, PERIOD_SECONDS * 1_000_000_000)?;
        samples += count_field(source, 2)?;
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&profile)?;
        let gzipped = gzip.finish()?;
        bytes += gzipped.len() as u64;
        let name = format!("{}-{}.pb.gz", compact_utc(start), compact_utc(start + PERIOD_SECONDS));
        fs::write(dir.join(name), gzipped)?;
    }
    Ok((bytes, samples / PERIODS))
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

/// The pprof `Profile` message `profile` with `time_nanos` (field 9) and `duration_nanos`
/// (10) replaced: its other top-level fields are copied as they are.
fn with_times(profile: &[u8], time_nanos: u64, duration_nanos: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(profile.len() + 24);
    for field in top_level_fields(profile)? {
        let (number, bytes) = field?;
        if number != 9 && number != 10 {
            out.extend_from_slice(bytes);
        }
    }
    for (number, value) in [(9, time_nanos), (10, duration_nanos)] {
        put_varint(&mut out, number << 3);
        put_varint(&mut out, value);
    }
    Ok(out)
}

/// How many times field `number` occurs at the top level of a message.
fn count_field(message: &[u8], number: u64) -> Result<u64> {
    let mut count = 0;
    for field in top_level_fields(message)? {
        count += u64::from(field?.0 == number);
    }
    Ok(count)
}

/// The top-level fields of a protobuf message: each field's number and its bytes (key
/// included).
fn top_level_fields(message: &[u8]) -> Result<impl Iterator<Item = Result<(u64, &[u8])>>> {
    let mut at = 0;
    Ok(std::iter::from_fn(move || {
        if at >= message.len() {
            return None;
        }
        let start = at;
        let field = (|| {
            let key = get_varint(message, &mut at)?;
            match key & 7 {
                0 => {
                    get_varint(message, &mut at)?;
                }
                1 => at += 8,
                2 => at += get_varint(message, &mut at)? as usize,
                5 => at += 4,
                wire => anyhow::bail!("unexpected wire type {wire}"),
            }
            ensure!(at <= message.len(), "a field runs past the end");
            Ok((key >> 3, &message[start..at]))
        })();
        if field.is_err() {
            at = message.len();
        }
        Some(field)
    }))
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64> {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).context("a varint runs past the end")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    anyhow::bail!("a varint of more than 10 bytes")
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The wide profile: as many boxes as the viewer sends (50,000), each wide
/// enough to be drawn.
const WIDE_STACKS: u64 = 2_000;
const WIDE_DEPTH: u64 = 25;

/// Writes, as application `wide`, one period whose flame graph is as large
/// as the viewer draws: `WIDE_STACKS` stacks of `WIDE_DEPTH` functions of
/// their own, under one root function.
fn write_wide_profile(dir: &Path) -> Result<()> {
    fn field_varint(out: &mut Vec<u8>, number: u64, value: u64) {
        put_varint(out, number << 3);
        put_varint(out, value);
    }
    fn field_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        put_varint(out, number << 3 | 2);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    let mut profile = Vec::new();
    for (kind, unit) in [(1, 2), (3, 4)] {
        let mut value_type = Vec::new();
        field_varint(&mut value_type, 1, kind);
        field_varint(&mut value_type, 2, unit);
        field_bytes(&mut profile, 1, &value_type);
    }
    let functions = WIDE_STACKS * WIDE_DEPTH + 1;
    for stack in 0..WIDE_STACKS {
        let mut sample = Vec::new();
        let mut locations = Vec::new();
        // Leaf first; location i+1 is function i+1; function 1 is the root.
        for depth in (0..WIDE_DEPTH).rev() {
            put_varint(&mut locations, 2 + stack * WIDE_DEPTH + depth);
        }
        put_varint(&mut locations, 1);
        field_bytes(&mut sample, 1, &locations);
        let weight = 1 + stack % 7;
        let mut values = Vec::new();
        put_varint(&mut values, weight);
        put_varint(&mut values, weight * 10_000_000);
        field_bytes(&mut sample, 2, &values);
        field_bytes(&mut profile, 2, &sample);
    }
    for id in 1..=functions {
        let mut line = Vec::new();
        field_varint(&mut line, 1, id);
        field_varint(&mut line, 2, id);
        let mut location = Vec::new();
        field_varint(&mut location, 1, id);
        field_bytes(&mut location, 4, &line);
        field_bytes(&mut profile, 4, &location);
        let mut function = Vec::new();
        field_varint(&mut function, 1, id);
        field_varint(&mut function, 2, 5 + id);
        field_varint(&mut function, 4, 5);
        field_bytes(&mut profile, 5, &function);
    }
    for text in ["", "samples", "count", "cpu", "nanoseconds", "wide.py"] {
        field_bytes(&mut profile, 6, text.as_bytes());
    }
    for id in 1..=functions {
        field_bytes(&mut profile, 6, format!("function_{id}").as_bytes());
    }
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() - 3_600;
    field_varint(&mut profile, 9, start * 1_000_000_000);
    field_varint(&mut profile, 10, PERIOD_SECONDS * 1_000_000_000);
    fs::create_dir_all(dir)?;
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&profile)?;
    let name = format!("{}-{}.pb.gz", compact_utc(start), compact_utc(start + PERIOD_SECONDS));
    fs::write(dir.join(name), gzip.finish()?)?;
    Ok(())
}

/// `20261122T003656Z`, as the agent names its files.
fn compact_utc(unix_seconds: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm).
    let days = (unix_seconds / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let seconds = unix_seconds % 86_400;
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

/// What `open_time.mjs` measured, and the viewer's peak RSS.
#[derive(Default)]
struct ViewerTimes {
    first_open_ms: u64,
    complete_ms: u64,
    reopen_ms: u64,
    timeline_ms: u64,
    hour_ms: u64,
    day_wall_ms: u64,
    diff_ms: u64,
    diff_boxes: u64,
    search_ms: u64,
    wide_boxes: u64,
    wide_open_ms: u64,
    wide_redraw_ms: u64,
    peak_rss: u64,
}

fn time_ferroscope_view(agent_bin: &Path, root: &Path) -> Result<ViewerTimes> {
    let address = format!("127.0.0.1:{}", free_port()?);
    let output = Command::new("node")
        .current_dir(workspace_root().join("tests/browser"))
        .arg("open_time.mjs")
        .args([agent_bin, root])
        .args([address.as_str(), "service"])
        .output()?;
    ensure!(output.status.success(), "open_time.mjs failed: {}", String::from_utf8_lossy(&output.stderr));
    let times: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    step(format!("bench: viewer: {times}"));
    ensure!(times["periods"] == PERIODS, "the page saw {} periods, not {PERIODS}", times["periods"]);
    let ms = |key: &str| times[key].as_u64().with_context(|| format!("no {key} in {times}"));
    Ok(ViewerTimes {
        first_open_ms: ms("first_open_ms")?,
        complete_ms: ms("complete_ms")?,
        reopen_ms: ms("reopen_ms")?,
        timeline_ms: ms("timeline_ms")?,
        hour_ms: ms("hour_ms")?,
        day_wall_ms: ms("day_wall_ms")?,
        diff_ms: ms("diff_ms")?,
        diff_boxes: ms("diff_boxes")?,
        search_ms: ms("search_ms")?,
        wide_boxes: ms("wide_boxes")?,
        wide_open_ms: ms("wide_open_ms")?,
        wide_redraw_ms: ms("wide_redraw_ms")?,
        peak_rss: ms("peak_rss_kib")? * 1024,
    })
}

/// Seconds from starting `go tool pprof -http` over `files` until its flame graph page
/// answers.
fn time_go_pprof(files: &[PathBuf]) -> Result<f64> {
    let address = format!("127.0.0.1:{}", free_port()?);
    // The tool itself: `go tool pprof` runs it as a child of its own, which killing `go`
    // would leave running.
    let tool = Command::new("go").args(["tool", "-n", "pprof"]).output()?;
    ensure!(tool.status.success(), "go tool -n pprof: {}", String::from_utf8_lossy(&tool.stderr));
    let started = Instant::now();
    let child = Command::new(String::from_utf8(tool.stdout)?.trim())
        .args(["-no_browser", &format!("-http={address}")])
        .args(files)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut child = KillOnDrop(child);
    loop {
        let answered = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &format!("http://{address}/ui/flamegraph")])
            .status()?
            .success();
        if answered {
            return Ok(started.elapsed().as_secs_f64());
        }
        ensure!(child.0.try_wait()?.is_none(), "go tool pprof -http exited");
        ensure!(started.elapsed() < Duration::from_secs(300), "go tool pprof -http did not answer in 5 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_as_the_agent_does() {
        assert_eq!(compact_utc(0), "19700101T000000Z");
        assert_eq!(compact_utc(1_795_341_957), "20261122T100557Z");
        assert_eq!(compact_utc(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn rewrites_the_times_and_keeps_the_rest() {
        // string_table "" and "x", time_nanos 5, a sample (field 2, empty).
        let message = [0x32, 0x00, 0x32, 0x01, b'x', 0x48, 0x05, 0x12, 0x00];
        let rewritten = with_times(&message, 300, 45).unwrap();
        assert_eq!(rewritten, [0x32, 0x00, 0x32, 0x01, b'x', 0x12, 0x00, 0x48, 0xac, 0x02, 0x50, 0x2d]);
        assert_eq!(count_field(&message, 2).unwrap(), 1);
        assert!(count_field(&[0x12, 0x05, 0x00], 2).is_err(), "a field past the end is an error");
    }
}
