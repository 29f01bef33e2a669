//! The unit tests of src/kernel/sampler.rs load the real programs into the real kernel: build.rs leaves
//! them out of a build that cannot (the eBPF object is a stub, or the build runs without
//! root). This test says so, as a skip, so that a plain `cargo test` passes on a fresh clone
//! without hiding it; with `FERROSCOPE_REQUIRE_ROOT_TESTS=1` (as `cargo xtask test` runs
//! them, as root, with the real object) it is a failure.

use std::io::Write;

#[test]
fn the_unit_tests_that_load_ebpf_programs_are_built() {
    let Some(reason) = option_env!("FERROSCOPE_ROOT_TESTS_LEFT_OUT") else { return };
    let what = "the unit tests that load eBPF programs (src/kernel/sampler.rs) are left out of this build";
    let required = std::env::var_os("FERROSCOPE_REQUIRE_ROOT_TESTS").is_some_and(|value| value == "1");
    assert!(
        !required,
        "{what}: {reason}; FERROSCOPE_REQUIRE_ROOT_TESTS=1 requires them: build and run them as root with the \
         eBPF object, as `cargo xtask test` does"
    );
    // Straight to the file descriptor, past the test harness's capture, so that it shows.
    let _ = writeln!(std::io::stderr(), "skipped: {what}: {reason}");
    if let Some(log) = std::env::var_os("FERROSCOPE_SKIP_LOG") {
        let test = "ebpf_tests_left_out::the_unit_tests_that_load_ebpf_programs_are_built";
        let line = format!("ferroscope-skip: {test}: {what}: {reason}\n");
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        appended.unwrap_or_else(|error| panic!("recording the skip in {}: {error}", log.to_string_lossy()));
    }
}
