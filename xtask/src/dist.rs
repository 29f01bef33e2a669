//! `cargo xtask dist`: the static agent and the deployment files, in one tarball.
//!
//! The agent is built for `x86_64-unknown-linux-musl`, statically linked, so that it runs on
//! any x86-64 Linux with BTF whatever its libc, and in an image holding nothing else
//! (`deploy/container/Containerfile`), without debug information (the symbols stay, for
//! backtraces). Before packing, the binary is checked: no program interpreter, and
//! `--version` runs in an empty root, as in a `FROM scratch` image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{build_ebpf, cargo, ebpf_object, run, setup, step, target_dir, workspace_root, EBPF_OBJECT_VAR};

/// The target of the static build.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// The version of the workspace, which the agent and the images carry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What is packed beside the binary, from the workspace's root, if present.
const PACKED: [&str; 2] = ["deploy", "README.md"];

/// Builds the static agent and the tarball; returns the tarball's path.
pub fn dist() -> Result<PathBuf> {
    let binary = build_static()?;
    let name = format!("ferroscope-{VERSION}-x86_64-linux");
    let dist_dir = target_dir().join("dist");
    let staging = dist_dir.join(&name);
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;

    let packed_binary = staging.join("ferroscope");
    fs::copy(&binary, &packed_binary)?;
    check_static(&packed_binary)?;

    let root = workspace_root();
    let licenses = fs::read_dir(root)?
        .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|name| name.starts_with("LICENSE") || name.starts_with("COPYING"));
    for entry in PACKED.iter().map(|name| name.to_string()).chain(licenses) {
        let source = root.join(&entry);
        if source.exists() {
            copy_tree(&source, &staging.join(&entry))?;
        }
    }

    let tarball = dist_dir.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .args(["--create", "--gzip", "--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .arg("--file")
        .arg(&tarball)
        .arg("--directory")
        .arg(&dist_dir)
        .arg(&name))?;
    let size = fs::metadata(&tarball)?.len();
    step(format!("dist: {} ({:.1} MiB)", tarball.display(), size as f64 / (1 << 20) as f64));
    Ok(tarball)
}

/// Builds the eBPF object and the agent for [`TARGET`] (release); returns the binary.
pub fn build_static() -> Result<PathBuf> {
    setup::dist_tools()?;
    let linker = setup::build_tools()?;
    build_ebpf(&linker)?;
    step(format!("building the static agent ({TARGET}, release)"));
    // Without the debug information of the workspace's release profile (debug = 1), which
    // is most of the binary and of its build time; Cargo then strips the standard library's
    // too, and keeps the symbols, for backtraces. This build's artifacts are apart from the
    // host's (another target), so neither build undoes the other.
    run(cargo()
        .args(["build", "-p", "profiler-userspace", "--release", "--target", TARGET])
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env(EBPF_OBJECT_VAR, ebpf_object()))?;
    let binary = target_dir().join(TARGET).join("release/ferroscope");
    step(format!("built {}", binary.display()));
    Ok(binary)
}

/// Fails unless `binary` is statically linked (no `PT_INTERP`) and runs in an empty root,
/// as in a `FROM scratch` image.
fn check_static(binary: &Path) -> Result<()> {
    if let Some(interpreter) = elf_interpreter(binary)? {
        bail!("{} is not static: it asks for the program interpreter {interpreter}", binary.display());
    }
    let empty_root = tempfile::tempdir()?;
    fs::copy(binary, empty_root.path().join("ferroscope"))?;
    // chroot(2) needs CAP_SYS_CHROOT: without root, in a user namespace of our own.
    // SAFETY: geteuid has no preconditions.
    let mut command = if unsafe { libc::geteuid() } == 0 {
        Command::new("chroot")
    } else {
        let mut command = Command::new("unshare");
        command.args(["--user", "--map-root-user", "chroot"]);
        command
    };
    let output =
        command.arg(empty_root.path()).args(["/ferroscope", "--version"]).output().context("running chroot")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.trim() == format!("ferroscope {VERSION}"),
        "`ferroscope --version` in an empty root: {}, stdout {stdout:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    step(format!("dist: {} is static and runs in an empty root", binary.display()));
    Ok(())
}

/// The program interpreter (`PT_INTERP`) an x86-64 ELF executable asks for, if any.
fn elf_interpreter(binary: &Path) -> Result<Option<String>> {
    let data = fs::read(binary)?;
    let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes(b.try_into().unwrap()));
    let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |at: usize| data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    ensure!(data.starts_with(b"\x7fELF\x02\x01"), "{} is not a 64-bit little-endian ELF file", binary.display());
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        bail!("{}: truncated ELF header", binary.display());
    };
    for index in 0..usize::from(phnum) {
        let header = phoff + index * usize::from(phentsize);
        const PT_INTERP: u32 = 3;
        if u32_at(header).context("truncated program header")? == PT_INTERP {
            let (offset, size) = (u64_at(header + 8).unwrap_or(0), u64_at(header + 32).unwrap_or(0));
            let path = data.get(offset..offset + size).context("truncated PT_INTERP")?;
            return Ok(Some(String::from_utf8_lossy(path).trim_end_matches('\0').to_owned()));
        }
    }
    Ok(None)
}

/// Copies a file, or a directory and everything under it.
fn copy_tree(source: &Path, destination: &Path) -> Result<()> {
    if source.is_dir() {
        fs::create_dir_all(destination)?;
        let mut entries = fs::read_dir(source)?.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            copy_tree(&entry.path(), &destination.join(entry.file_name()))?;
        }
    } else {
        fs::copy(source, destination).with_context(|| format!("copying {}", source.display()))?;
    }
    Ok(())
}
