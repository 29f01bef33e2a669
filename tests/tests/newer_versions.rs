//! The known split (see `known_split.rs`) on CPython 3.13+, read through the interpreter's
//! own `_Py_DebugOffsets`: pyenv's 3.13 (shared libpython) on the host, and Debian
//! unstable's static 3.14 and 3.15 (another glibc) in a container, in the root that
//! `cargo xtask setup --test` makes. A missing interpreter fails the test, unless
//! `FERROSCOPE_ALLOW_SKIP=1` (then it is skipped, and says so).

use anyhow::Result;
use e2e::known_split::{check_in, Names};
use e2e::{DEBIAN_ROOT, PYENV_PYTHON_3_13};

/// ~2,500 samples at 499 Hz: 0.9 pp of binomial noise on the 50% share.
const CPU_SECONDS: f64 = 5.0;

#[test]
fn known_split_on_pyenv_python_3_13_0() -> Result<()> {
    check_in(None, PYENV_PYTHON_3_13, Names::Qualified, CPU_SECONDS)
}

#[test]
fn known_split_on_debian_python_3_14_in_a_container() -> Result<()> {
    check_in(Some(DEBIAN_ROOT), "/usr/bin/python3.14", Names::Qualified, CPU_SECONDS)
}

#[test]
fn known_split_on_debian_python_3_15_in_a_container() -> Result<()> {
    check_in(Some(DEBIAN_ROOT), "/usr/bin/python3.15", Names::Qualified, CPU_SECONDS)
}
