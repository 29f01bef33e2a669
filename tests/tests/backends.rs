//! Profiles shipped to backends: intakes on loopback or a Unix socket
//! (`tests/receivers/intake.py`) take them the way Pyroscope's HTTP API and the Datadog
//! agent do, and the tests read what arrived: names and labels, time range, sample types,
//! credentials, and the pprof itself with `go tool pprof`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use e2e::{free_port, Agent, Profile, Workload, PYENV_PYTHON_3_11};
use serde_json::Value;

/// A receiver on loopback, saving what it takes into a directory.
struct Receiver {
    _process: Workload,
    dir: PathBuf,
}

impl Receiver {
    /// Listening on 127.0.0.1:`port`; the first `fail_first` uploads get a 503.
    fn start(dir: &Path, port: u16, fail_first: u32) -> Result<Receiver> {
        Receiver::start_with(dir, &[&port.to_string(), "--fail-first", &fail_first.to_string()], &port.to_string())
    }

    /// Listening on the Unix socket `socket`.
    fn start_unix(dir: &Path, socket: &Path) -> Result<Receiver> {
        let socket = socket.to_str().unwrap();
        Receiver::start_with(dir, &["--unix", socket], socket)
    }

    fn start_with(dir: &Path, args: &[&str], address: &str) -> Result<Receiver> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("receivers/intake.py");
        let mut argv = vec![script.to_str().unwrap(), dir.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut process = Workload::start_program(&tools_python()?, &argv, &[])?;
        process.wait_for_line(&format!("listening {address}"), Duration::from_secs(10))?;
        Ok(Receiver { _process: process, dir: dir.to_owned() })
    }

    /// What arrived, in order: the request's record and the profile's file.
    fn uploads(&self) -> Result<Vec<(Value, PathBuf)>> {
        let mut records: Vec<PathBuf> =
            fs::read_dir(&self.dir)?.map(|entry| entry.map(|entry| entry.path())).collect::<std::io::Result<_>>()?;
        records.retain(|path| path.extension().is_some_and(|extension| extension == "json"));
        records.sort();
        records
            .into_iter()
            .map(|path| Ok((serde_json::from_str(&fs::read_to_string(&path)?)?, path.with_extension("pprof"))))
            .collect()
    }
}

/// The tools' Python (`cargo xtask setup --test`), which has the official OTLP protos.
fn tools_python() -> Result<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/python");
    ensure!(python.exists(), "{} is missing: run `cargo xtask setup --test`", python.display());
    Ok(python)
}

/// Whether the receivers can run: see [`e2e::tool_installed`].
fn receivers_installed() -> Result<bool> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/python");
    let install = "run `cargo xtask setup --test`, which makes the tools' Python environment";
    e2e::tool_installed(python.to_str().context("a UTF-8 path")?, install)
}

fn query<'a>(record: &'a Value, key: &str) -> &'a str {
    record["query"][key].as_str().unwrap_or_default()
}

/// The uploads of the series whose name starts with `application{`.
fn of_application(uploads: Vec<(Value, PathBuf)>, application: &str) -> Vec<(Value, PathBuf)> {
    uploads.into_iter().filter(|(record, _)| query(record, "name").starts_with(&format!("{application}{{"))).collect()
}

#[test]
fn profiles_arrive_with_their_name_labels_time_range_and_credentials() -> Result<()> {
    if !receivers_installed()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let receiver = Receiver::start(dir.path(), port, 0)?;
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&[
        "--period",
        "2s",
        "--label",
        "env=e2e",
        "--pyroscope-url",
        &url,
        "--pyroscope-user",
        "user",
        "--pyroscope-password",
        "secret",
        "--pyroscope-tenant",
        "team-1",
    ])?;
    // The application names and labels itself through its environment.
    let script = e2e::workload("spin.py");
    let workload = Workload::start_program(
        Path::new(PYENV_PYTHON_3_11),
        &[script.to_str().unwrap(), "3"],
        &[("FERROSCOPE_APPLICATION_NAME", "checkout"), ("FERROSCOPE_LABELS", "tier=web")],
    )?;
    let pid = workload.pid();
    workload.wait()?;
    let run = agent.stop()?;
    let uploads = of_application(receiver.uploads()?, "checkout");
    ensure!(!uploads.is_empty(), "no upload of checkout arrived; agent output:\n{}", run.log);
    let mut files = Vec::new();
    for (record, file) in &uploads {
        let name = query(record, "name");
        for label in ["env=e2e", "tier=web", "host="] {
            ensure!(name.contains(label), "series {name} lacks {label}");
        }
        let (from, until): (u64, u64) = (query(record, "from").parse()?, query(record, "until").parse()?);
        ensure!(from < until && until - from <= 4, "time range {from}..{until} for a 2 s period");
        ensure!(query(record, "format") == "pprof" && query(record, "sampleRate") == "100", "query {record}");
        // `user:secret` in base64.
        ensure!(record["authorization"] == "Basic dXNlcjpzZWNyZXQ=", "authorization {}", record["authorization"]);
        ensure!(record["tenant"] == "team-1", "tenant {}", record["tenant"]);
        ensure!(record["sample_type_config"]["cpu"]["units"] == "nanoseconds", "config {record}");
        files.push(file.clone());
    }
    let profile = Profile::load(&files)?;
    ensure!(profile.sample_types.contains(&"cpu/nanoseconds".to_owned()), "sample types {:?}", profile.sample_types);
    let spinning = profile.samples_of_pid(pid).filter(|sample| sample.has_function("spin")).count();
    ensure!(spinning > 0, "no sample of spin in pid {pid} arrived; agent output:\n{}", run.log);
    ensure!(run.log.contains("pyroscope: "), "the summary says nothing of the backend:\n{}", run.log);
    Ok(())
}

