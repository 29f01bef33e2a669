//! The agent's local control socket, through which a process names and
//! labels itself and ends its profiling (the Python API's `Profiler.start()`
//! and `stop()`). One JSON object a line each way. The caller is known by
//! the kernel (`SO_PEERCRED`), not by what it says: a process can only
//! register itself.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// What a process asks.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Profile me under this name, with these labels.
    Start {
        application_name: Option<String>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// Seconds: a profile of this process every `period`, each upload
        /// given `upload_timeout`, instead of the agent's.
        period: Option<f64>,
        upload_timeout: Option<f64>,
    },
    /// Stop profiling me, and ship what my current period holds.
    Stop,
    /// My thread `tid` keeps its current label set id, a `u64`, at
    /// `address`.
    Thread { tid: u32, address: u64 },
    /// Label set `id` (never 0) stands for these labels.
    LabelSet { id: u64, labels: BTreeMap<String, String> },
}

impl Request {
    /// Whether its fields hold what they must; the agent gets only requests that do.
    pub fn check(&self) -> Result<(), String> {
        let at_least_a_second = |value: Option<f64>, what: &str| match value {
            Some(seconds) if !Duration::try_from_secs_f64(seconds).is_ok_and(|d| d >= Duration::from_secs(1)) => {
                Err(format!("{what} must be at least 1 second"))
            }
            _ => Ok(()),
        };
        let labels = |labels: &BTreeMap<String, String>| {
            labels.iter().try_for_each(|(key, value)| crate::config::validate_label(key, value))
        };
        match self {
            Request::Start { application_name, labels: start_labels, period, upload_timeout } => {
                at_least_a_second(*period, "period")?;
                at_least_a_second(*upload_timeout, "upload_timeout")?;
                labels(start_labels)?;
                match application_name {
                    Some(name) if name.trim().is_empty() => Err("the application name is empty".into()),
                    _ => Ok(()),
                }
            }
            Request::LabelSet { id: 0, .. } => Err("label set 0 means none".into()),
            Request::LabelSet { labels: set, .. } => labels(set),
            Request::Stop | Request::Thread { .. } => Ok(()),
        }
    }
}

/// A request from process `pid`, with where to answer.
pub struct Command {
    pub pid: u32,
    pub request: Request,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Listens on `path` (replacing a socket left by an earlier run), open to
/// every local process, and passes each request on.
pub fn listen(path: &Path) -> Result<mpsc::Receiver<Command>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("cannot replace {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    // Any local process may register itself, and only itself.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, sender.clone()));
        }
    });
    Ok(receiver)
}

async fn serve(stream: UnixStream, agent: mpsc::Sender<Command>) {
    let Some(pid) = stream.peer_cred().ok().and_then(|credentials| credentials.pid()) else { return };
    let Ok(pid) = u32::try_from(pid) else { return };
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request = serde_json::from_str::<Request>(&line).map_err(|error| format!("bad request: {error}"));
        let answer = match request.and_then(|request| request.check().map(|()| request)) {
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                if agent.send(Command { pid, request, reply }).await.is_err() {
                    return;
                }
                answer.await.unwrap_or_else(|_| Err("the agent is stopping".into()))
            }
            Err(error) => Err(error),
        };
        let text = match answer {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(error) => serde_json::json!({ "ok": false, "error": error }),
        };
        if writer.write_all(format!("{text}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_json_lines() {
        let start: Request =
            serde_json::from_str(r#"{"op": "start", "application_name": "shop", "labels": {"tier": "web"}}"#).unwrap();
        let labels = BTreeMap::from([("tier".to_owned(), "web".to_owned())]);
        assert_eq!(
            start,
            Request::Start { application_name: Some("shop".into()), labels, period: None, upload_timeout: None }
        );
        assert_eq!(serde_json::from_str::<Request>(r#"{"op": "stop"}"#).unwrap(), Request::Stop);
        assert!(serde_json::from_str::<Request>(r#"{"op": "explode"}"#).is_err());
        let thread: Request = serde_json::from_str(r#"{"op": "thread", "tid": 7, "address": 4096}"#).unwrap();
        assert_eq!(thread, Request::Thread { tid: 7, address: 4096 });
    }

    #[test]
    fn requests_that_break_a_rule_are_refused_with_the_rule() {
        let check = |json: &str| serde_json::from_str::<Request>(json).unwrap().check();
        assert_eq!(check(r#"{"op": "start", "period": 0.5}"#), Err("period must be at least 1 second".into()));
        assert_eq!(
            check(r#"{"op": "start", "upload_timeout": -3}"#),
            Err("upload_timeout must be at least 1 second".into())
        );
        assert_eq!(check(r#"{"op": "start", "application_name": " "}"#), Err("the application name is empty".into()));
        assert!(check(r#"{"op": "start", "labels": {"pid": "1"}}"#).is_err());
        assert_eq!(check(r#"{"op": "label_set", "id": 0, "labels": {}}"#), Err("label set 0 means none".into()));
        assert_eq!(check(r#"{"op": "start", "application_name": "shop", "period": 10}"#), Ok(()));
    }
}
