//! Compiled MailboxFilters and the matching of events against them.

mod filter;

pub use filter::{CompiledFilter, FilterError};
