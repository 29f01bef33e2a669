//! The control socket is open to every local user: what they send must not grow the agent.
//! An over-long line, an over-long name, a flood of label sets and of connections are
//! refused, each saying why; the agent stays small and answers a good request at once.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use e2e::{Agent, KillOnDrop};

/// What the agent's memory may grow by over the whole test: a few MiB.
const MAX_GROWTH_KIB: u64 = 8 * 1024;
/// A good request answered "at once", even on a loaded host.
const PROMPT: Duration = Duration::from_secs(2);

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// Sends one line, returns the agent's answer line.
fn ask(connection: &mut BufReader<UnixStream>, line: &str) -> Result<String> {
    connection.get_mut().write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    connection.read_line(&mut answer)?;
    Ok(answer)
}

fn connect(socket: &Path) -> Result<BufReader<UnixStream>> {
    let stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(BufReader::new(stream))
}

#[test]
fn what_local_users_send_is_bounded_and_refused_with_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("control.sock");
    // Sampling an idle process only: the agent's memory then grows by what the socket takes,
    // not by naming this test's own busy stacks.
    let idle = KillOnDrop(Command::new("sleep").arg("600").spawn()?);
    let pid = idle.0.id().to_string();
    let agent = Agent::start(&["--period", "60s", "--pid", &pid, "--control-socket", socket.to_str().unwrap()])?;
    let mut good = connect(&socket)?;
    ensure!(ask(&mut good, r#"{"op": "start", "application_name": "bounded"}"#)?.contains(r#""ok":true"#));
    let before = rss_kib(agent.pid())?;

    // 64 MiB without a newline: refused past 64 KiB, the connection closed.
    let mut long = connect(&socket)?;
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    while sent < 64 << 20 && long.get_mut().write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    let mut answer = String::new();
    long.read_line(&mut answer)?;
    ensure!(answer.contains("at most 64 KiB"), "answer to a 64 MiB line ({sent} bytes sent): {answer:?}");

    let name = "n".repeat(1000);
    let answer = ask(&mut good, &format!(r#"{{"op": "start", "application_name": "{name}"}}"#))?;
    ensure!(answer.contains("over 256 bytes"), "answer to a 1000-byte name: {answer:?}");

    let mut refused = None;
    for id in 1..=1100 {
        let answer =
            ask(&mut good, &format!(r#"{{"op": "label_set", "id": {id}, "labels": {{"endpoint": "/e{id}"}}}}"#))?;
        if !answer.contains(r#""ok":true"#) {
            refused = Some((id, answer));
            break;
        }
    }
    let (id, answer) = refused.context("1100 label sets, none refused")?;
    ensure!(id == 1025 && answer.contains("at most 1024 label sets"), "label set {id} refused: {answer:?}");

    // Connections past the limit are refused, and the others still served.
    let held: Vec<_> = (0..200).filter_map(|_| connect(&socket).ok()).collect();
    let mut answers = Vec::new();
    for mut connection in held {
        let mut answer = String::new();
        connection.get_mut().set_read_timeout(Some(Duration::from_millis(50)))?;
        if connection.read_line(&mut answer).is_ok() && !answer.is_empty() {
            answers.push(answer);
        }
    }
    ensure!(
        !answers.is_empty() && answers.iter().all(|answer| answer.contains("too many connections")),
        "200 connections at once: {} refused, answers {:?}",
        answers.len(),
        answers.first()
    );

    let asked = Instant::now();
    let answer = ask(&mut good, r#"{"op": "start", "application_name": "still-here"}"#)?;
    ensure!(answer.contains(r#""ok":true"#) && asked.elapsed() < PROMPT, "{answer:?} after {:?}", asked.elapsed());
    let grown = rss_kib(agent.pid())?.saturating_sub(before);
    eprintln!("the agent's RSS grew by {grown} KiB from {before} KiB");
    ensure!(grown <= MAX_GROWTH_KIB, "the agent grew by {grown} KiB; agent output:\n{}", agent.log());
    agent.stop()?;
    Ok(())
}
