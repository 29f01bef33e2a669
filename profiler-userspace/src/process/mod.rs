//! The processes of the host: what each runs (`discovery`), the container and
//! pod it belongs to (`containers`, `kubernetes`), and reading its memory
//! (`procmem`).

pub mod containers;
pub mod discovery;
pub mod kubernetes;
pub mod procmem;
