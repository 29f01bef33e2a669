//! The kernel this runs on (the host's, or a guest's of the kernel matrix):
//! every program loads with its margin, and the agent says which dimensions
//! run. Kernels before 5.17 lack `bpf_loop`, which the Python walker and the
//! native unwinder are built on: there the agent must refuse to start and
//! say why (docs/kernels.md).

use std::{process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use e2e::{ferroscope_bin, run_agent_to_exit, Agent};

/// Whether the running kernel has `bpf_loop` (5.17+).
fn has_bpf_loop() -> Result<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(str::parse::<u32>);
    let major = numbers.next().context("kernel release")??;
    let minor = numbers.next().context("kernel release")??;
    Ok((major, minor) >= (5, 17))
}

/// `ferroscope kernel-check` passes: every program loads, within 90% of the
/// verifier's instruction and stack limits; before 5.17 the programs built
/// on `bpf_loop` are refused, with the verifier's words, and the others load.
#[test]
fn every_program_loads_with_a_margin_on_this_kernel() -> Result<()> {
    let output = Command::new(ferroscope_bin()).args(["kernel-check", "--max-percent", "90"]).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let line = |program: &str| text.lines().find(|line| line.starts_with(&format!("{program} "))).unwrap_or("");
    if has_bpf_loop()? {
        ensure!(output.status.success(), "kernel-check failed:\n{text}");
        for program in ["sample_cpu", "sched_switch", "sys_exit", "raw_alloc_return", "arena_return", "raw_malloc"] {
            ensure!(line(program).ends_with("loaded"), "{program} is not reported loaded:\n{text}");
        }
    } else {
        ensure!(!output.status.success(), "kernel-check passed on a kernel without bpf_loop:\n{text}");
        for program in ["process_exec", "process_exit", "process_fork", "sched_switch"] {
            ensure!(line(program).ends_with("loaded"), "{program} is not reported loaded:\n{text}");
        }
        ensure!(
            line("sample_cpu").contains("REFUSED: this kernel's verifier refused sample_cpu"),
            "the sampler's refusal is not reported:\n{text}"
        );
    }
    Ok(())
}

/// With every dimension asked for, the agent refuses none and says so in
/// its start-up line; before 5.17 it exits at once, naming the refused
/// sampler.
#[test]
fn the_agent_runs_every_dimension_or_says_why_not() -> Result<()> {
    let _one = e2e::one_at_a_time();
    if !has_bpf_loop()? {
        let (status, log) = run_agent_to_exit(&["--memory", "--duration", "5s"], Duration::from_secs(120))?;
        ensure!(!status.success(), "the agent started without bpf_loop:\n{log}");
        ensure!(
            log.contains("this kernel cannot run Ferroscope's CPU sampler")
                && log.contains("cpu: off: this kernel's verifier refused sample_cpu"),
            "the agent does not say why it cannot start:\n{log}"
        );
        return Ok(());
    }
    let agent = Agent::start(&["--memory", "--period", "2s"])?;
    std::thread::sleep(Duration::from_secs(3));
    let run = agent.stop()?;
    ensure!(run.log.contains("with wall time and memory"), "{}", run.log);
    ensure!(!run.log.contains(": off:"), "a dimension was refused:\n{}", run.log);
    Ok(())
}
