//! Settings of the agent: command-line flags, an optional TOML file with the
//! same keys, and defaults, in that order of precedence.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::{
    export::sinks::{Auth, Endpoint},
    process::kubernetes::KubernetesSettings,
};

pub const DEFAULT_FREQUENCY: u64 = 100;
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(45);
pub const DEFAULT_OUTPUT_DIR: &str = "./profiles";
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9464";
const DEFAULT_CONTROL_SOCKET: &str = "/run/ferroscope/control.sock";
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
/// Mean bytes between two sampled allocations (Go's default).
pub const DEFAULT_MEMORY_SAMPLE_BYTES: u64 = 512 * 1024;
/// Pod labels that `--kubernetes` copies onto profiles unless told which.
const DEFAULT_POD_LABELS: [&str; 2] = ["app", "app.kubernetes.io/name"];
/// The kernel refuses cpu-clock sampling much faster than this.
const MAX_FREQUENCY: u64 = 1000;

/// Flags of `ferroscope agent`.
#[derive(Args, Debug, Default)]
pub struct AgentArgs {
    /// Profile only this process (repeatable); the agent stops when they
    /// have all exited. Without it every process on the host is profiled,
    /// including those started later.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// CPU samples per second on each CPU [default: 100]
    #[arg(long, value_name = "HZ")]
    pub frequency: Option<u64>,

    /// Do not measure wall and off-CPU time. By default every thread of a
    /// CPython process (or of a `--pid` target) adds up to its wall-clock
    /// time: CPU samples plus the time it spends off the CPU, with what it
    /// waits for (the `wait` label: lock, sleep, io, preempted, other)
    #[arg(long)]
    pub no_wall: bool,

    /// Do not unwind native stacks from the `.eh_frame` tables of the
    /// processes' files. By default the kernel walks whole native stacks
    /// (the C code Python calls, under the Python function that called it),
    /// with tables the agent loads for each file (24 MiB of kernel memory at
    /// most); without it, native stacks stop after the frames the kernel
    /// finds without frame pointers
    #[arg(long)]
    pub no_native_unwind: bool,

    /// Profile memory: allocations, allocated bytes and heap in use (live at
    /// the end of each period) by Python stack, sampled by bytes with
    /// uprobes on CPython's allocator. Objects over 512 bytes are sampled
    /// one by one; small ones by the pymalloc arenas (1 MiB) they fill.
    /// Off by default: it costs a probe per allocation over 512 bytes, about
    /// 1 µs each: 1-2% on most programs, much more on those that make
    /// 100,000 such allocations a second (docs/benchmarks.md)
    #[arg(long)]
    pub memory: bool,

    /// With `--memory`: mean bytes allocated between two samples; smaller
    /// is more precise and costs more [default: 524288]
    #[arg(long, value_name = "BYTES")]
    pub memory_sample_bytes: Option<u64>,

    /// Length of a profile: samples are aggregated and written once per
    /// period, e.g. `45s`, `500ms`, `2m` [default: 45s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub period: Option<Duration>,

