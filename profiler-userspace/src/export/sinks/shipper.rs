//! Delivers the uploads of one backend: spooled first, then sent oldest
//! first, each within the upload timeout; a failure is retried with
//! exponential backoff and jitter, and later uploads wait behind it, so
//! that a backend sees every period in order.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::Notify;

use super::{spool::Spool, Backend, DeliveryError, Upload};

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// Counters of one sink, for the summary.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub delivered: AtomicU64,
    /// Failed attempts, each retried later.
    pub retries: AtomicU64,
    /// Uploads the backend refused for good (a 4xx answer).
    pub refused: AtomicU64,
    /// Uploads dropped, oldest first, to keep the spool within its cap.
    pub dropped: AtomicU64,
}

pub struct Shipper {
    name: &'static str,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    pub stats: Arc<SinkStats>,
}

impl Shipper {
    /// Starts delivering to `backend` what its spool in `spool_dir` holds,
    /// and what is shipped from now on.
    pub fn start(backend: Backend, spool_dir: &Path, max_spool_bytes: u64, timeout: Duration) -> Result<Shipper> {
        let name = backend.name();
        let spool = Arc::new(Mutex::new(Spool::open(spool_dir, max_spool_bytes)?));
        let (waiting, _) = spool.lock().unwrap().size()?;
        if waiting > 0 {
            log::info!("{name}: {waiting} uploads left from an earlier run, delivered first");
        }
        let wake = Arc::new(Notify::new());
        let stats = Arc::new(SinkStats::default());
        tokio::spawn(deliver_all(backend, spool.clone(), wake.clone(), stats.clone(), timeout));
        Ok(Shipper { name, spool, wake, stats })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Queues `upload` (on disk) for delivery.
    pub fn ship(&self, upload: &Upload) {
        match self.spool.lock().unwrap().push(upload) {
            Ok(dropped) => {
                if dropped > 0 {
                    self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
                    log::warn!("{}: spool full: dropped the {dropped} oldest uploads", self.name);
                }
            }
            Err(error) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                log::error!("{}: cannot spool the profile of {}: {error:#}", self.name, upload.application);
            }
        }
        self.wake.notify_one();
    }

    /// Uploads and bytes waiting in the spool.
    pub fn waiting(&self) -> (u64, u64) {
        self.spool.lock().unwrap().size().unwrap_or((0, 0))
    }

    /// Waits until everything is delivered, or `deadline`: what is left
    /// stays in the spool for the next start.
    pub async fn drain(&self, deadline: Instant) {
        while self.waiting().0 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn deliver_all(
    backend: Backend,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    stats: Arc<SinkStats>,
    timeout: Duration,
) {
    let name = backend.name();
    let mut backoff = FIRST_RETRY;
    loop {
        let next = spool.lock().unwrap().oldest();
        let (path, upload) = match next {
            Ok(Some(next)) => next,
            Ok(None) => {
                wake.notified().await;
                continue;
            }
            Err(error) => {
                log::error!("{name}: cannot read the spool: {error:#}");
                tokio::time::sleep(LAST_RETRY).await;
                continue;
            }
        };
        let timeout = upload.timeout_secs.map_or(timeout, Duration::from_secs_f64);
        let outcome = match tokio::time::timeout(timeout, backend.deliver(&upload)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(DeliveryError::Retry(format!("no answer within {}", humantime::format_duration(timeout)))),
        };
        match outcome {
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                backoff = FIRST_RETRY;
            }
            Err(DeliveryError::Refused(reason)) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                log::error!("{name}: the profile of {} was refused, not retried: {reason}", upload.application);
            }
            Err(DeliveryError::Retry(reason)) => {
                stats.retries.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{name}: cannot deliver the profile of {}: {reason}; retrying in {}",
                    upload.application,
                    humantime::format_duration(backoff)
                );
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(LAST_RETRY);
                continue;
            }
        }
        if let Err(error) = spool.lock().unwrap().remove(&path) {
            log::error!("{name}: {error:#}");
        }
    }
}

/// `delay` ± 25%, so that agents that lost the same backend do not all come
/// back at once.
fn jittered(delay: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let factor = 0.75 + 0.5 * f64::from(nanos % 1000) / 1000.0;
    delay.mul_f64(factor)
}
