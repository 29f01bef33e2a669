//! The agent's local control socket, through which a process names and
//! labels itself and ends its profiling (the Python API's `Profiler.start()`
//! and `stop()`). One JSON object a line each way. The caller is known by
//! the kernel (`SO_PEERCRED`), not by what it says: a process can only
//! register itself.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::Path};

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
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                if agent.send(Command { pid, request, reply }).await.is_err() {
                    return;
                }
                answer.await.unwrap_or_else(|_| Err("the agent is stopping".into()))
            }
            Err(error) => Err(format!("bad request: {error}")),
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
}
