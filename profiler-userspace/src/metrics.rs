//! The agent's own health, in Prometheus' text format on `/metrics` (and
//! `ok` on `/healthz`), for whoever runs it: samples taken and lost, CPython
//! processes profiled, and per sink what was delivered, retried, refused,
//! dropped and is waiting.

use std::{
    fmt::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use http_body_util::Full;
use hyper::{body::Bytes, Response};

use crate::{
    export::sinks::Shipper,
    kernel::{
        features::{Features, State},
        KernelStats,
    },
};

/// Counters the agent keeps up to date.
#[derive(Default)]
pub struct Metrics {
    samples: AtomicU64,
    samples_dropped: AtomicU64,
    events_dropped: AtomicU64,
    off_cpu_samples: AtomicU64,
    alloc_samples: AtomicU64,
    python_processes: AtomicU64,
    profiles: AtomicU64,
    /// Per dimension, whether it runs and, if refused, why; set once.
    features: std::sync::OnceLock<Vec<(String, u64)>>,
}

impl Metrics {
    pub fn set_kernel(&self, stats: &KernelStats) {
        self.samples.store(stats.samples, Ordering::Relaxed);
        self.samples_dropped.store(stats.samples_dropped, Ordering::Relaxed);
        self.events_dropped.store(stats.events_dropped, Ordering::Relaxed);
        self.off_cpu_samples.store(stats.off_cpu_samples, Ordering::Relaxed);
        self.alloc_samples.store(stats.alloc_samples, Ordering::Relaxed);
    }

    pub fn set_python_processes(&self, count: usize) {
        self.python_processes.store(count as u64, Ordering::Relaxed);
    }

    pub fn set_features(&self, features: &Features) {
        let values = features
            .each()
            .into_iter()
            .map(|(name, state)| {
                let reason = match state {
                    State::On => "",
                    State::NotAsked => "not asked",
                    State::Refused(why) => why,
                };
                (format!("{{feature=\"{name}\",reason=\"{}\"}}", label_value(reason)), u64::from(state.is_on()))
            })
            .collect();
        let _ = self.features.set(values);
    }

    pub fn add_profiles(&self, count: u64) {
        self.profiles.fetch_add(count, Ordering::Relaxed);
    }

    /// The text of `/metrics`.
    fn render(&self, sinks: &[Arc<Shipper>]) -> String {
        let mut text = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, values: &[(String, u64)]| {
            let _ = writeln!(text, "# HELP ferroscope_{name} {help}\n# TYPE ferroscope_{name} {kind}");
            for (labels, value) in values {
                let _ = writeln!(text, "ferroscope_{name}{labels} {value}");
            }
        };
        let one = |counter: &AtomicU64| vec![(String::new(), counter.load(Ordering::Relaxed))];
        metric("samples_total", "counter", "CPU samples taken.", &one(&self.samples));
        metric(
            "samples_dropped_total",
            "counter",
            "Samples lost: the ring buffer was full.",
            &one(&self.samples_dropped),
        );
        metric(
            "events_dropped_total",
            "counter",
            "Process events lost: the ring buffer was full.",
            &one(&self.events_dropped),
        );
        metric("off_cpu_samples_total", "counter", "Off-CPU samples (kept waits).", &one(&self.off_cpu_samples));
        metric("alloc_samples_total", "counter", "Allocation samples (--memory).", &one(&self.alloc_samples));
        metric("python_processes", "gauge", "CPython processes being profiled.", &one(&self.python_processes));
        let features = self.features.get().cloned().unwrap_or_default();
        metric("feature_enabled", "gauge", "Whether a dimension runs (1) and why not (reason).", &features);
        metric("profiles_total", "counter", "Profiles made (one per application and period).", &one(&self.profiles));
        let per_sink = |value: &dyn Fn(&Shipper) -> u64| -> Vec<(String, u64)> {
            sinks.iter().map(|sink| (format!("{{sink=\"{}\"}}", sink.name()), value(sink))).collect()
        };
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        metric(
            "uploads_delivered_total",
            "counter",
            "Profiles a backend took.",
            &per_sink(&|sink| count(&sink.stats.delivered)),
        );
        metric(
            "upload_retries_total",
            "counter",
            "Failed deliveries, retried.",
            &per_sink(&|sink| count(&sink.stats.retries)),
        );
        metric(
            "uploads_refused_total",
            "counter",
            "Profiles a backend refused for good.",
            &per_sink(&|sink| count(&sink.stats.refused)),
        );
        metric(
            "uploads_dropped_total",
            "counter",
            "Profiles dropped from a full spool.",
            &per_sink(&|sink| count(&sink.stats.dropped)),
        );
        metric("spool_uploads", "gauge", "Profiles waiting in the spool.", &per_sink(&|sink| sink.waiting().0));
        metric("spool_bytes", "gauge", "Bytes waiting in the spool.", &per_sink(&|sink| sink.waiting().1));
        text
    }
}

/// `text` as a Prometheus label value: backslashes, quotes and newlines
/// escaped.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `/metrics` and `/healthz` on `address` until the agent stops.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>, sinks: Vec<Arc<Shipper>>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("cannot serve metrics on {address}: {error}"))?;
    let sinks = Arc::new(sinks);
    crate::httpd::spawn(listener, move |request| {
        let response = match request.uri().path() {
            "/metrics" => Response::builder()
                .header("Content-Type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(metrics.render(&sinks)))),
            "/healthz" => Response::builder().body(Full::new(Bytes::from("ok\n"))),
            _ => Response::builder().status(404).body(Full::new(Bytes::from("not found\n"))),
        };
        std::future::ready(response.expect("a valid response"))
    });
    Ok(())
}
