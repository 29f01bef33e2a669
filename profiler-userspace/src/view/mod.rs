//! `ferroscope view`: a web page over a profiles directory, served on
//! loopback by the agent's binary, its assets inside it, so that profiles
//! written by `ferroscope agent` can be looked at without a backend.

mod query;
mod resolve;
mod store;
mod wire;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{bail, Context, Result};
use clap::Args;
use http_body_util::Full;
use hyper::{body::Bytes, Method, Request, Response, StatusCode};

use self::{
    query::Selection,
    store::{Application, Store},
};
use crate::{aggregate::SampleType, config::DEFAULT_OUTPUT_DIR};

/// Flags of `ferroscope view`.
#[derive(Args, Debug)]
pub struct ViewArgs {
    /// The profiles directory: the agent's `--output-dir`
    #[arg(value_name = "DIR", default_value = DEFAULT_OUTPUT_DIR)]
    pub dir: PathBuf,

    /// Where to serve the page. It has no authentication: keep it on
    /// loopback (or behind an SSH tunnel: `ssh -L 9465:localhost:9465 host`)
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:9465")]
    pub address: SocketAddr,
}

/// The page, embedded at build time: no network needed to draw it.
const ASSETS: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", include_str!("assets/index.html")),
    ("/viewer.js", "text/javascript; charset=utf-8", include_str!("assets/viewer.js")),
    ("/viewer.css", "text/css; charset=utf-8", include_str!("assets/viewer.css")),
];

