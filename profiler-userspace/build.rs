//! Embeds the eBPF object built by `cargo xtask build` into the agent, and
//! compiles the official .proto files of pprof and OTLP profiles (`proto/`)
//! into prost types.
//!
//! Without the object (a fresh clone, no nightly), it embeds an empty stub, as
//! aya's build scripts do, so that `cargo check`, `clippy` and `test` work: the
//! agent it makes stops at start saying how to build it whole. The unit tests
//! that load eBPF programs are then left out (cfg `ferroscope_root_tests_left_out`),
//! as they are when this build cannot load programs (not root); the test
//! `tests/ebpf_tests_left_out.rs` says so when it runs, and fails under
//! `FERROSCOPE_REQUIRE_ROOT_TESTS=1`, which `cargo xtask test` sets.
use std::{
    env, fs,
    path::{Path, PathBuf},
};

const OBJECT_VAR: &str = "FERROSCOPE_EBPF_OBJECT";
#[path = "src/kernel/capabilities.rs"]
mod capabilities;

fn main() {
    compile_protos();
    println!("cargo:rerun-if-env-changed={OBJECT_VAR}");
    println!("cargo:rerun-if-changed=src/kernel/capabilities.rs");
    println!("cargo:rustc-check-cfg=cfg(ferroscope_root_tests_left_out)");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let (object, stub) = match env::var_os(OBJECT_VAR).map(PathBuf::from) {
        // Asked for by name (as `cargo xtask build` does): it must be there.
        Some(object) => {
            if !object.exists() {
                panic!(
                    "{OBJECT_VAR}={} is missing: build the agent with `cargo xtask build`, which builds it first",
                    object.display()
                );
            }
            (object, false)
        }
        None => {
            let workspace = manifest_dir.parent().expect("the crate is in the workspace");
            let default = workspace.join("profiler-ebpf/target/bpfel-unknown-none/release/profiler-ebpf");
            if default.exists() {
                (default, false)
            } else {
                (stub_object(&default), true)
            }
        }
    };
    if !stub {
        println!("cargo:rerun-if-changed={}", object.display());
    }
    println!("cargo:rustc-env={OBJECT_VAR}={}", object.canonicalize().unwrap().display());

    let left_out = if stub {
        Some("the eBPF object is a stub (profiler-ebpf is not built: `cargo xtask build` builds it)".to_owned())
    } else {
        let missing = capabilities::missing();
        (!missing.is_empty()).then(|| {
            format!(
                "this build runs without root or {}, which loading eBPF programs needs (run it as root)",
                missing.join(", ")
            )
        })
    };
    // Who builds is who runs a plain `cargo test`: built again under sudo (another USER).
    println!("cargo:rerun-if-env-changed=USER");
    if let Some(reason) = left_out {
        println!("cargo:rustc-cfg=ferroscope_root_tests_left_out");
        println!("cargo:rustc-env=FERROSCOPE_ROOT_TESTS_LEFT_OUT={reason}");
        println!(
            "cargo:warning=the unit tests that load eBPF programs (src/kernel/sampler.rs) are left out of this build: \
             {reason}; `cargo xtask test` runs them"
        );
    }
}

/// Writes an empty object into OUT_DIR, and says the agent will not load programs; until
/// `default` (where `cargo xtask build` puts the object) appears.
fn stub_object(default: &Path) -> PathBuf {
    let stub = PathBuf::from(env::var("OUT_DIR").unwrap()).join("profiler-ebpf.stub");
    fs::write(&stub, []).expect("writing the stub eBPF object into OUT_DIR");
    // A path that does not exist would run this script again on every build: watch the
    // nearest directory that does (the object's, once made, is newer than the last run).
    let watched = default.ancestors().skip(1).find(|dir| dir.is_dir()).expect("an existing ancestor of the crate");
    println!("cargo:rerun-if-changed={}", watched.display());
    println!(
        "cargo:warning=the eBPF object {} is missing: this build embeds an empty stub, so its agent cannot load \
         its programs (it stops at start, saying so); build the agent with `cargo xtask build`",
        default.display()
    );
    stub
}

fn compile_protos() {
    let service = "opentelemetry/proto/collector/profiles/v1development/profiles_service.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors =
        protox::compile(["perftools/profile.proto", service], ["proto"]).expect("the .proto files of proto/ compile");
    prost_build::Config::new().compile_fds(descriptors).expect("prost generates the OTLP types");
}
