//! A workload whose three methods take a known 50/30/20 share of its CPU, profiled
//! system-wide: the profile must show that split, the right labels and the right lines.
//! CPython 3.11 here; other versions in `versions.rs`.

use anyhow::Result;
use e2e::known_split::{check, Names};
use e2e::{DEBIAN_PYTHON_3_11, PYENV_PYTHON_3_11};

/// ~3,500 samples at 499 Hz: the binomial noise on the 50% share is 0.85 pp.
const CPU_SECONDS: f64 = 7.0;

#[test]
fn known_split_on_pyenv_python_3_11_7_shared_libpython() -> Result<()> {
    check(PYENV_PYTHON_3_11, Names::Qualified, CPU_SECONDS)
}

#[test]
fn known_split_on_debian_python_3_11_2_static_stripped() -> Result<()> {
    check(DEBIAN_PYTHON_3_11, Names::Qualified, CPU_SECONDS)
}
