//! What leaves the agent: pprof profiles (`pprof`), flame graphs
//! (`flamegraph`), and the sinks that write them locally or ship them
//! (`sinks`); `frame_kind` is how a frame's kind is written into a pprof
//! and read back.

pub mod flamegraph;
pub mod frame_kind;
pub mod pprof;
pub mod sinks;

pub use sinks::Sinks;