    /// Stop after this long (the last, partial period is written) [default:
    /// run until SIGINT or SIGTERM]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Where profiles go: `<DIR>/<application>/<start>-<end>.pb.gz` (pprof)
    /// and `.svg` (flame graph) [default: ./profiles, unless a backend is
    /// set]
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Send every profile to this Pyroscope (Grafana Pyroscope, Grafana
    /// Cloud Profiles) over its HTTP ingest API, e.g.
    /// `http://pyroscope:4040`
    #[arg(long, value_name = "URL")]
    pub pyroscope_url: Option<String>,

    /// Pyroscope: basic auth user (Grafana Cloud: the stack's user id)
    #[arg(long, value_name = "USER")]
    pub pyroscope_user: Option<String>,

    /// Pyroscope: basic auth password, better from the environment
    #[arg(long, value_name = "PASSWORD", env = "FERROSCOPE_PYROSCOPE_PASSWORD", hide_env_values = true)]
    pub pyroscope_password: Option<String>,

    /// Pyroscope: bearer token, better from the environment
    #[arg(long, value_name = "TOKEN", env = "FERROSCOPE_PYROSCOPE_TOKEN", hide_env_values = true)]
    pub pyroscope_token: Option<String>,

    /// Pyroscope: tenant (`X-Scope-OrgID`) of a multi-tenant backend
    #[arg(long, value_name = "TENANT")]
    pub pyroscope_tenant: Option<String>,

    /// Send every profile to a Datadog-style profiling intake: the Datadog
    /// agent (`http://localhost:8126`) or the Blackfire agent
    /// (`unix:///var/run/blackfire/agent.sock`)
    #[arg(long, value_name = "URL")]
    pub datadog_url: Option<String>,

    /// Datadog: `DD-API-KEY`, for an intake that wants one
    #[arg(long, value_name = "KEY", env = "FERROSCOPE_DATADOG_API_KEY", hide_env_values = true)]
    pub datadog_api_key: Option<String>,

    /// Send every profile to an OpenTelemetry Collector, as OTLP profiles
    /// over HTTP with protobuf (`POST <URL>/v1development/profiles`), e.g.
    /// `http://collector:4318`
    #[arg(long, value_name = "URL")]
    pub otlp_url: Option<String>,

    /// Serve the agent's own metrics (Prometheus text format) on
    /// `http://ADDRESS/metrics`, and `/healthz`; without ADDRESS on loopback,
    /// `127.0.0.1:9464` [default: not served]
    #[arg(long, value_name = "ADDRESS", num_args = 0..=1, default_missing_value = DEFAULT_METRICS_ADDRESS)]
    pub metrics_address: Option<SocketAddr>,

    /// The Unix socket through which processes name and label themselves
    /// and stop their profiling (the Python API) [default:
    /// /run/ferroscope/control.sock]
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Time an upload may take before it is retried [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub upload_timeout: Option<Duration>,

    /// Where profiles wait until a backend takes them, kept across restarts
    /// [default: <output-dir>/.spool, or ./profiles/.spool]
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Bytes the spool may hold per backend; past it the oldest profiles go
    /// (counted and reported) [default: 268435456]
    #[arg(long, value_name = "BYTES")]
    pub spool_max_bytes: Option<u64>,

    /// Name every profile with this application name, instead of each
    /// process's own (its entry script or module, such as `app.py` or
    /// `gunicorn`; the executable's name for non-Python processes)
    #[arg(long, value_name = "NAME")]
    pub application_name: Option<String>,

    /// Add this label to every sample (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Label the profiles of processes in Kubernetes pods with `namespace`,
    /// `pod`, `container` and the pod labels of `--kubernetes-pod-label`,
    /// from the API server (the pod's service account, or KUBECONFIG),
    /// watching only this node's pods. Every profile gets a `node` label.
    /// Without an answer from the API server, profiles ship with what is
    /// known (`container_id`, `node`)
    #[arg(long)]
    pub kubernetes: bool,

    /// With `--kubernetes`: this node's name (the DaemonSet passes
    /// `spec.nodeName`) [default: the host name]
    #[arg(long, value_name = "NAME", env = "FERROSCOPE_NODE_NAME")]
    pub kubernetes_node: Option<String>,

    /// With `--kubernetes`: a pod label to copy onto profiles (repeatable);
    /// `app.kubernetes.io/name` becomes the label `app_kubernetes_io_name`
    /// [default: app, app.kubernetes.io/name]
    #[arg(long = "kubernetes-pod-label", value_name = "KEY")]
    pub kubernetes_pod_labels: Vec<String>,

    /// Read settings from this TOML file; flags given on the command line win.
    /// Keys: pids, frequency, wall, native_unwind, memory, memory_sample_bytes, period,
    /// duration, output_dir, application_name, upload_timeout,
    /// control_socket, metrics_address, spool_dir,
    /// spool_max_bytes, a [labels] table, a [pyroscope] table (url, user,
    /// password, token, tenant), a [datadog] table (url, api_key), an
    /// [otlp] table (url) and a [kubernetes] table (enabled, node,
    /// pod_labels).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The TOML configuration file: the same settings as the flags.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    pids: Vec<u32>,
    frequency: Option<u64>,
    wall: Option<bool>,
    native_unwind: Option<bool>,
    memory: Option<bool>,
    memory_sample_bytes: Option<u64>,
    period: Option<String>,
    duration: Option<String>,
    output_dir: Option<PathBuf>,
    application_name: Option<String>,
    upload_timeout: Option<String>,
    control_socket: Option<PathBuf>,
    metrics_address: Option<SocketAddr>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    pyroscope: Option<FilePyroscope>,
    datadog: Option<FileDatadog>,
    otlp: Option<FileOtlp>,
    kubernetes: Option<FileKubernetes>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileKubernetes {
    #[serde(default)]
    enabled: bool,
    node: Option<String>,
    pod_labels: Option<Vec<String>>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileOtlp {
    url: String,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileDatadog {
    url: String,
    api_key: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FilePyroscope {
    url: String,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    tenant: Option<String>,
}

/// A Pyroscope to send profiles to.
#[derive(Debug, Clone, PartialEq)]
pub struct PyroscopeSettings {
    pub url: String,
    pub auth: Auth,
    pub tenant: Option<String>,
}

/// Settings after merging flags, file and defaults, all validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub pids: Vec<u32>,
    pub frequency: u64,
    /// Wall and off-CPU time of profiled threads.
    pub wall: bool,
    /// Whole native stacks, from `.eh_frame` tables.
    pub native_unwind: bool,
    /// Memory profiling: the mean bytes between two sampled allocations.
    pub memory: Option<u64>,
    pub period: Duration,
    pub duration: Option<Duration>,
    /// The local directory sink, if on.
    pub output_dir: Option<PathBuf>,
    pub application_name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub pyroscope: Option<PyroscopeSettings>,
    /// A Datadog-style intake, and its API key.
    pub datadog: Option<(Endpoint, Option<String>)>,
    /// An OpenTelemetry Collector's OTLP/HTTP address.
    pub otlp_url: Option<String>,
    pub upload_timeout: Duration,
    pub metrics_address: Option<SocketAddr>,
    pub control_socket: PathBuf,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub kubernetes: Option<KubernetesSettings>,
}

impl Settings {
    /// CPU time one sample stands for.
    pub fn sample_period_ns(&self) -> u64 {
        1_000_000_000 / self.frequency
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|error| format!("`{text}` is not a duration ({error}); write it like 45s, 500ms or 2m"))?;
    if duration.is_zero() {
        return Err("a duration must be longer than zero".into());
    }
    Ok(duration)
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    validate_label(key, value)?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Labels that every sample carries already.
const RESERVED_LABELS: [&str; 6] = ["pid", "container_pid", "container_id", "tid", "thread_name", "process_name"];

/// Label names follow Prometheus' rules, plus `-` (the Blackfire API's
/// examples use it; the Pyroscope sink turns it into `_`); values must be
/// non-empty single-line text.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    if key.len() > MAX_LABEL_NAME_BYTES || value.len() > MAX_LABEL_VALUE_BYTES {
        return Err(format!(
            "label `{}`: names are at most {MAX_LABEL_NAME_BYTES} bytes and values {MAX_LABEL_VALUE_BYTES} (Pyroscope's \
             limits)",
            key.chars().take(40).collect::<String>()
        ));
    }
    let mut chars = key.chars();
    let valid_key = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_key {
        return Err(format!(
            "label name `{key}` must start with a letter or `_` and hold only letters, digits, `_`, `.` and `-`"
        ));
    }
    if RESERVED_LABELS.contains(&key) {
        return Err(format!("label name `{key}` is set by ferroscope on every sample; pick another name"));
    }
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(format!("label `{key}` needs a non-empty value without control characters"));
    }
    Ok(())
}

/// Pyroscope's default limits on a label (`max_label_name_length`, `max_label_value_length`).
pub const MAX_LABEL_NAME_BYTES: usize = 1024;
pub const MAX_LABEL_VALUE_BYTES: usize = 2048;

impl AgentArgs {
    /// Merges the flags with the config file, if any, and the defaults.
    pub fn settings(&self) -> Result<Settings> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None => FileConfig::default(),
        };
        let origin = |key: &str| match &self.config {
            Some(path) => format!("`{key}` in {}", path.display()),
            None => format!("`--{}`", key.replace('_', "-")),
        };
        let file_duration = |key: &str, value: &Option<String>| -> Result<Option<Duration>> {
            value
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|error| anyhow::anyhow!("{}: {error}", origin(key)))
        };
        let frequency = self.sampling_frequency(file.frequency, &origin)?;
        let (labels, kubernetes) = self.labels_and_kubernetes(file.labels, file.kubernetes, &origin)?;
        let memory = self.memory_sampling(file.memory, file.memory_sample_bytes, &origin)?;
        let application_name = self.application_name.clone().or(file.application_name);
        if application_name.as_deref().is_some_and(|name| name.trim().is_empty()) {
            bail!("{}: the application name is empty", origin("application_name"));
        }
        let pyroscope = self.pyroscope(file.pyroscope, &origin)?;
        let datadog = self.datadog(file.datadog, &origin)?;
        // The local directory is the default sink: with a backend, only if asked for.
        let output_dir = self.output_dir.clone().or(file.output_dir);
        let spool_dir = self
            .spool_dir
            .clone()
            .or(file.spool_dir)
            .unwrap_or_else(|| output_dir.clone().unwrap_or_else(|| DEFAULT_OUTPUT_DIR.into()).join(".spool"));
        let otlp_url = self.otlp(file.otlp, &origin)?;
        let output_dir = match output_dir {
            None if pyroscope.is_none() && datadog.is_none() && otlp_url.is_none() => Some(DEFAULT_OUTPUT_DIR.into()),
            dir => dir,
        };
        Ok(Settings {
            pids: if self.pids.is_empty() { file.pids } else { self.pids.clone() },
            frequency,
            wall: !self.no_wall && file.wall.unwrap_or(true),
            native_unwind: !self.no_native_unwind && file.native_unwind.unwrap_or(true),
            memory,
            period: match self.period {
                Some(period) => period,
                None => file_duration("period", &file.period)?.unwrap_or(DEFAULT_PERIOD),
            },
            duration: match self.duration {
                Some(duration) => Some(duration),
                None => file_duration("duration", &file.duration)?,
            },
            output_dir,
            application_name,
            labels,
            pyroscope,
            datadog,
            otlp_url,
            upload_timeout: match self.upload_timeout {
                Some(timeout) => timeout,
                None => file_duration("upload_timeout", &file.upload_timeout)?.unwrap_or(DEFAULT_UPLOAD_TIMEOUT),
            },
            metrics_address: self.metrics_address.or(file.metrics_address),
            control_socket: self
                .control_socket
                .clone()
                .or(file.control_socket)
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            spool_dir,
            spool_max_bytes: self.spool_max_bytes.or(file.spool_max_bytes).unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
            kubernetes,
        })
    }

