//! `ferroscope view` in a real browser: Debian's chromium, driven by Playwright
//! (tests/browser/viewer.mjs), over profiles a real agent wrote of `split.py` run twice
//! with known splits, 50/30/20 then 20/30/50 over `crunch_a`, `crunch_b`, `crunch_c`.
//! Screenshots are kept in target/test-artifacts/.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context, Result};
use e2e::{
    ferroscope_bin, free_port, function_line_ranges, one_at_a_time, workload, Agent, Workload, PYENV_PYTHON_3_11,
};
use serde_json::Value;

/// Periods short enough for a quick test, and the runs apart by more than one, so that no
/// period holds samples of both.
const PERIOD: &str = "2s";
const GAP: Duration = Duration::from_millis(2_500);
const CPU_SECONDS: &str = "3";
/// Percentage points a share shown may be off by (about 1,500 samples per run at 499 Hz).
const TOLERANCE_PP: f64 = 5.0;

#[test]
fn the_page_shows_ranges_flame_graphs_top_tables_and_diffs_of_real_profiles() -> Result<()> {
    let setup = "run `cargo xtask setup --test`, which installs Debian's chromium and nodejs and Playwright";
    let playwright = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/node_modules/playwright-core");
    // viewer.mjs runs $CHROMIUM, by default Debian's.
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    for tool in ["node", chromium.as_str(), playwright.to_str().context("a UTF-8 path")?] {
        if !e2e::tool_installed(tool, setup)? {
            return Ok(());
        }
    }
    let _cpus = one_at_a_time();
    let agent = Agent::start(&["--period", PERIOD, "--frequency", "499", "--memory"])?;
    let first = run_split("5,3,2")?;
    thread::sleep(GAP);
    let second = run_split("2,3,5")?;
    thread::sleep(GAP);
    let run = agent.stop()?;

    let address = format!("127.0.0.1:{}", free_port()?);
    let dir = run.output_dir.path().to_str().context("a UTF-8 temporary directory")?;
    let mut viewer = Workload::start_program(&ferroscope_bin(), &["view", dir, "--address", &address], &[])?;
    viewer.wait_for_line(&format!("ferroscope: viewer on http://{address}/"), Duration::from_secs(10))?;

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let seen = browse(&format!("http://{address}/#app=split.py"), first, second, &artifacts)?;
    eprintln!("the page showed: {seen:#}");
    let text = |key: &str| seen[key].as_str().unwrap_or_default().to_owned();
    ensure!(seen["errors"].as_array().is_some_and(Vec::is_empty), "the page had errors: {}", seen["errors"]);

    ensure!(text("application") == "split.py", "opened on {}", seen["application"]);
    let types = seen["sample_types"].to_string();
    for kind in ["CPU time", "Wall time", "Off-CPU time", "Allocations", "Allocated memory", "Heap live size"] {
        ensure!(types.contains(kind), "no {kind} among the sample types {types}");
    }

    // The second run, selected on the timeline: 20/30/50.
    ensure!(text("range").starts_with("Range: ") && !text("range").contains("all"), "{}", text("range"));
    ensure!(text("cpu_status").starts_with("CPU time: "), "{}", text("cpu_status"));
    near(share(&text("cpu_crunch_c"), "Total")?, 50.0, "crunch_c's CPU in the range")?;
    near(share(&text("cpu_crunch_a"), "Total")?, 20.0, "crunch_a's CPU in the range")?;
    let (zoomed, unzoomed) =
        (seen["zoomed_width"].as_f64().unwrap_or(0.0), seen["unzoomed_width"].as_f64().unwrap_or(0.0));
    ensure!(zoomed > 1000.0 && zoomed > 2.0 * unzoomed, "a click on crunch_c zoomed it from {unzoomed} to {zoomed} px");
    near(share(&text("search"), "Matched")?, 30.0, "the search for crunch_b")?;

    // Top tables: crunch_c's total, and its heaviest line, inside the function.
    let row =
        |table: &str| seen[table].as_array().into_iter().flatten().find(|row| row[4] == "Cruncher.crunch_c").cloned();
    let by_function = row("top_by_total").context("crunch_c is not in the top table")?;
    near(percent(&by_function[3])?, 50.0, "crunch_c's total in the top table")?;
    let by_line = row("top_lines").context("crunch_c is not in the top table by line")?;
    let line: i64 = by_line[5].as_str().and_then(|file| file.rsplit(':').next()).unwrap_or("").parse()?;
    let (first_line, last_line) = function_line_ranges(PYENV_PYTHON_3_11, &workload("split.py"))?["Cruncher.crunch_c"];
    ensure!((first_line..=last_line).contains(&line), "crunch_c's line {line} is outside {first_line}..={last_line}");

    // Wall time of a CPU-bound program: its CPU time. On a busy host its threads also wait
    // for a CPU, which wall time counts apart (`[preempted]`, without their stacks), so it
    // is crunch_c's time that must agree, not its share.
    ensure!(text("wall_status").starts_with("Wall time: "), "{}", text("wall_status"));
    let (wall, cpu) = (seconds(&text("wall_crunch_c"), "Total")?, seconds(&text("cpu_crunch_c"), "Total")?);
    ensure!((wall - cpu).abs() <= 0.02 * cpu + 0.01, "crunch_c's wall time {wall} s, its CPU time {cpu} s");

    // The diff against the first run: crunch_c went from 20% to 50% (red), crunch_a from
    // 50% to 20% (blue).
    ensure!(text("baseline").starts_with("Baseline: "), "{}", text("baseline"));
    ensure!(text("diff_active") == "active", "the diff tab is not shown");
    near(share(&text("diff_crunch_c"), "Range total")?, 50.0, "crunch_c in the diff's range")?;
    near(share(&text("diff_crunch_c"), "Baseline total")?, 20.0, "crunch_c in the diff's baseline")?;
    near(share(&text("diff_crunch_a"), "Baseline total")?, 50.0, "crunch_a in the diff's baseline")?;
    let colors = &seen["diff_colors"];
    ensure!(colors["crunch_c"].as_str().is_some_and(|c| c.starts_with("hsl(0,")), "crunch_c is not red: {colors}");
    ensure!(colors["crunch_a"].as_str().is_some_and(|c| c.starts_with("hsl(215,")), "crunch_a is not blue: {colors}");

    // Filtered on the second run's pid, over every period: its split, and the first run's
    // periods empty.
    ensure!(text("filters").starts_with(&format!("pid={}", second.pid)), "{}", text("filters"));
    near(share(&text("filtered_crunch_c"), "Total")?, 50.0, "crunch_c of the second run's pid")?;
    let values: Vec<i64> =
        seen["filtered_timeline"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect();
    ensure!(values.contains(&0) && values.iter().any(|&value| value > 0), "filtered timeline: {values:?}");

    for screenshot in ["viewer-flame.png", "viewer-top.png", "viewer-diff.png"] {
        ensure!(artifacts.join(screenshot).metadata()?.len() > 10_000, "no screenshot {screenshot}");
    }
    Ok(())
}

/// One run of `split.py`: when it ran (Unix milliseconds) and its pid.
#[derive(Clone, Copy)]
struct Run {
    from_ms: u128,
    to_ms: u128,
    pid: u32,
}

fn run_split(weights: &str) -> Result<Run> {
    let from_ms = now_ms();
    let split = Workload::start(PYENV_PYTHON_3_11, "split.py", &["--cpu-seconds", CPU_SECONDS, "--weights", weights])?;
    let pid = split.pid();
    split.wait()?;
    Ok(Run { from_ms, to_ms: now_ms(), pid })
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// Runs tests/browser/viewer.mjs on `url`: the first run as the baseline, the second as
/// the range.
fn browse(url: &str, first: Run, second: Run, artifacts: &Path) -> Result<Value> {
    let browser_dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let output = Command::new("node")
        .current_dir(&browser_dir)
        .arg("viewer.mjs")
        .arg(url)
        .args([first.from_ms, first.to_ms, second.from_ms, second.to_ms].map(|ms| ms.to_string()))
        .arg(second.pid.to_string())
        .arg(artifacts)
        .output()
        .context("running node (`cargo xtask setup --test` installs it, chromium and Playwright)")?;
    ensure!(
        output.status.success(),
        "viewer.mjs failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("viewer.mjs printed no JSON: {}", String::from_utf8_lossy(&output.stdout)))
}

/// The percentage in a tooltip's line `<label>: 1.01 s (50.3%)`, or in `Matched: 29.2% of
/// the total`.
fn share(tooltip: &str, label: &str) -> Result<f64> {
    let line = tooltip
        .lines()
        .find(|line| line.starts_with(&format!("{label}:")))
        .with_context(|| format!("no `{label}:` in {tooltip:?}"))?;
    let number = match line.rfind('(') {
        Some(open) => &line[open + 1..],
        None => line.trim_start_matches(&format!("{label}:")).trim_start(),
    };
    let number = number.split('%').next().unwrap_or_default();
    number.parse().with_context(|| format!("no percentage in {line:?}"))
}

/// The time on the `label:` line of a tooltip (`Total: 1.39 s (46.3%)`), in seconds.
fn seconds(tooltip: &str, label: &str) -> Result<f64> {
    let line = tooltip
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{label}: ")))
        .with_context(|| format!("no `{label}:` in {tooltip:?}"))?;
    let mut words = line.split_whitespace();
    let (number, unit) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    // As viewer.js writes times.
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "min" => 60.0,
        _ => anyhow::bail!("no time in {line:?}"),
    };
    Ok(number.parse::<f64>().with_context(|| format!("no time in {line:?}"))? * scale)
}

/// `"49.3%"` as 49.3.
fn percent(cell: &Value) -> Result<f64> {
    let text = cell.as_str().unwrap_or_default();
    text.trim_end_matches('%').parse().with_context(|| format!("not a percentage: {text}"))
}

fn near(shown: f64, expected: f64, what: &str) -> Result<()> {
    ensure!((shown - expected).abs() <= TOLERANCE_PP, "{what}: {shown}% shown, {expected}% expected");
    Ok(())
}

#[test]
fn tooltips_are_read_as_written() -> Result<()> {
    let tooltip =
        "Cruncher.crunch_c\n/srv/split.py (python)\nRange total: 1.01 s (50.3%)\nBaseline total: 242.5 ms (18.7%)";
    assert_eq!(share(tooltip, "Range total")?, 50.3);
    assert_eq!(share(tooltip, "Baseline total")?, 18.7);
    assert_eq!(share("Matched: 29.2% of the total", "Matched")?, 29.2);
    assert!(share(tooltip, "Self").is_err());
    assert_eq!(seconds("Cruncher.crunch_c\nTotal: 1.39 s (46.3%)\nSelf: 368.7 ms (12.3%)", "Total")?, 1.39);
    assert!((seconds("Total: 368.7 ms (12.3%)", "Total")? - 0.3687).abs() < 1e-9);
    assert!(seconds("Total: many (12.3%)", "Total").is_err());
    Ok(())
}