/// A backend down for a whole agent run: the profiles wait in the spool and arrive, in
/// order, once it is back (after one more refusal with a 503).
#[test]
fn a_backend_that_is_down_costs_no_profile() -> Result<()> {
    if !receivers_installed()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool");
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let spool_arg = spool.to_str().unwrap();
    let agent_args = ["--period", "1s", "--pyroscope-url", &url, "--spool-dir", spool_arg, "--upload-timeout", "1s"];
    let agent = Agent::start(&agent_args)?;
    let workload = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["3"])?;
    workload.wait()?;
    let first_run = agent.stop()?;
    let spooled = fs::read_dir(spool.join("pyroscope"))?.count();
    ensure!(spooled >= 3, "{spooled} uploads spooled; agent output:\n{}", first_run.log);

    let receiver = Receiver::start(&dir.path().join("received"), port, 1)?;
    let second_run = Agent::start(&agent_args)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fs::read_dir(spool.join("pyroscope"))?.count() > 0 {
        ensure!(std::time::Instant::now() < deadline, "the spool did not empty; agent output:\n{}", second_run.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = second_run.stop()?.log;
    let uploads = of_application(receiver.uploads()?, "spin.py");
    ensure!(uploads.len() >= 3, "{} uploads of spin.py arrived; agent output:\n{log}", uploads.len());
    let starts: Vec<u64> =
        uploads.iter().map(|(record, _)| query(record, "from").parse().context("from")).collect::<Result<_>>()?;
    ensure!(starts.windows(2).all(|pair| pair[0] <= pair[1]), "uploads out of order: {starts:?}");
    ensure!(log.contains("retrying"), "the 503 was not retried; agent output:\n{log}");
    Profile::load(&[uploads[0].1.clone()])?;
    Ok(())
}

/// The Datadog agent's intake, as the Blackfire agent also serves it, on a Unix socket: the
/// event names the service and tags and the attachment, which `go tool pprof` reads.
#[test]
fn profiles_arrive_at_a_datadog_style_intake_on_a_unix_socket() -> Result<()> {
    if !receivers_installed()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    let receiver = Receiver::start_unix(&dir.path().join("received"), &socket)?;
    let url = format!("unix://{}", socket.display());
    let agent = Agent::start(&["--period", "2s", "--label", "env=e2e", "--datadog-url", &url])?;
    let workload = Workload::start(PYENV_PYTHON_3_11, "spin.py", &["2"])?;
    let pid = workload.pid();
    workload.wait()?;
    let run = agent.stop()?;
    let uploads: Vec<_> = receiver
        .uploads()?
        .into_iter()
        .filter(|(record, _)| {
            record["event"]["tags_profiler"].as_str().unwrap_or_default().starts_with("service:spin.py,")
        })
        .collect();
    ensure!(!uploads.is_empty(), "no upload of spin.py arrived; agent output:\n{}", run.log);
    for (record, _) in &uploads {
        ensure!(record["path"] == "/profiling/v1/input", "path {}", record["path"]);
        let event = &record["event"];
        ensure!(event["tags_profiler"].as_str().unwrap_or_default().contains("env:e2e"), "event {event}");
        ensure!(event["attachments"][0] == "auto.pprof" && event["family"] == "python", "event {event}");
        ensure!(record["parts"] == serde_json::json!(["auto.pprof", "event"]), "parts {}", record["parts"]);
    }
    let profile = Profile::load(&uploads.iter().map(|(_, file)| file.clone()).collect::<Vec<_>>())?;
    ensure!(profile.samples_of_pid(pid).any(|sample| sample.has_function("spin")), "no sample of spin arrived");
    Ok(())
}

/// `--metrics-address`: the agent's own counters in Prometheus' text format, per sink too.
#[test]
fn the_agent_reports_its_health_on_a_metrics_endpoint() -> Result<()> {
    if !receivers_installed()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let _receiver = Receiver::start(dir.path(), port, 0)?;
    let metrics_port = free_port()?;
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&["--period", "1s", "--pyroscope-url", &url, "--metrics-address", &metrics_address])?;
    Workload::start(PYENV_PYTHON_3_11, "spin.py", &["2"])?.wait()?;
    let value = |text: &str, name: &str| -> Result<f64> {
        let line =
            text.lines().find(|line| line.starts_with(name)).with_context(|| format!("no {name} in:\n{text}"))?;
        Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
    };
    let delivered = |text: &str| value(text, "ferroscope_uploads_delivered_total{sink=\"pyroscope\"}");
    // A period ends every second and its upload follows, however late on a busy host: until
    // the counters show one delivered, not a fixed wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = http_get(&metrics_address, "/metrics")?;
        if delivered(&text).is_ok_and(|delivered| delivered > 0.0) || std::time::Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let health = http_get(&metrics_address, "/healthz")?;
    let run = agent.stop()?;
    ensure!(value(&text, "ferroscope_samples_total ")? > 0.0, "no samples counted:\n{text}");
    ensure!(value(&text, "ferroscope_profiles_total ")? > 0.0, "no profiles counted:\n{text}");
    ensure!(delivered(&text)? > 0.0, "nothing delivered within 30 s:\n{text}");
    ensure!(text.contains("# TYPE ferroscope_spool_bytes gauge"), "metrics:\n{text}");
    ensure!(health.ends_with("ok\n"), "healthz: {health}; agent output:\n{}", run.log);
    Ok(())
}

