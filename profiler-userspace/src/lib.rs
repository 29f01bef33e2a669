//! Ferroscope's agent as a pipeline of stages, each a module with a small
//! public surface and typed values between them (see docs/design.md):
//!
//! ```text
//! kernel ──events──▶ agent ──▶ process ──▶ cpython + native ──▶ stack ──▶ aggregate ──▶ export
//! ```
//!
//! - [`kernel`]: loads the eBPF programs, fills their maps, and decodes the
//!   ring buffer's records into [`kernel::Event`]s.
//! - [`process`]: the processes the agent knows (discovery, containers,
//!   Kubernetes pods) and when to look at each again.
//! - [`cpython`]: everything CPython: detection, layouts, debug offsets, code
//!   objects and line tables, allocator sites, and where Python frames go in
//!   a native stack.
//! - [`native`]: native symbolization and the unwind tables of native code.
//! - [`stack`]: one sample's named frames ([`stack::Frame`]), with its thread.
//! - [`aggregate`]: stacks summed per application and period, by sample type.
//! - [`export`]: pprof, flame graphs, and the sinks that write or ship them.
//! - [`agent`]: the loop that wires the stages together.

pub mod agent;
pub mod aggregate;
pub mod config;
pub mod control;
pub mod cpython;
pub mod export;
mod httpd;
pub mod kernel;
pub mod metrics;
pub mod native;
pub mod process;
pub mod stack;
pub mod summary;
pub mod view;
