//! Bad configuration stops the agent with a message that names what is wrong.

use std::fs;
use std::time::Duration;

use anyhow::{ensure, Result};
use e2e::run_agent_to_exit;

/// Checks that `ferroscope agent ARGS` fails and that its stderr names `culprit`.
fn check_rejected(args: &[&str], culprit: &str) -> Result<()> {
    let output_dir = tempfile::tempdir()?;
    let mut args = args.to_vec();
    args.extend(["--output-dir", output_dir.path().to_str().unwrap()]);
    let (status, stderr) = run_agent_to_exit(&args, Duration::from_secs(20))?;
    ensure!(!status.success(), "`ferroscope agent {}` succeeded; stderr:\n{stderr}", args.join(" "));
    ensure!(
        stderr.contains(culprit),
        "`ferroscope agent {}` failed without naming {culprit:?}; stderr:\n{stderr}",
        args.join(" ")
    );
    Ok(())
}

#[test]
fn unknown_config_key_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bad.toml");
    fs::write(&config, "no_such_setting = 1\n")?;
    check_rejected(&["--config", config.to_str().unwrap()], "no_such_setting")
}

#[test]
fn zero_frequency_is_named() -> Result<()> {
    check_rejected(&["--frequency", "0"], "--frequency")
}

#[test]
fn unparsable_period_is_named() -> Result<()> {
    check_rejected(&["--period", "nonsense"], "--period")
}
