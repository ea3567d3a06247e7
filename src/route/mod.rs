//! Compiled MailboxFilters and the matching of events against them: the routing table the
//! sources read and the controllers rebuild, with the MailboxGrants that bound what each
//! namespace may see. Depends on `api` and `event` only.

mod filter;
mod grant;
mod hold;
mod table;

pub use filter::{CompiledFilter, FilterBudget, FilterError, MAX_MATCHED_TEXT, Problem};
pub use grant::{Ceiling, CompiledGrant, Grants, MailboxSet};
pub use hold::{CompiledHold, HoldSet};
pub use table::{FilterEntry, Routed, Router, RoutingTable, SubscriptionRoute, Target};
