//! The processes of the host: what each runs (`discovery`), the container and
//! pod it belongs to (`containers`, `kubernetes`), and reading its memory
//! (`procmem`); the table of those the agent knows (`table`).

pub mod containers;
pub mod discovery;
pub mod kubernetes;
pub mod procmem;
mod table;

pub use table::{Look, Process, Recheck, Table};
