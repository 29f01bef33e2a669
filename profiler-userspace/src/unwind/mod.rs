//! Native unwinding without frame pointers: compact unwind tables made from
//! each file's CFI (`table`), loaded into the kernel for the processes that
//! map the file (`loader`), and the merge of the native and Python chains
//! the kernel walked (`merge`).

mod loader;
mod merge;
mod table;

pub use loader::Loader;
pub use merge::{is_entry, merge};
pub use table::table;
