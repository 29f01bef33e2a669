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

/// Installs the build's tools; returns the path of `bpf-linker`.
pub fn build_tools() -> Result<PathBuf> {
    let sysroot = nightly_toolchain()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)
}

/// Installs the tools of the end-to-end tests and the benchmark.
pub fn test_tools() -> Result<()> {
    go()?;
    venv_packages(&TEST_PACKAGES)?;
    debian_packages(&DEPLOY_TEST_TOOLS)?;
    browser_tools()?;
    debian_root()
}

/// What the viewer's end-to-end test drives: Debian's chromium, and Playwright from npm
/// (pinned by tests/browser/package-lock.json; it never downloads a browser of its own).
fn browser_tools() -> Result<()> {
    debian_packages(&[
        ("chromium", "chromium", "the viewer's end-to-end test runs it headless"),
        ("node", "nodejs", "runs Playwright, which drives chromium"),
        ("npm", "npm", "installs Playwright"),
    ])?;
    let browser = crate::workspace_root().join("tests/browser");
    let lock: serde_json::Value = serde_json::from_str(&fs::read_to_string(browser.join("package-lock.json"))?)?;
    let pinned = lock["packages"]["node_modules/playwright-core"]["version"]
        .as_str()
        .context("no playwright-core in the lock")?;
    let installed = fs::read_to_string(browser.join("node_modules/playwright-core/package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|package| package["version"].as_str().map(str::to_owned));
    if installed.as_deref() == Some(pinned) {
        step(format!("setup: playwright-core {pinned}: present, skipped"));
        return Ok(());
    }
    step(format!("setup: playwright-core {pinned}: npm ci in {}", browser.display()));
    run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&browser))
}

/// What the static build of `cargo xtask dist` needs beside the build's tools: Rust's musl
/// target, and musl-gcc for the C code of dependencies (ring).
pub fn dist_tools() -> Result<()> {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let target = crate::dist::TARGET;
    if sysroot.join("lib/rustlib").join(target).is_dir() {
        step(format!("setup: Rust target {target}: present, skipped"));
    } else {
        step(format!("setup: Rust target {target}: installing"));
        run(Command::new("rustup").args(["target", "add", target]))?;
    }
    debian_packages(&[("musl-gcc", "musl-tools", "the static agent's C dependencies")])
}

/// Commands the deployment tests run, with the Debian package of each and what it is for.
const DEPLOY_TEST_TOOLS: [(&str, &str, &str); 3] = [
    // Debian 12 has kubectl 1.20, whose kustomize (v2) the manifests are kept simple enough for.
    ("kubectl", "kubernetes-client", "kubectl kustomize renders the Kubernetes manifests"),
    ("systemd-analyze", "systemd", "systemd-analyze verify checks the systemd unit"),
    ("setpriv", "util-linux", "setpriv runs the agent as a user with the unit's capabilities"),
];

/// Installs the Debian package of each `(command, package, why)` whose command is missing.
pub fn debian_packages(tools: &[(&str, &str, &str)]) -> Result<()> {
    for (command, package, why) in tools {
        if crate::on_path(command) {
            step(format!("setup: {command} ({why}): present, skipped"));
        } else {
            step(format!("setup: {command} ({why}): installing {package}"));
            apt_install(package)?;
        }
    }
    Ok(())
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
    apt_install("golang-go")
}

