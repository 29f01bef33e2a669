//! What leaves the agent: pprof profiles (`pprof`), flame graphs
//! (`flamegraph`), and the sinks that write them locally or ship them
//! (`sinks`).

pub mod flamegraph;
pub mod pprof;
pub mod sinks;

pub use sinks::Sinks;
