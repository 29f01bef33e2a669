//! The kernel this runs on: every program loads with its margin, and the
//! agent says which dimensions run.

use std::process::Command;

use anyhow::{ensure, Result};
use e2e::{ferroscope_bin, Agent};

/// `ferroscope kernel-check` passes: every program loads, within 90% of
/// the verifier's instruction and stack limits. (The kernel matrix runs the
/// same check in each guest kernel.)
#[test]
fn every_program_loads_with_a_margin_on_this_kernel() -> Result<()> {
    let output = Command::new(ferroscope_bin()).args(["kernel-check", "--max-percent", "90"]).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "kernel-check failed:\n{text}");
    for program in ["sample_cpu", "sched_switch", "sys_exit", "raw_alloc_return", "arena_return", "raw_malloc"] {
        ensure!(
            text.lines().any(|line| line.starts_with(program) && line.ends_with("loaded")),
            "{program} is not reported loaded:\n{text}"
        );
    }
    Ok(())
}

/// With every dimension asked for on a kernel that runs them all, the
/// agent refuses none and says so in its start-up line.
#[test]
fn the_agent_runs_every_dimension_here() -> Result<()> {
    let _one = e2e::one_at_a_time();
    let agent = Agent::start(&["--memory", "--period", "2s"])?;
    std::thread::sleep(std::time::Duration::from_secs(3));
    let run = agent.stop()?;
    ensure!(run.log.contains("with wall time and memory"), "{}", run.log);
    ensure!(!run.log.contains(": off:"), "a dimension was refused:\n{}", run.log);
    Ok(())
}
