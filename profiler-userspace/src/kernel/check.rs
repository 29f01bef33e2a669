//! `ferroscope kernel-check`: what this kernel's verifier thinks of every
//! program, with the margin each keeps under the verifier's limits.

use anyhow::{bail, Result};

use super::{headroom, sampler as ebpf};

/// Instructions the verifier may process in one program (privileged).
const INSTRUCTION_LIMIT: u32 = 1_000_000;

#[derive(clap::Args)]
pub struct KernelCheckArgs {
    /// Fail when a program uses more than this share of either verifier
    /// limit (processed instructions, combined stack).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_percent: u32,
}

pub fn run(args: &KernelCheckArgs) -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}", kernel.trim());
    println!("{:<18} {:<8} {:>22} {:>18}  result", "program", "feature", "verified instructions", "combined stack");
    let mut problems = Vec::new();
    for check in ebpf::check_programs()? {
        let stack = format!("{} B ({}%)", check.stack, percent(check.stack, headroom::STACK_LIMIT));
        if percent(check.stack, headroom::STACK_LIMIT) > args.max_percent || check.stack > ebpf::STACK_BUDGET {
            problems.push(format!(
                "{}: combined stack {} of {} bytes (the programs keep under {})",
                check.program,
                check.stack,
                headroom::STACK_LIMIT,
                ebpf::STACK_BUDGET
            ));
        }
        let (instructions, result) = match &check.verified {
            Ok(Some(count)) => {
                if percent(*count, INSTRUCTION_LIMIT) > args.max_percent {
                    problems.push(format!("{}: {count} of {INSTRUCTION_LIMIT} instructions", check.program));
                }
                (format!("{count} ({}%)", percent(*count, INSTRUCTION_LIMIT)), "loaded".to_owned())
            }
            // Kernels before 5.16 do not report the count.
            Ok(None) => ("unknown".to_owned(), "loaded".to_owned()),
            Err(why) => {
                problems.push(why.clone());
                ("-".to_owned(), format!("REFUSED: {why}"))
            }
        };
        println!("{:<18} {:<8} {instructions:>22} {stack:>18}  {result}", check.program, check.feature);
    }
    if !problems.is_empty() {
        bail!(
            "{} problem(s), over {}% of a limit or refused: {}",
            problems.len(),
            args.max_percent,
            problems.join("; ")
        );
    }
    println!("every program loaded, within {}% of the verifier's limits", args.max_percent);
    Ok(())
}

/// `part` as a percentage of `whole`, rounded up.
fn percent(part: u32, whole: u32) -> u32 {
    (u64::from(part) * 100).div_ceil(u64::from(whole)) as u32
}