    /// CPU samples per second, from the flag, the file or the default; in
    /// the range the kernel accepts.
    fn sampling_frequency(&self, file: Option<u64>, origin: &dyn Fn(&str) -> String) -> Result<u64> {
        let frequency = self.frequency.or(file).unwrap_or(DEFAULT_FREQUENCY);
        let frequency_origin = if self.frequency.is_some() { "`--frequency`".to_owned() } else { origin("frequency") };
        if frequency == 0 || frequency > MAX_FREQUENCY {
            bail!("{frequency_origin}: {frequency} Hz is out of range: use 1 to {MAX_FREQUENCY}");
        }
        Ok(frequency)
    }

    /// The labels of every sample (the file's, checked, then the flags'),
    /// with `host` (and `node` in Kubernetes) added unless set; and the
    /// Kubernetes settings, if on.
    fn labels_and_kubernetes(
        &self,
        file_labels: BTreeMap<String, String>,
        file_kubernetes: Option<FileKubernetes>,
        origin: &dyn Fn(&str) -> String,
    ) -> Result<(BTreeMap<String, String>, Option<KubernetesSettings>)> {
        let mut labels = file_labels;
        for (key, value) in &labels {
            validate_label(key, value).map_err(|error| anyhow::anyhow!("{}: {error}", origin("labels")))?;
        }
        labels.extend(self.labels.iter().cloned());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|host| host.trim().to_owned()).ok();
        let kubernetes = self.kubernetes_settings(file_kubernetes.unwrap_or_default(), host.clone());
        // Which machine a profile comes from, unless the user says otherwise:
        // in a pod, the host name is the pod's.
        let host = kubernetes.as_ref().map(|kubernetes| kubernetes.node.clone()).or(host);
        if let Some(host) = host.filter(|host| !host.is_empty()) {
            if kubernetes.is_some() {
                labels.entry("node".to_owned()).or_insert_with(|| host.clone());
            }
            labels.entry("host".to_owned()).or_insert(host);
        }
        if let Some(kubernetes) = &kubernetes {
            if kubernetes.node.is_empty() {
                bail!("{}: the node name is empty", origin("kubernetes.node"));
            }
        }
        Ok((labels, kubernetes))
    }

    /// Kubernetes settings from the flags, else the file's `[kubernetes]`
    /// table, if either turns it on; the node defaults to `host`.
    fn kubernetes_settings(&self, file: FileKubernetes, host: Option<String>) -> Option<KubernetesSettings> {
        (self.kubernetes || file.enabled).then(|| KubernetesSettings {
            node: self.kubernetes_node.clone().or(file.node).or(host).unwrap_or_default(),
            pod_labels: match (&self.kubernetes_pod_labels[..], file.pod_labels) {
                ([], Some(file)) => file,
                ([], None) => DEFAULT_POD_LABELS.iter().map(|key| key.to_string()).collect(),
                (flags, _) => flags.to_vec(),
            },
        })
    }

    /// Memory profiling's mean bytes between samples, if on; the sampling
    /// size is checked even when it is off.
    fn memory_sampling(
        &self,
        file_memory: Option<bool>,
        file_sample_bytes: Option<u64>,
        origin: &dyn Fn(&str) -> String,
    ) -> Result<Option<u64>> {
        let memory_sample_bytes = self.memory_sample_bytes.or(file_sample_bytes).unwrap_or(DEFAULT_MEMORY_SAMPLE_BYTES);
        if memory_sample_bytes == 0 {
            let origin = if self.memory_sample_bytes.is_some() {
                "`--memory-sample-bytes`".to_owned()
            } else {
                origin("memory_sample_bytes")
            };
            bail!("{origin}: must be at least 1 byte");
        }
        Ok((self.memory || file_memory.unwrap_or(false)).then_some(memory_sample_bytes))
    }

    /// The Datadog-style intake from the flags, else from the file's
    /// `[datadog]` table; its URL checked.
    fn datadog(
        &self,
        file: Option<FileDatadog>,
        origin: &dyn Fn(&str) -> String,
    ) -> Result<Option<(Endpoint, Option<String>)>> {
        let (url, key, origin) = match (&self.datadog_url, file) {
            (Some(url), _) => (url.clone(), self.datadog_api_key.clone(), "`--datadog-url`".to_owned()),
            (None, Some(file)) => (file.url, file.api_key, origin("datadog.url")),
            (None, None) => return Ok(None),
        };
        match Endpoint::parse(&url) {
            Some(endpoint) => Ok(Some((endpoint, key))),
            None => bail!("{origin}: `{url}` is not an http://, https:// or unix:///path URL"),
        }
    }

    /// The OpenTelemetry Collector from the flags, else from the file's
    /// `[otlp]` table; its URL checked.
    fn otlp(&self, file: Option<FileOtlp>, origin: &dyn Fn(&str) -> String) -> Result<Option<String>> {
        let (url, origin) = match (&self.otlp_url, file) {
            (Some(url), _) => (url.clone(), "`--otlp-url`".to_owned()),
            (None, Some(file)) => (file.url, origin("otlp.url")),
            (None, None) => return Ok(None),
        };
        if !reqwest::Url::parse(&url).is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.has_host()) {
            bail!("{origin}: `{url}` is not an http:// or https:// URL");
        }
        Ok(Some(url))
    }

    /// The Pyroscope backend from the flags, else from the file's
    /// `[pyroscope]` table; its URL and credentials checked.
    fn pyroscope(
        &self,
        file: Option<FilePyroscope>,
        origin: &dyn Fn(&str) -> String,
    ) -> Result<Option<PyroscopeSettings>> {
        let (url, user, password, token, tenant, origin) = match (&self.pyroscope_url, file) {
            (Some(url), _) => (
                url.clone(),
                self.pyroscope_user.clone(),
                self.pyroscope_password.clone(),
                self.pyroscope_token.clone(),
                self.pyroscope_tenant.clone(),
                Box::new(|key: &str| format!("`--pyroscope-{}`", key.replace('_', "-"))) as Box<dyn Fn(&str) -> String>,
            ),
            (None, Some(file)) => (
                file.url,
                file.user,
                file.password,
                file.token,
                file.tenant,
                Box::new(|key: &str| origin(&format!("pyroscope.{key}"))) as Box<dyn Fn(&str) -> String>,
            ),
            (None, None) => return Ok(None),
        };
        match reqwest::Url::parse(&url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {}
            _ => bail!("{}: `{url}` is not an http:// or https:// URL", origin("url")),
        }
        let auth = match (user, password, token) {
            (None, None, None) => Auth::None,
            (Some(user), Some(password), None) => Auth::Basic { user, password },
            (None, None, Some(token)) => Auth::Bearer(token),
            (Some(_), None, None) => bail!("{}: a user needs a password", origin("password")),
            (None, Some(_), None) => bail!("{}: a password needs a user", origin("user")),
            _ => bail!("{}: give either a user and password or a token, not both", origin("token")),
        };
        Ok(Some(PyroscopeSettings { url, auth, tenant }))
    }
}

