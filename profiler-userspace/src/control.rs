//! The agent's local control socket, through which a process names and
//! labels itself and ends its profiling (the Python API's `Profiler.start()`
//! and `stop()`). One JSON object a line each way. The caller is known by
//! the kernel (`SO_PEERCRED`), not by what it says: a process can only
//! register itself.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, Semaphore},
};

/// The longest line a process may send: a request with labels takes a few hundred bytes.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Connections open at once; one more is refused.
const MAX_CONNECTIONS: usize = 128;
const TOO_MANY_CONNECTIONS: &str = "too many connections to the agent's control socket: try again later";
/// The longest application name: it names directories, and Pyroscope's series.
pub const MAX_APPLICATION_NAME_BYTES: usize = 256;
/// Labels in one request (Pyroscope's `max_label_names_per_series`).
pub const MAX_LABELS: usize = 30;

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
            if labels.len() > MAX_LABELS {
                return Err(format!("at most {MAX_LABELS} labels, not {}", labels.len()));
            }
            labels.iter().try_for_each(|(key, value)| crate::config::validate_label(key, value))
        };
        match self {
            Request::Start { application_name, labels: start_labels, period, upload_timeout } => {
                at_least_a_second(*period, "period")?;
                at_least_a_second(*upload_timeout, "upload_timeout")?;
                labels(start_labels)?;
                match application_name {
                    Some(name) if name.trim().is_empty() => Err("the application name is empty".into()),
                    Some(name) if name.len() > MAX_APPLICATION_NAME_BYTES => {
                        Err(format!("the application name is over {MAX_APPLICATION_NAME_BYTES} bytes"))
                    }
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
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            match connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        serve(stream, sender).await;
                        drop(permit);
                    });
                }
                // Refused with why; the process may come back once others have gone.
                Err(_) => {
                    let refusal = serde_json::json!({ "ok": false, "error": TOO_MANY_CONNECTIONS });
                    tokio::spawn(async move {
                        let _ = stream.write_all(format!("{refusal}\n").as_bytes()).await;
                    });
                }
            }
        }
    });
    Ok(receiver)
}

async fn serve(stream: UnixStream, agent: mpsc::Sender<Command>) {
    let Some(pid) = stream.peer_cred().ok().and_then(|credentials| credentials.pid()) else { return };
    let Ok(pid) = u32::try_from(pid) else { return };
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let (answer, last) = match read_line(&mut reader).await {
            Ok(Some(line)) => match answer(pid, &line, &agent).await {
                Some(answer) => (answer, false),
                None => return,
            },
            Err(too_long) if too_long.kind() == std::io::ErrorKind::InvalidData => (Err(too_long.to_string()), true),
            Ok(None) | Err(_) => return,
        };
        let text = match answer {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(error) => serde_json::json!({ "ok": false, "error": error }),
        };
        if writer.write_all(format!("{text}\n").as_bytes()).await.is_err() || last {
            return;
        }
    }
}

/// The agent's answer to one line of process `pid`; None when the agent is gone.
async fn answer(pid: u32, line: &[u8], agent: &mpsc::Sender<Command>) -> Option<Result<(), String>> {
    let request = serde_json::from_slice::<Request>(line).map_err(|error| format!("bad request: {error}"));
    let request = match request.and_then(|request| request.check().map(|()| request)) {
        Ok(request) => request,
        Err(error) => return Some(Err(error)),
    };
    let (reply, answer) = oneshot::channel();
    agent.send(Command { pid, request, reply }).await.ok()?;
    Some(answer.await.unwrap_or_else(|_| Err("the agent is stopping".into())))
}

/// The next line (without its newline; the last may lack one); None at the
/// end. A line over [`MAX_LINE_BYTES`] is an `InvalidData` error: it is never
/// held whole.
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let limit = MAX_LINE_BYTES as u64 + 1;
    if reader.take(limit).read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "a request is at most {} KiB, one JSON object a line: closing the connection",
                MAX_LINE_BYTES / 1024
            ),
        ));
    }
    Ok(Some(line))
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
        let long_name =
            format!(r#"{{"op": "start", "application_name": "{}"}}"#, "a".repeat(MAX_APPLICATION_NAME_BYTES + 1));
        assert_eq!(check(&long_name), Err("the application name is over 256 bytes".into()));
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!(r#""k{i}": "v""#)).collect();
        let many = format!(r#"{{"op": "label_set", "id": 1, "labels": {{{}}}}}"#, many.join(", "));
        assert_eq!(check(&many), Err("at most 30 labels, not 31".into()));
        let long_value = format!(r#"{{"op": "start", "labels": {{"k": "{}"}}}}"#, "v".repeat(3000));
        assert!(check(&long_value).unwrap_err().contains("at most 1024 bytes and values 2048"));
    }

    #[tokio::test]
    async fn lines_are_read_up_to_their_limit_and_never_held_whole_past_it() {
        let read = |bytes: Vec<u8>| async move {
            let mut reader = BufReader::new(&bytes[..]);
            let mut lines = Vec::new();
            loop {
                match read_line(&mut reader).await {
                    Ok(Some(line)) => lines.push(Ok(line.len())),
                    Ok(None) => return lines,
                    Err(error) => {
                        lines.push(Err(error.kind()));
                        return lines;
                    }
                }
            }
        };
        assert_eq!(read(b"{}\n{\"op\": \"stop\"}".to_vec()).await, [Ok(2), Ok(14)]);
        let at_limit = [vec![b' '; MAX_LINE_BYTES], b"\n".to_vec()].concat();
        assert_eq!(read(at_limit).await, [Ok(MAX_LINE_BYTES)]);
        let over = vec![b' '; MAX_LINE_BYTES + 1];
        assert_eq!(read(over).await, [Err(std::io::ErrorKind::InvalidData)]);
    }
}
