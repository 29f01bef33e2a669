//! The known split (see `known_split.rs`) on pyenv's builds of every CPython before 3.13
//! other than 3.11: shared libpython, version read from `sys.version` before 3.11.
//! Before 3.11 code objects have no qualified name: methods show as `crunch_a`.
//! A build that is not installed fails the test, unless `FERROSCOPE_ALLOW_SKIP=1` (then it is
//! skipped, and says so).

use anyhow::Result;
use e2e::known_split::{check, Names};

/// ~2,500 samples at 499 Hz (0.9 pp of binomial noise on the 50% share), so that the
/// six versions add about 40 s.
const CPU_SECONDS: f64 = 5.0;

#[test]
fn known_split_on_pyenv_python_3_6_15() -> Result<()> {
    check("/root/.pyenv/versions/3.6.15/bin/python3.6", Names::Plain, CPU_SECONDS)
}

#[test]
fn known_split_on_pyenv_python_3_7_16() -> Result<()> {
    check("/root/.pyenv/versions/3.7.16/bin/python3.7", Names::Plain, CPU_SECONDS)
}

#[test]
fn known_split_on_pyenv_python_3_8_18() -> Result<()> {
    check("/root/.pyenv/versions/3.8.18/bin/python3.8", Names::Plain, CPU_SECONDS)
}

#[test]
fn known_split_on_pyenv_python_3_9_18() -> Result<()> {
    check("/root/.pyenv/versions/3.9.18/bin/python3.9", Names::Plain, CPU_SECONDS)
}

#[test]
fn known_split_on_pyenv_python_3_10_13() -> Result<()> {
    check("/root/.pyenv/versions/3.10.13/bin/python3.10", Names::Plain, CPU_SECONDS)
}

#[test]
fn known_split_on_pyenv_python_3_12_1() -> Result<()> {
    check("/root/.pyenv/versions/3.12.1/bin/python3.12", Names::Qualified, CPU_SECONDS)
}