pub async fn run(args: ViewArgs) -> Result<()> {
    let store = Arc::new(Store::new(args.dir.clone()));
    let applications = store.list()?;
    let listener = tokio::net::TcpListener::bind(args.address)
        .await
        .with_context(|| format!("cannot serve the viewer on {}", args.address))?;
    let address = listener.local_addr()?;
    // Read the most recently written application now, which the page opens on.
    if let Some(recent) = applications.iter().max_by_key(|listed| listed.last_change_ms) {
        let (store, name) = (store.clone(), recent.name.clone());
        tokio::task::spawn_blocking(move || store.application(&name));
    }
    crate::httpd::spawn(listener, move |request| {
        let store = store.clone();
        async move {
            if !is_own_host(&request, address) {
                let error = "this viewer answers requests for its own address only";
                return json(StatusCode::FORBIDDEN, &serde_json::json!({ "error": error }));
            }
            let answer = tokio::task::spawn_blocking(move || answer(&store, &request)).await;
            let answer = answer.unwrap_or_else(|error| Err(anyhow::anyhow!("the query failed: {error}")));
            answer.unwrap_or_else(|error| {
                json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": format!("{error:#}") }))
            })
        }
    });
    // The address on a line of its own, for scripts; then what it serves.
    println!("ferroscope: viewer on http://{address}/");
    println!(
        "ferroscope: {} applications in {}; no authentication: keep it on loopback; Ctrl-C stops it",
        applications.len(),
        args.dir.display(),
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Whether a request names this server as its host. A web page elsewhere
/// could otherwise read the profiles through a name of its own that resolves
/// to loopback (DNS rebinding). A viewer on every address answers any name.
fn is_own_host<B>(request: &Request<B>, address: SocketAddr) -> bool {
    if address.ip().is_unspecified() {
        return true;
    }
    let Some(host) = request.headers().get(hyper::header::HOST).and_then(|host| host.to_str().ok()) else {
        return false;
    };
    // `name:port`, or `[v6 address]:port`; the port is optional.
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next(),
        None => host.split(':').next(),
    };
    let name = name.unwrap_or_default();
    name == "localhost" || name.parse() == Ok(address.ip())
}

/// The answer to one request: an asset, or JSON from the profiles.
fn answer(store: &Store, request: &Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>> {
    if request.method() != Method::GET {
        bail!("only GET is served");
    }
    let path = request.uri().path();
    if let Some((_, content_type, body)) = ASSETS.iter().find(|(asset, _, _)| *asset == path) {
        return Ok(Response::builder()
            .header("Content-Type", *content_type)
            .header("Cache-Control", "no-cache")
            .body(Full::new(Bytes::from_static(body.as_bytes())))?);
    }
    let params = Params::parse(request.uri().query().unwrap_or(""));
    let reply = match path {
        "/api/applications" => serde_json::to_value(store.list()?)?,
        "/api/timeline" => {
            let app = store.application(params.one("app")?)?;
            let app = app.lock().expect("no query panics");
            let type_index = params.sample_type(&app)?;
            serde_json::to_value(query::timeline(&app, type_index, &params.filters()?))?
        }
        "/api/profile" | "/api/diff" => {
            let app = store.application(params.one("app")?)?;
            let app = app.lock().expect("no query panics");
            let selection = params.selection(&app, "")?;
            let base = if path == "/api/diff" { Some(params.selection(&app, "base_")?) } else { None };
            serde_json::to_value(query::flame(&app, &selection, base.as_ref()))?
        }
        _ => return Ok(json(StatusCode::NOT_FOUND, &serde_json::json!({ "error": "not found" }))),
    };
    Ok(json(StatusCode::OK, &reply))
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("a valid response")
}

/// A request's query string.
struct Params(HashMap<String, Vec<String>>);

impl Params {
    fn parse(query: &str) -> Params {
        let mut params: HashMap<String, Vec<String>> = HashMap::new();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            params.entry(key.into_owned()).or_default().push(value.into_owned());
        }
        Params(params)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|values| values.first()).map(String::as_str)
    }

    fn one(&self, key: &str) -> Result<&str> {
        self.get(key).with_context(|| format!("`{key}` is missing"))
    }

    fn sample_type(&self, app: &Application) -> Result<usize> {
        let name = self.get("type").unwrap_or(SampleType::Cpu.row().name);
        app.sample_type(name).with_context(|| {
            let known: Vec<_> = app.sample_types.iter().map(|(kind, _)| kind.as_str()).collect();
            format!("no sample type `{name}` here: {}", known.join(", "))
        })
    }

    /// `filter=key=value`, repeatable.
    fn filters(&self) -> Result<Vec<(String, String)>> {
        let filters = self.0.get("filter").map(Vec::as_slice).unwrap_or_default();
        filters
            .iter()
            .map(|filter| {
                let (key, value) =
                    filter.split_once('=').with_context(|| format!("filter `{filter}` is not KEY=VALUE"))?;
                Ok((key.to_owned(), value.to_owned()))
            })
            .collect()
    }

    /// The range `<prefix>from` to `<prefix>to` (Unix milliseconds; all
    /// periods without them).
    fn selection(&self, app: &Application, prefix: &str) -> Result<Selection> {
        let bound = |key: &str, default: i64| -> Result<i64> {
            let key = format!("{prefix}{key}");
            self.get(&key).map_or(Ok(default), |value| {
                value.parse().with_context(|| format!("`{key}` is not a time in Unix milliseconds: {value}"))
            })
        };
        Ok(Selection {
            type_index: self.sample_type(app)?,
            from_ms: bound("from", i64::MIN)?,
            to_ms: bound("to", i64::MAX)?,
            filters: self.filters()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_its_own_host_names_only() {
        let request = |host: &str| Request::builder().header("Host", host).body(()).unwrap();
        let loopback: SocketAddr = "127.0.0.1:9465".parse().unwrap();
        for host in ["127.0.0.1:9465", "localhost:9465", "localhost", "127.0.0.1"] {
            assert!(is_own_host(&request(host), loopback), "{host}");
        }
        for host in ["evil.example:9465", "127.0.0.2:9465", "localhost.evil.example"] {
            assert!(!is_own_host(&request(host), loopback), "{host}");
        }
        assert!(!is_own_host(&Request::new(()), loopback), "no Host header");
        let v6: SocketAddr = "[::1]:9465".parse().unwrap();
        assert!(is_own_host(&request("[::1]:9465"), v6) && is_own_host(&request("[::1]"), v6));
        let everywhere: SocketAddr = "0.0.0.0:9465".parse().unwrap();
        assert!(is_own_host(&request("profiles.internal:9465"), everywhere));
    }
}
