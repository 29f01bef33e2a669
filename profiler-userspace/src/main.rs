//! `ferroscope`: system-wide continuous profiler for Python, on eBPF.

use clap::{Parser, Subcommand};
use ferroscope::{agent, config, kernel, view};

/// Continuous profiler for Python: samples every CPython process on the host
/// from the kernel (eBPF), with no code change, and writes one pprof profile
/// and one flame graph per application and period.
#[derive(Parser)]
#[command(name = "ferroscope", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile this host (or the given processes) until stopped.
    ///
    /// Needs root, or CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE. Example:
    /// `ferroscope agent --period 1m --label env=staging`
    Agent(Box<config::AgentArgs>),
    /// Look at the profiles of a directory in a web browser.
    ///
    /// Serves a page on loopback with a timeline of each application's
    /// periods, and for any time range a flame graph, a top table and the
    /// diff against another range. Example: `ferroscope view ./profiles`,
    /// then open http://127.0.0.1:9465/
    View(view::ViewArgs),
    /// Check which of Ferroscope's eBPF programs this kernel accepts.
    ///
    /// Loads every program (attaching none) and prints, for each, the
    /// dimension it serves, whether the verifier accepted it (or its
    /// complaint), the instructions it processed and the program's combined
    /// stack. Exits with an error when a program is refused, or uses more
    /// than --max-percent of either verifier limit. Needs root, like `agent`.
    KernelCheck(kernel::check::KernelCheckArgs),
}

/// `info`, but for the Kubernetes client's retries, which the agent reports once per outage.
const LOG_FILTER: &str = "info,kube_runtime=off,kube_client=warn";

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(LOG_FILTER))
        .format_target(false)
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        // The loop runs on this thread; what it spawns (the control socket's connections,
        // `/metrics` and `/healthz`, the shippers) on a worker of its own, so that a long
        // look at a process never keeps them waiting.
        Command::Agent(args) => args.settings().and_then(|settings| {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            runtime.block_on(agent::run(settings))
        }),
        Command::View(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(view::run(args))),
        Command::KernelCheck(args) => kernel::check::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferroscope: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
