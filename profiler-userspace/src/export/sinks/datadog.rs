//! The Datadog agent's profiling intake, which the Blackfire agent also
//! takes: `POST /profiling/v1/input`, multipart with an `event` JSON (tags,
//! time range, the attachment's name) and the gzipped pprof, over TCP
//! (`http://localhost:8126`) or a Unix socket
//! (`unix:///var/run/blackfire/agent.sock`).

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::{DeliveryError, Upload};

const PATH: &str = "/profiling/v1/input";
const ATTACHMENT: &str = "auto.pprof";

/// Where the intake listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `http://host:port`, without the path.
    Http(String),
    Unix(PathBuf),
}

impl Endpoint {
    /// `http://…`, `https://…` or `unix:///path`; None for anything else.
    pub fn parse(url: &str) -> Option<Endpoint> {
        if let Some(path) = url.strip_prefix("unix://") {
            return path.starts_with('/').then(|| Endpoint::Unix(path.into()));
        }
        let parsed = reqwest::Url::parse(url).ok()?;
        (matches!(parsed.scheme(), "http" | "https") && parsed.has_host())
            .then(|| Endpoint::Http(url.trim_end_matches('/').to_owned()))
    }
}

pub struct Datadog {
    endpoint: Endpoint,
    /// `DD-API-KEY`, for an intake that wants one.
    api_key: Option<String>,
    client: reqwest::Client,
}

impl Datadog {
    pub fn new(endpoint: Endpoint, api_key: Option<String>) -> Datadog {
        Datadog { endpoint, api_key, client: reqwest::Client::new() }
    }

    pub async fn deliver(&self, upload: &Upload) -> Result<(), DeliveryError> {
        let boundary = format!("ferroscope-{:016x}", upload.from ^ (upload.until << 20));
        let body = multipart_body(&boundary, &event(upload).to_string(), &upload.pprof_gz);
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let mut headers = vec![
            ("Content-Type", content_type),
            ("DD-EVP-ORIGIN", "ferroscope".to_owned()),
            ("DD-EVP-ORIGIN-VERSION", env!("CARGO_PKG_VERSION").to_owned()),
        ];
        if let Some(key) = &self.api_key {
            headers.push(("DD-API-KEY", key.clone()));
        }
        let (status, text) = match &self.endpoint {
            Endpoint::Http(base) => {
                let mut request = self.client.post(format!("{base}{PATH}")).body(body);
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let response =
                    request.send().await.map_err(|error| DeliveryError::Retry(super::error_chain(&error)))?;
                (response.status().as_u16(), response.text().await.unwrap_or_default())
            }
            Endpoint::Unix(socket) => post_unix(socket, headers, body).await?,
        };
        super::outcome(status, &text)
    }
}

/// POSTs `body` to the intake on the Unix socket `socket`, over HTTP/1.1.
async fn post_unix(
    socket: &std::path::Path,
    headers: Vec<(&str, String)>,
    body: Vec<u8>,
) -> Result<(u16, String), DeliveryError> {
    let retry = |what: &str, error: &dyn std::error::Error| {
        DeliveryError::Retry(format!("{what} {}: {}", socket.display(), super::error_chain(error)))
    };
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|error| retry("cannot connect to", &error))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|error| retry("HTTP to", &error))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::post(PATH).header("Host", "localhost");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(hyper::body::Bytes::from(body))).expect("a valid request");
    let response = sender.send_request(request).await.map_err(|error| retry("no answer from", &error))?;
    let status = response.status().as_u16();
    let text = response.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// The `event` part: the profile's tags (`service` is the application),
/// time range and attachment.
fn event(upload: &Upload) -> serde_json::Value {
    let rfc3339 = |seconds: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds)).to_string()
    };
    let mut tags = vec![format!("service:{}", upload.application)];
    tags.extend(upload.labels.iter().map(|(key, value)| format!("{key}:{}", value.replace(',', "_"))));
    json!({
        "attachments": [ATTACHMENT],
        "tags_profiler": tags.join(","),
        "start": rfc3339(upload.from),
        "end": rfc3339(upload.until),
        "family": "python",
        "version": "4",
        "endpoint_counts": {},
    })
}

fn multipart_body(boundary: &str, event: &str, pprof_gz: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(pprof_gz.len() + event.len() + 512);
    let mut part = |name: &str, content_type: &str, content: &[u8]| {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\
                 Content-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    };
    part("event", "application/json", event.as_bytes());
    part(ATTACHMENT, "application/octet-stream", pprof_gz);
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn endpoints_are_urls_or_unix_sockets() {
        assert_eq!(Endpoint::parse("http://localhost:8126/"), Some(Endpoint::Http("http://localhost:8126".into())));
        assert_eq!(
            Endpoint::parse("unix:///var/run/blackfire/agent.sock"),
            Some(Endpoint::Unix("/var/run/blackfire/agent.sock".into()))
        );
        assert_eq!(Endpoint::parse("unix://relative.sock"), None);
        assert_eq!(Endpoint::parse("localhost:8126"), None);
    }

    #[test]
    fn the_event_names_the_service_tags_and_time_range() {
        let upload = Upload {
            application: "checkout".into(),
            labels: BTreeMap::from([("env".into(), "prod".into())]),
            from: 1_795_000_000,
            until: 1_795_000_045,
            sample_rate: 100,
            sample_types: vec![],
            timeout_secs: None,
            pprof_gz: vec![],
        };
        let event = event(&upload);
        assert_eq!(event["tags_profiler"], "service:checkout,env:prod");
        assert_eq!(event["start"], "2026-11-18T11:06:40Z");
        assert_eq!(event["attachments"][0], ATTACHMENT);
    }
}
