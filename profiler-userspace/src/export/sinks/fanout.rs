//! Every sink of a period's profiles at once: the local directory and each
//! backend's shipper.

use std::{sync::Arc, time::Instant};

use anyhow::Result;

use super::{Backend, Datadog, LocalDir, Otlp, Pyroscope, Shipper, Upload};
use crate::{aggregate::PeriodProfile, config::Settings, export::pprof};

/// Where each period's profiles go.
pub struct Sinks {
    local: Option<LocalDir>,
    pub remote: Vec<Arc<Shipper>>,
}

impl Sinks {
    pub fn start(settings: &Settings) -> Result<Sinks> {
        let mut backends = Vec::new();
        if let Some(pyroscope) = &settings.pyroscope {
            backends.push(Backend::Pyroscope(Pyroscope::new(
                &pyroscope.url,
                pyroscope.auth.clone(),
                pyroscope.tenant.clone(),
            )?));
        }
        if let Some((endpoint, api_key)) = &settings.datadog {
            backends.push(Backend::Datadog(Datadog::new(endpoint.clone(), api_key.clone())));
        }
        if let Some(url) = &settings.otlp_url {
            backends.push(Backend::Otlp(Otlp::new(url)));
        }
        let remote = backends
            .into_iter()
            .map(|backend| {
                let spool = settings.spool_dir.join(backend.name());
                Shipper::start(backend, &spool, settings.spool_max_bytes, settings.upload_timeout).map(Arc::new)
            })
            .collect::<Result<_>>()?;
        Ok(Sinks {
            local: settings.output_dir.as_deref().map(|dir| LocalDir::new(dir, settings.labels.clone())),
            remote,
        })
    }

    /// `./profiles and pyroscope`.
    pub fn describe(&self) -> String {
        let local = self.local.iter().map(|local| local.root().display().to_string());
        local.chain(self.remote.iter().map(|shipper| shipper.name().to_owned())).collect::<Vec<_>>().join(" and ")
    }

    /// Writes `profile` and queues it for every backend; whether it was
    /// written or queued everywhere.
    pub fn send(&self, profile: &PeriodProfile) -> bool {
        let pprof_gz = match pprof::encode_gzipped(profile) {
            Ok(pprof_gz) => pprof_gz,
            Err(error) => {
                log::error!("cannot compress the profile of {}: {error}", profile.application);
                return false;
            }
        };
        let mut sent = true;
        if let Some(local) = &self.local {
            match local.write(profile, &pprof_gz) {
                Ok(written) => log::debug!("wrote {} and {:?}", written.pprof.display(), written.flamegraph),
                Err(error) => {
                    log::error!("cannot write the profile of {}: {error:#}", profile.application);
                    sent = false;
                }
            }
        }
        if !self.remote.is_empty() {
            let upload = Upload::new(profile, pprof_gz);
            for shipper in &self.remote {
                shipper.ship(&upload);
            }
        }
        sent
    }

    /// A line per sink for the summary.
    pub fn report(&self) -> Vec<String> {
        let local = self.local.iter().map(|local| {
            let root = local.root().display();
            format!("wrote to {root} (look at them: ferroscope view {root})")
        });
        let remote = self.remote.iter().map(|shipper| {
            let stats = &shipper.stats;
            let (waiting, bytes) = shipper.waiting();
            let count = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
            format!(
                "{}: {} delivered, {waiting} waiting ({} KiB spooled), {} retries, {} refused, {} dropped (spool full)",
                shipper.name(),
                count(&stats.delivered),
                bytes / 1024,
                count(&stats.retries),
                count(&stats.refused),
                count(&stats.dropped),
            )
        });
        local.chain(remote).collect()
    }

    /// Gives the backends until `deadline` to take what is queued; the rest
    /// stays spooled for the next start.
    pub async fn drain(&self, deadline: Instant) {
        for shipper in &self.remote {
            shipper.drain(deadline).await;
            let (waiting, _) = shipper.waiting();
            if waiting > 0 {
                log::warn!("{}: {waiting} uploads left in the spool for the next start", shipper.name());
            }
        }
    }
}
