//! Pyroscope's HTTP ingest API, which Grafana Pyroscope and Grafana Cloud
//! Profiles accept: `POST /ingest?name=APP{labels}&from&until&format=pprof`,
//! multipart with the profile and the units and aggregation of its sample
//! types.

use reqwest::multipart;
use serde_json::json;

use super::{DeliveryError, Upload};
use crate::aggregate::{sample_type::Aggregation, SampleType};

/// How the agent proves who it is to the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

pub struct Pyroscope {
    client: reqwest::Client,
    /// E.g. `http://pyroscope:4040`, without the `/ingest`.
    url: String,
    auth: Auth,
    /// `X-Scope-OrgID`, for a multi-tenant backend.
    tenant: Option<String>,
}

impl Pyroscope {
    pub fn new(url: &str, auth: Auth, tenant: Option<String>) -> anyhow::Result<Pyroscope> {
        let client =
            reqwest::Client::builder().user_agent(concat!("ferroscope/", env!("CARGO_PKG_VERSION"))).build()?;
        Ok(Pyroscope { client, url: url.trim_end_matches('/').to_owned(), auth, tenant })
    }

    pub async fn deliver(&self, upload: &Upload) -> Result<(), DeliveryError> {
        let profile = multipart::Part::bytes(upload.pprof_gz.clone())
            .file_name("profile.pprof")
            .mime_str("application/octet-stream")
            .expect("a valid MIME type");
        let form = multipart::Form::new()
            .part("profile", profile)
            .text("sample_type_config", sample_type_config(upload).to_string());
        let mut request = self
            .client
            .post(format!("{}/ingest", self.url))
            .query(&[
                ("name", series_name(upload).as_str()),
                ("from", &upload.from.to_string()),
                ("until", &upload.until.to_string()),
                ("format", "pprof"),
                ("sampleRate", &upload.sample_rate.to_string()),
                ("spyName", "ferroscope"),
            ])
            .multipart(form);
        request = match &self.auth {
            Auth::None => request,
            Auth::Basic { user, password } => request.basic_auth(user, Some(password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        };
        if let Some(tenant) = &self.tenant {
            request = request.header("X-Scope-OrgID", tenant);
        }
        let response = request.send().await.map_err(|error| DeliveryError::Retry(super::error_chain(&error)))?;
        let status = response.status().as_u16();
        super::outcome(status, &response.text().await.unwrap_or_default())
    }
}

/// `APP{k=v,...}`: Pyroscope's name of a series. Label values cannot hold
/// the characters that delimit them.
fn series_name(upload: &Upload) -> String {
    let labels: Vec<String> = upload
        .labels
        .iter()
        .map(|(key, value)| {
            // Pyroscope's label names are Prometheus': no `-`.
            let key: String =
                key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
            format!("{key}={}", value.replace([',', '{', '}', '='], "_"))
        })
        .collect();
    format!("{}{{{}}}", upload.application.replace(['{', '}'], "_"), labels.join(","))
}

/// Units and aggregation of each sample type, from the table: Pyroscope
/// sums flows (time, allocations) over time and averages levels (the heap
/// in use). A type the table does not know is summed.
fn sample_type_config(upload: &Upload) -> serde_json::Value {
    let config: serde_json::Map<String, serde_json::Value> = upload
        .sample_types
        .iter()
        .map(|(kind, unit)| {
            let aggregation = match SampleType::named(kind).map(|sample_type| sample_type.row().aggregation) {
                Some(Aggregation::Average) => "average",
                Some(Aggregation::Sum) | None => "sum",
            };
            (kind.clone(), json!({ "units": unit, "aggregation": aggregation, "display-name": kind }))
        })
        .collect();
    serde_json::Value::Object(config)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn upload() -> Upload {
        Upload {
            application: "checkout".into(),
            labels: BTreeMap::from([("env".into(), "prod".into()), ("my-region".into(), "eu{1}".into())]),
            from: 1_795_000_000,
            until: 1_795_000_045,
            sample_rate: 100,
            sample_types: vec![("cpu".into(), "nanoseconds".into()), ("inuse_space".into(), "bytes".into())],
            timeout_secs: None,
            pprof_gz: vec![],
        }
    }

    #[test]
    fn series_names_carry_the_labels() {
        assert_eq!(series_name(&upload()), "checkout{env=prod,my_region=eu_1_}");
    }

    #[test]
    fn heap_in_use_is_a_gauge() {
        let config = sample_type_config(&upload());
        assert_eq!(config["cpu"]["aggregation"], "sum");
        assert_eq!(config["cpu"]["units"], "nanoseconds");
        assert_eq!(config["inuse_space"]["aggregation"], "average");
    }
}