/// Installs a package of this machine's Debian.
fn apt_install(package: &str) -> Result<()> {
    let install =
        || run(Command::new("apt-get").args(["install", "-y", package]).env("DEBIAN_FRONTEND", "noninteractive"));
    if install().is_err() {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    Ok(())
}

/// The tools' Python virtual environment: py-spy, the OTLP protos, the benchmark's peers.
fn venv() -> PathBuf {
    tools_dir().join("venv")
}

/// py-spy, installed by `test_tools`.
pub fn py_spy() -> PathBuf {
    venv().join("bin/py-spy")
}

/// What the end-to-end tests need from PyPI: py-spy for the benchmark's comparison, the
/// official OTLP protos, which the tests decode what the agent sends with, maturin, which
/// builds the Python package's wheel with the agent inside, and kubernetes-validate, which
/// checks the Kubernetes manifests against the schemas of Kubernetes 1.25 to 1.37 it carries.
const TEST_PACKAGES: [&str; 4] =
    ["py-spy==0.4.3", "opentelemetry-proto==1.45.2", "maturin==1.9.6", "kubernetes-validate==1.37.0"];

/// The benchmark's peers and programs beside py-spy: memray, and pyperformance's benchmarks.
const BENCH_PACKAGES: [&str; 2] = ["memray==1.20.0", "pyperformance==1.14.0"];

/// Installs `BENCH_PACKAGES` into the tools' environment, unless there already.
pub fn bench_tools() -> Result<()> {
    venv_packages(&BENCH_PACKAGES)
}

/// Installs `packages` (pinned) into the tools' Python environment, made with CPython 3.11,
/// unless all are there already.
fn venv_packages(packages: &[&str]) -> Result<()> {
    if !venv().join("bin/pip").is_file() {
        run(Command::new(e2e::PYENV_PYTHON_3_11).args(["-m", "venv"]).arg(venv()))?;
    }
    let listed = Command::new(venv().join("bin/pip")).args(["freeze"]).output()?;
    let installed = String::from_utf8_lossy(&listed.stdout).into_owned();
    if packages.iter().all(|package| installed.lines().any(|line| line == *package)) {
        step(format!("setup: {}: present, skipped", packages.join(", ")));
        return Ok(());
    }
    step(format!("setup: installing {} into {}", packages.join(", "), venv().display()));
    run(Command::new(venv().join("bin/pip")).args(["install", "--quiet"]).args(packages))
}

/// The tools' Python (CPython 3.11.7 of pyenv): pyperf, memray and the OTLP protos.
pub fn bench_python() -> PathBuf {
    venv().join("bin/python")
}

/// memray, installed by `bench_tools`.
pub fn memray() -> PathBuf {
    venv().join("bin/memray")
}

/// The script of pyperformance's benchmark `name`.
pub fn pyperformance_benchmark(name: &str) -> PathBuf {
    venv().join(format!("lib/python3.11/site-packages/pyperformance/data-files/benchmarks/bm_{name}/run_benchmark.py"))
}

/// The interpreters the Debian root should hold, those of them Debian has.
const DEBIAN_PYTHONS: [&str; 3] = ["python3.13", "python3.14", "python3.15"];

/// A minimal Debian unstable root with its newest CPythons, for the tests that run them in
/// their own PID and mount namespaces with another libc. It lives outside the repository so
/// that every clone reuses it; a stamp written last marks it complete, so that a root left
/// half-made is made again.
fn debian_root() -> Result<()> {
    let root = Path::new(e2e::DEBIAN_ROOT);
    let stamp = root.join(e2e::DEBIAN_ROOT_STAMP);
    if let Ok(pythons) = fs::read_to_string(&stamp) {
        step(format!("setup: Debian root {} ({}): present, skipped", root.display(), pythons.trim()));
        return Ok(());
    }
    if Command::new("debootstrap").arg("--version").output().is_err() {
        step("setup: installing debootstrap");
        apt_install("debootstrap")?;
    }
    let mirror = debian_mirror()?;
    step(format!("setup: Debian root {}: debootstrap of sid from {mirror} (a minute)", root.display()));
    if root.exists() {
        fs::remove_dir_all(root)?;
    }
    run(Command::new("debootstrap").args(["--variant=minbase", "sid"]).arg(root).arg(&mirror))?;
    // Debian may not have every minor yet: install those it has.
    let chroot = |args: &[&str]| {
        let mut command = Command::new("chroot");
        command.arg(root).args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    let pythons: Vec<&str> = DEBIAN_PYTHONS
        .into_iter()
        .filter(|python| chroot(&["apt-cache", "show", python]).output().is_ok_and(|out| out.status.success()))
        .collect();
    run(chroot(&["apt-get", "install", "-y", "--no-install-recommends"]).args(&pythons))?;
    fs::write(&stamp, pythons.join(" ") + "\n")?;
    step(format!("setup: Debian root {}: made with {}", root.display(), pythons.join(" ")));
    Ok(())
}

/// The Debian archive this machine's apt already uses (a URI ending in `/debian`), from the
/// one-line `sources.list` format or deb822 `.sources` files.
pub fn debian_mirror() -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        more.sort();
        files.extend(more.into_iter().filter(|path| path.extension().is_some_and(|e| e == "list" || e == "sources")));
    }
    let text: String = files.iter().filter_map(|file| fs::read_to_string(file).ok()).collect::<Vec<_>>().join("\n");
    text.lines()
        .filter(|line| line.starts_with("deb ") || line.starts_with("URIs:"))
        .flat_map(|line| line.split_whitespace().skip(1).filter(|word| word.contains("://")))
        .map(|uri| uri.trim_end_matches('/'))
        .find(|uri| uri.ends_with("/debian"))
        .map(str::to_owned)
        .context("no Debian archive (a URI ending in /debian) in apt's sources")
}
