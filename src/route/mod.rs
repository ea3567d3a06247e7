//! Compiled MailboxFilters and the matching of events against them.

mod filter;
mod table;

pub use filter::{CompiledFilter, FilterError};
pub use table::{FilterEntry, Routed, Router, RoutingTable, SubscriptionRoute, Target};
