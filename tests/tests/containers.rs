//! A Python process in a container (its own PID and mount namespaces, chrooted in Debian
//! unstable's root, with another glibc, in a cgroup named as Docker names its
//! containers') is profiled: its samples carry the host's pid as `pid`, its own as
//! `container_pid` and the container's ID as `container_id`, and its Python frames are
//! named.

use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::{installed, new_container_id, share_labelled, Agent, Cgroup, Workload, DEBIAN_ROOT};

const PYTHON: &str = "/usr/bin/python3.13";

#[test]
fn container_samples_carry_both_pids_and_the_container_id() -> Result<()> {
    if !installed(Some(DEBIAN_ROOT), PYTHON)? {
        return Ok(());
    }
    let id = new_container_id();
    let cgroup = Cgroup::create(&format!("system.slice/docker-{id}.scope"))?;
    let agent = Agent::start(&[])?;
    let spin = Workload::start_in_container(DEBIAN_ROOT, Some(&cgroup), PYTHON, "spin.py", &["2"])?;
    let pid = spin.pid();
    spin.wait()?;
    // Let the last samples reach the agent.
    thread::sleep(Duration::from_millis(200));
    let run = agent.stop()?;

    let profile = run.all_profiles()?;
    let samples: Vec<_> = profile.samples_of_pid(pid).collect();
    let spinning: i64 = samples.iter().filter(|s| s.has_function("spin")).map(|s| s.count()).sum();
    // ~200 at 100 Hz.
    ensure!(spinning >= 50, "only {spinning} samples of host pid {pid} in spin; agent output:\n{}", run.log);
    // `unshare --fork` makes it its namespace's first process.
    let expected = [("container_pid", "1"), ("container_id", id.as_str())];
    let labelled = share_labelled(&samples, &expected).with_context(|| format!("pid {pid} in container {id}"))?;
    ensure!(labelled >= 0.95, "pid {pid}: {:.0}% of the samples carry {expected:?}", labelled * 100.0);
    Ok(())
}