/// The body of `GET PATH` from `address`, with its status line checked.
fn http_get(address: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    ensure!(response.starts_with("HTTP/1.1 200"), "GET {path}: {response}");
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

/// OTLP profiles for an OpenTelemetry Collector, decoded on arrival with the official protos
/// (`opentelemetry-proto` from PyPI): the resource names the service and host, there is a
/// profile per sample type, and the CPU of `spin` is there.
#[test]
fn profiles_arrive_as_otlp_at_a_collector() -> Result<()> {
    if !receivers_installed()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let receiver = Receiver::start(dir.path(), port, 0)?;
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&["--period", "2s", "--label", "env=e2e", "--otlp-url", &url])?;
    Workload::start(PYENV_PYTHON_3_11, "spin.py", &["2"])?.wait()?;
    let run = agent.stop()?;
    let mut spin_cpu = 0.0;
    let mut types = std::collections::BTreeSet::new();
    for (record, _) in receiver.uploads()? {
        ensure!(record["path"] == "/v1development/profiles", "path {}", record["path"]);
        for resource in record["resources"].as_array().context("resources")? {
            let attributes = &resource["attributes"];
            if attributes["service.name"] != "spin.py" {
                continue;
            }
            ensure!(attributes["env"] == "e2e" && attributes["host.name"].is_string(), "resource {attributes}");
            for profile in resource["profiles"].as_array().context("profiles")? {
                types.insert(format!(
                    "{}/{}",
                    profile["type"].as_str().unwrap_or("?"),
                    profile["unit"].as_str().unwrap_or("?")
                ));
                if profile["type"] == "cpu" {
                    spin_cpu += profile["functions"]["spin"].as_f64().unwrap_or(0.0);
                }
            }
        }
    }
    ensure!(spin_cpu >= 0.5e9, "{spin_cpu} ns of CPU in spin arrived, for 2 s burnt; agent output:\n{}", run.log);
    for expected in ["samples/count", "cpu/nanoseconds", "wall/nanoseconds", "off_cpu/nanoseconds"] {
        ensure!(types.contains(expected), "no {expected} profile: {types:?}");
    }
    Ok(())
}

/// A backend that takes an upload and never answers: the agent gives up after
/// `--upload-timeout`, retries, and the upload arrives all the same.
#[test]
fn a_backend_that_hangs_is_retried_after_the_upload_timeout() -> Result<()> {
    if !receivers_installed()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let receiver = Receiver::start_with(dir.path(), &[&port.to_string(), "--hang-first", "1"], &port.to_string())?;
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&["--period", "1s", "--pyroscope-url", &url, "--upload-timeout", "1s"])?;
    Workload::start(PYENV_PYTHON_3_11, "spin.py", &["1"])?.wait()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while of_application(receiver.uploads()?, "spin.py").is_empty() {
        ensure!(std::time::Instant::now() < deadline, "nothing arrived; agent output:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.stop()?.log;
    ensure!(log.contains("no answer within 1s"), "the hung upload was not timed out; agent output:\n{log}");
    Ok(())
}
