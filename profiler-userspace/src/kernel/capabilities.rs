//! The capabilities loading the eBPF programs needs, read from `/proc/self/status`; shared
//! with the build script, which leaves out the tests that load programs when the build
//! cannot (a `#[path]` module there: std only).

/// Capabilities loading the programs needs, with the bit of each in `CapEff`.
const NEEDED: [(&str, u32); 3] = [("CAP_BPF", 39), ("CAP_PERFMON", 38), ("CAP_SYS_PTRACE", 19)];
/// Stands for all of them.
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process holds the capability of bit `bit` (of `CapEff`), or CAP_SYS_ADMIN.
pub fn has(bit: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    effective & (1 << bit | 1 << CAP_SYS_ADMIN) != 0
}

/// The needed capabilities this process lacks (none with root or CAP_SYS_ADMIN).
pub fn missing() -> Vec<&'static str> {
    NEEDED.iter().filter(|(_, bit)| !has(*bit)).map(|(name, _)| *name).collect()
}
