//! Embeds the eBPF object built by `cargo xtask build` into the agent, and
//! compiles the official .proto files of pprof and OTLP profiles (`proto/`)
//! into prost types.
use std::{env, path::PathBuf};

fn main() {
    compile_protos();
    println!("cargo:rerun-if-env-changed=FERROSCOPE_EBPF_OBJECT");
    let object = env::var_os("FERROSCOPE_EBPF_OBJECT").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("../profiler-ebpf/target/bpfel-unknown-none/release/profiler-ebpf")
    });
    if !object.exists() {
        panic!(
            "the eBPF object {} is missing: build the agent with `cargo xtask build`, which builds it first",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=FERROSCOPE_EBPF_OBJECT={}", object.canonicalize().unwrap().display());
}

fn compile_protos() {
    let service = "opentelemetry/proto/collector/profiles/v1development/profiles_service.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors =
        protox::compile(["perftools/profile.proto", service], ["proto"]).expect("the .proto files of proto/ compile");
    prost_build::Config::new().compile_fds(descriptors).expect("prost generates the OTLP types");
}
