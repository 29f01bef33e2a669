//! The kernel interface: the embedded eBPF programs loaded and attached
//! (`sampler`), what this kernel accepts of them (`features`, `headroom`,
//! `check`), and the ring buffer's records decoded into events (`events`).

pub mod capabilities;
pub mod check;
pub mod events;
pub mod features;
pub mod headroom;
mod sampler;

pub use sampler::*;
