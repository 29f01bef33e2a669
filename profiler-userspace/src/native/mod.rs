//! Native code: its symbols (`symbolize`), and unwinding without frame
//! pointers: compact unwind tables made from each file's CFI (`table`),
//! loaded into the kernel for the processes that map the file (`loader`).

mod loader;
pub mod symbolize;
mod table;

pub use loader::{Loader, UnwindStats};
pub use table::table;
