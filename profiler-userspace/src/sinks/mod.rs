//! Where the profiles of finished periods go.

mod local;

pub use local::LocalDir;
