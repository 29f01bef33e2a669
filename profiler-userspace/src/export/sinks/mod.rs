//! Where profiles go: the local directory (the default), and backends
//! reached over their own protocols, each behind a [`Shipper`] that spools
//! to disk first and delivers in order, retrying, so that a backend that is
//! down costs no profile.

mod datadog;
mod fanout;
mod local;
mod otlp;
mod pyroscope;
mod shipper;
mod spool;

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

pub use datadog::{Datadog, Endpoint};
pub use fanout::Sinks;
pub use local::LocalDir;
pub use otlp::Otlp;
pub use pyroscope::{Auth, Pyroscope};
use serde::{Deserialize, Serialize};
pub use shipper::Shipper;

use crate::aggregate::PeriodProfile;

/// One period's profile of one application, encoded once for every sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub application: String,
    /// Labels of the whole profile (static ones, the host's, the
    /// process's own); samples carry their own (pid, thread, ...).
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub from: u64,
    pub until: u64,
    /// CPU samples per second.
    pub sample_rate: u64,
    /// `(type, unit)` of each sample value, as in the pprof.
    pub sample_types: Vec<(String, String)>,
    /// The upload timeout the profiled process asked for (seconds), if it
    /// did.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// The gzipped pprof.
    #[serde(skip)]
    pub pprof_gz: Vec<u8>,
}

impl Upload {
    pub fn new(profile: &PeriodProfile, pprof_gz: Vec<u8>) -> Upload {
        let seconds = |time: SystemTime| time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        Upload {
            application: profile.application.clone(),
            labels: profile.labels.clone(),
            from: seconds(profile.start),
            until: seconds(profile.end).max(seconds(profile.start) + 1),
            sample_rate: 1_000_000_000 / profile.sample_period_ns.max(1),
            sample_types: profile
                .sample_types()
                .map(|kind| (kind.row().name.to_owned(), kind.row().unit.to_owned()))
                .collect(),
            timeout_secs: profile.upload_timeout.map(|timeout| timeout.as_secs_f64()),
            pprof_gz,
        }
    }
}

/// A backend that takes uploads.
pub enum Backend {
    Pyroscope(Pyroscope),
    Datadog(Datadog),
    Otlp(Otlp),
}

/// Why a delivery failed: worth retrying (the backend is down, slow or
/// overloaded) or not (it refuses this upload for good).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    Retry(String),
    #[error("refused: {0}")]
    Refused(String),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Pyroscope(_) => "pyroscope",
            Backend::Datadog(_) => "datadog",
            Backend::Otlp(_) => "otlp",
        }
    }

    async fn deliver(&self, upload: &Upload) -> Result<(), DeliveryError> {
        match self {
            Backend::Pyroscope(pyroscope) => pyroscope.deliver(upload).await,
            Backend::Datadog(datadog) => datadog.deliver(upload).await,
            Backend::Otlp(otlp) => otlp.deliver(upload).await,
        }
    }
}

/// What an HTTP answer means for an upload: overloaded or failing backends
/// may take it later; other refusals (bad request, unauthorized) would
/// repeat.
fn outcome(status: u16, body: &str) -> Result<(), DeliveryError> {
    let reason = format!("HTTP {status}: {}", body.trim());
    match status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(DeliveryError::Retry(reason)),
        _ => Err(DeliveryError::Refused(reason)),
    }
}

/// The error and its causes: reqwest's own message is often just "error
/// sending request".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}
