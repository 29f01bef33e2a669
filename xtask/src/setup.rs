//! `cargo xtask setup`: installs what is missing, checking first so that a second run is fast.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};

use crate::{cargo, run, step, tools_dir};

/// The bpf-linker release the eBPF build uses.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The py-spy release the benchmark compares against.
const PY_SPY_VERSION: &str = "0.4.3";

/// Installs the build's tools; returns the path of `bpf-linker`.
pub fn build_tools() -> Result<PathBuf> {
    let sysroot = nightly_toolchain()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)
}

/// Installs the tools of the end-to-end tests and the benchmark.
pub fn test_tools() -> Result<()> {
    go()?;
    py_spy_venv()
}

/// The nightly toolchain (the eBPF target needs `-Z build-std`); returns its sysroot.
fn nightly_toolchain() -> Result<PathBuf> {
    let sysroot = || -> Option<PathBuf> {
        let output = Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .ok()?;
        output.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
    };
    if let Some(sysroot) = sysroot() {
        step("setup: nightly toolchain: present, skipped");
        return Ok(sysroot);
    }
    step("setup: nightly toolchain: installing");
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    sysroot().context("nightly's sysroot after installing it")
}

/// Nightly's `rust-src`, which `-Z build-std=core` compiles.
fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        step("setup: nightly rust-src: present, skipped");
        return Ok(());
    }
    step("setup: nightly rust-src: installing");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker, built against nightly's own libLLVM so that it reads the bitcode nightly
/// writes; rebuilt when that library changes.
fn bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let llvm = nightly_libllvm(sysroot)?;
    let llvm_name = llvm.file_name().unwrap().to_string_lossy().into_owned();
    let metadata = fs::metadata(&llvm)?;
    let modified = metadata.modified()?.duration_since(UNIX_EPOCH)?.as_secs();
    let fingerprint = format!("{llvm_name} {} {modified}\n", metadata.len());

    let root = tools_dir().join("bpf-linker");
    let linker = root.join("bin/bpf-linker");
    let stamp = root.join("built-against");
    if linker.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(&fingerprint) {
        step(format!("setup: bpf-linker {BPF_LINKER_VERSION}: built against {llvm_name}, skipped"));
        return Ok(linker);
    }

    // `libLLVM.so.22.1-rust-1.97.0-nightly` is LLVM 22.1.
    let version = llvm_name
        .strip_prefix("libLLVM.so.")
        .and_then(|rest| rest.split('-').next())
        .with_context(|| format!("no LLVM version in {llvm_name}"))?;
    let major = version.split('.').next().unwrap();
    step(format!("setup: bpf-linker {BPF_LINKER_VERSION}: building against {llvm_name} (a few minutes)"));
    let prefix = llvm_prefix(&llvm, version)?;
    run(cargo()
        .args(["install", "bpf-linker", "--locked", "--force", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix))?;
    fs::write(&stamp, fingerprint)?;
    Ok(linker)
}

/// Nightly's `libLLVM.so.<version>-rust-<rust version>`.
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib)? {
        let path = entry?.path();
        if path.file_name().unwrap().to_string_lossy().starts_with("libLLVM.so.") {
            return Ok(path);
        }
    }
    bail!("no libLLVM.so.* in {}", lib.display())
}

/// A stand-in LLVM installation for llvm-sys: nightly's libLLVM under `lib/` and an
/// `llvm-config` that describes it. bpf-linker keeps `lib/` as its run path, so the
/// directory stays.
fn llvm_prefix(llvm: &Path, version: &str) -> Result<PathBuf> {
    let prefix = tools_dir().join("llvm-prefix");
    let _ = fs::remove_dir_all(&prefix);
    fs::create_dir_all(prefix.join("lib"))?;
    fs::create_dir_all(prefix.join("bin"))?;
    symlink(llvm, prefix.join("lib/libLLVM.so"))?;
    symlink(llvm, prefix.join("lib").join(llvm.file_name().unwrap()))?;
    let config = prefix.join("bin/llvm-config");
    fs::write(&config, LLVM_CONFIG.replace("@VERSION@", &format!("{version}.0")))?;
    fs::set_permissions(&config, fs::Permissions::from_mode(0o755))?;
    Ok(prefix)
}

/// The `llvm-config` answers llvm-sys asks for, for a shared libLLVM.
const LLVM_CONFIG: &str = r#"#!/bin/sh
prefix=$(cd "$(dirname "$0")/.." && pwd)
out=""
for arg in "$@"; do
    case "$arg" in
        --version) out="$out @VERSION@" ;;
        --prefix) out="$out $prefix" ;;
        --libdir) out="$out $prefix/lib" ;;
        --includedir) out="$out $prefix/include" ;;
        --cflags|--cxxflags|--cppflags) out="$out -I$prefix/include" ;;
        --ldflags) out="$out -L$prefix/lib" ;;
        --libs|--libnames) out="$out -lLLVM" ;;
        --system-libs) ;;
        --shared-mode) out="$out shared" ;;
        --components) out="$out all" ;;
        --targets-built) out="$out BPF X86" ;;
        --link-shared|--link-static) ;;
    esac
done
echo $out
"#;

/// Go, for `go tool pprof`, from Debian.
fn go() -> Result<()> {
    if Command::new("go").arg("version").output().is_ok_and(|output| output.status.success()) {
        step("setup: go (for go tool pprof): present, skipped");
        return Ok(());
    }
    step("setup: go (for go tool pprof): installing golang-go");
    let install =
        || run(Command::new("apt-get").args(["install", "-y", "golang-go"]).env("DEBIAN_FRONTEND", "noninteractive"));
    if install().is_err() {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    Ok(())
}

/// The virtual environment holding py-spy.
fn venv() -> PathBuf {
    tools_dir().join("venv")
}

/// py-spy, installed by `test_tools`.
pub fn py_spy() -> PathBuf {
    venv().join("bin/py-spy")
}

/// A Python virtual environment with py-spy, for the benchmark.
fn py_spy_venv() -> Result<()> {
    let installed = Command::new(py_spy()).arg("--version").output();
    if installed
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == format!("py-spy {PY_SPY_VERSION}"))
    {
        step(format!("setup: py-spy {PY_SPY_VERSION}: present, skipped"));
        return Ok(());
    }
    step(format!("setup: py-spy {PY_SPY_VERSION}: installing into {}", venv().display()));
    if !venv().join("bin/pip").is_file() {
        run(Command::new(e2e::PYENV_PYTHON_3_11).args(["-m", "venv"]).arg(venv()))?;
    }
    run(Command::new(venv().join("bin/pip")).args(["install", "--quiet", &format!("py-spy=={PY_SPY_VERSION}")]))
}