fn read_config(path: &Path) -> Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    // toml's errors name the key and show the line.
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each call gets its own file: tests run in parallel.
    fn config_file(text: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ferroscope-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let settings = AgentArgs::default().settings().unwrap();
        assert_eq!(settings.frequency, 100);
        assert_eq!(settings.period, Duration::from_secs(45));
        assert_eq!(settings.output_dir, Some(PathBuf::from("./profiles")));
        assert_eq!(settings.pyroscope, None);
        assert_eq!(settings.upload_timeout, Duration::from_secs(10));
        assert_eq!(settings.spool_dir, PathBuf::from("./profiles/.spool"));
        assert_eq!(settings.sample_period_ns(), 10_000_000);
        assert_eq!(settings.duration, None);
        assert!(settings.wall);
        assert!(settings.native_unwind);
        assert_eq!(settings.memory, None);
        let no_unwind = AgentArgs { no_native_unwind: true, ..Default::default() };
        assert!(!no_unwind.settings().unwrap().native_unwind);
        let file_off = AgentArgs { config: Some(config_file("native_unwind = false\n")), ..Default::default() };
        assert!(!file_off.settings().unwrap().native_unwind);
    }

    #[test]
    fn kubernetes_labels_profiles_with_the_node() {
        assert_eq!(AgentArgs::default().settings().unwrap().kubernetes, None);
        let flags = AgentArgs { kubernetes: true, kubernetes_node: Some("node-a".into()), ..Default::default() };
        let settings = flags.settings().unwrap();
        let kubernetes = settings.kubernetes.unwrap();
        assert_eq!(kubernetes.node, "node-a");
        assert_eq!(kubernetes.pod_labels, ["app", "app.kubernetes.io/name"]);
        assert_eq!(settings.labels["node"], "node-a");
        assert_eq!(settings.labels["host"], "node-a");
        let file = config_file("[kubernetes]\nenabled = true\nnode = \"n\"\npod_labels = [\"team\"]\n");
        let from_file = AgentArgs { config: Some(file), ..Default::default() }.settings().unwrap();
        assert_eq!(from_file.kubernetes.unwrap().pod_labels, ["team"]);
        let typo = AgentArgs { config: Some(config_file("[kubernetes]\nnodes = \"n\"\n")), ..Default::default() };
        assert!(format!("{:#}", typo.settings().unwrap_err()).contains("nodes"));
    }

    #[test]
    fn a_backend_replaces_the_local_directory_unless_both_are_asked_for() {
        let args = AgentArgs { pyroscope_url: Some("http://pyroscope:4040".into()), ..Default::default() };
        let settings = args.settings().unwrap();
        assert_eq!(settings.output_dir, None);
        let pyroscope = settings.pyroscope.unwrap();
        assert_eq!((pyroscope.url.as_str(), &pyroscope.auth), ("http://pyroscope:4040", &Auth::None));
        let both = AgentArgs {
            pyroscope_url: Some("https://profiles.example".into()),
            pyroscope_token: Some("t".into()),
            output_dir: Some("/var/lib/ferroscope".into()),
            ..Default::default()
        };
        let settings = both.settings().unwrap();
        assert_eq!(settings.output_dir, Some(PathBuf::from("/var/lib/ferroscope")));
        assert_eq!(settings.spool_dir, PathBuf::from("/var/lib/ferroscope/.spool"));
        assert_eq!(settings.pyroscope.unwrap().auth, Auth::Bearer("t".into()));
        let file =
            config_file("[pyroscope]\nurl = \"http://p:4040\"\nuser = \"u\"\npassword = \"p\"\ntenant = \"t1\"\n");
        let from_file = AgentArgs { config: Some(file), ..Default::default() }.settings().unwrap().pyroscope.unwrap();
        assert_eq!(from_file.auth, Auth::Basic { user: "u".into(), password: "p".into() });
        assert_eq!(from_file.tenant.as_deref(), Some("t1"));
    }

    #[test]
    fn backend_errors_name_the_flag_or_key() {
        let bad_url = AgentArgs { pyroscope_url: Some("pyroscope:4040".into()), ..Default::default() };
        assert!(bad_url.settings().unwrap_err().to_string().contains("`--pyroscope-url`"));
        let lonely_user = AgentArgs {
            pyroscope_url: Some("http://p".into()),
            pyroscope_user: Some("u".into()),
            ..Default::default()
        };
        assert!(lonely_user.settings().unwrap_err().to_string().contains("`--pyroscope-password`"));
        let file = config_file("[pyroscope]\nurl = \"ftp://p\"\n");
        let error = AgentArgs { config: Some(file), ..Default::default() }.settings().unwrap_err();
        assert!(error.to_string().contains("`pyroscope.url`"), "{error}");
    }

    #[test]
    fn metrics_are_served_on_loopback_unless_told_otherwise() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: AgentArgs,
        }
        let parse = |flags: &[&str]| Cli::try_parse_from(["agent"].iter().chain(flags)).unwrap().args.metrics_address;
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--metrics-address"]), Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(parse(&["--metrics-address", "0.0.0.0:9100"]), Some("0.0.0.0:9100".parse().unwrap()));
    }

    #[test]
    fn memory_is_off_unless_asked_for() {
        let on = AgentArgs { memory: true, ..Default::default() };
        assert_eq!(on.settings().unwrap().memory, Some(DEFAULT_MEMORY_SAMPLE_BYTES));
        let file = config_file("memory = true\nmemory_sample_bytes = 65536\n");
        let from_file = AgentArgs { config: Some(file), ..Default::default() };
        assert_eq!(from_file.settings().unwrap().memory, Some(65536));
        let zero = AgentArgs { config: Some(config_file("memory_sample_bytes = 0\n")), ..Default::default() };
        assert!(format!("{:#}", zero.settings().unwrap_err()).contains("`memory_sample_bytes`"));
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").unwrap_err().contains("45s"));
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn flags_win_over_the_file_and_labels_merge() {
        let path = config_file("frequency = 50\nperiod = \"10s\"\n[labels]\nenv = \"prod\"\nteam = \"a\"\n");
        let args = AgentArgs {
            frequency: Some(200),
            labels: vec![("team".into(), "b".into())],
            config: Some(path),
            ..Default::default()
        };
        let settings = args.settings().unwrap();
        assert_eq!(settings.frequency, 200);
        assert!(settings.wall);
        let no_wall = AgentArgs { no_wall: true, ..Default::default() };
        assert!(!no_wall.settings().unwrap().wall);
        let file_off = AgentArgs { config: Some(config_file("wall = false\n")), ..Default::default() };
        assert!(!file_off.settings().unwrap().wall);
        assert_eq!(settings.period, Duration::from_secs(10));
        assert_eq!(settings.labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(settings.labels.get("team").map(String::as_str), Some("b"));
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = AgentArgs { config: Some(config_file("frequncy = 5\n")), ..Default::default() };
        assert!(format!("{:#}", unknown.settings().unwrap_err()).contains("frequncy"));
        let bad_period = AgentArgs { config: Some(config_file("period = \"often\"\n")), ..Default::default() };
        assert!(format!("{:#}", bad_period.settings().unwrap_err()).contains("`period`"));
        let zero = AgentArgs { frequency: Some(0), ..Default::default() };
        assert!(zero.settings().unwrap_err().to_string().contains("--frequency"));
        assert!(parse_label("noequals").is_err());
        assert!(parse_label("1abc=x").unwrap_err().contains("1abc"));
        assert!(parse_label("env=").is_err());
        assert!(parse_label("pid=7").unwrap_err().contains("`pid`"));
        assert_eq!(parse_label("env=prod"), Ok(("env".into(), "prod".into())));
    }
}
