//! Compiled MailboxFilters and the matching of events against them: the routing table the
//! sources read and the controllers rebuild. Depends on `api` and `event` only.

mod filter;
mod table;

pub use filter::{CompiledFilter, FilterError};
pub use table::{FilterEntry, Routed, Router, RoutingTable, SubscriptionRoute, Target};
